"""The bottom layer that ``maskgen`` and ``sslmask`` both stand on.

It holds what the two packages share and nothing else: the shard format (``shard_format``),
reading shards and class folders into sample records (``records``), crash-safe file writes
(``atomic``), ``KEY=VALUE`` option parsing (``keyvalue``) and the error types both command
lines report (``errors``). It imports neither package and needs no torch, so each side can
change without the other moving underneath it. Layers, one way: ``maskio`` <- ``sslmask`` <-
``maskgen.methods.deep`` (through ``sslmask.backbones`` only) and ``maskio`` <- ``maskgen``.
"""
