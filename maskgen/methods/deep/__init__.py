"""``--method deep``: a saliency head on a (self-supervised) ResNet, trained from earlier masks."""

from maskgen.methods.deep.method import DeepSaliency

__all__ = ["DeepSaliency"]
