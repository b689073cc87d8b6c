"""sparse-attention: attention runs as block-sparse flash attention over a block layout.

    sites.py             recognise attention (SDPA or eager softmax(q k^T) v): q, k, v, mask, scale
    causal.py            causal SDPA given its explicit mask, so the lossy policies can narrow it
    block_call.py        the block_layout + block_attention call: run eagerly, inserted, its density
    quest.py             topk over a KV cache: per-page key min/max state, Quest page selection in decode
    sparse_attention.py  the pass and its RegionRule (policies: mask, window, topk, threshold)
"""
from .sparse_attention import SparseAttention

__all__ = ["SparseAttention"]
