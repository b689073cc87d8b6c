"""token-routing: only the top `capacity` fraction of tokens go through residual blocks.

    blocks.py     find `h + f(h)` MLP blocks; the router's features; what the copy runs
    parallel.py   parallel-residual blocks (h + attn(h) + mlp(h): the MLP branch); the search over adds
    layers.py     whole decoder layers as blocks (`where="layer"`)
    body_copy.py  copy a block's body to run on the kept tokens (shape literals rescaled)
    check.py      the routed copy as a reading: confirmed token by token; its error vs dense
    routers.py    how tokens are scored: norm, a calibrated probe, or weights from a file
    flops.py      FLOPs of a body, for the report
    routing.py    the pass and its RegionRule
    threshold.py  decision "threshold": score >= a calibrated per-block threshold, per token (decode)
    decode.py     mode="generate": the prefill calibrates the thresholds, the decode program is given them
"""
from .routing import TokenRouting

__all__ = ["TokenRouting"]
