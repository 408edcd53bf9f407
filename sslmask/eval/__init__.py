"""Evaluation of frozen backbones: k-NN and linear probe on labelled shards or folders."""
