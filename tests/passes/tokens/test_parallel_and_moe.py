"""token-routing on parallel-residual blocks (GPT-NeoX: h + attn(h) + mlp(h)) and on MoE MLPs written by
transformers (DeepSeek-V3, batched_mm and grouped_mm experts, no moe-dispatch); skips name the block and the structure."""
import pytest
import torch

import sparsecc
from sparsecc.passes.tokens.body_copy import rescale_count, rescale_shape

from ..moe.families import deepseek_v3, tokens

hf = pytest.importorskip("transformers")
EVERY_BLOCK = ["*"]


def _logits(out):
    return out["logits"]


@pytest.fixture(scope="module")
def neox():
    torch.manual_seed(0)
    config = hf.GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, use_cache=False)
    assert config.use_parallel_residual
    return hf.GPTNeoXForCausalLM(config).eval()


def _routed(compiled) -> list[str]:
    return [r.layer for r in compiled.report().layers if r.op == "sparsecc.route"]


def test_neox_parallel_mlp_branch_is_routed(neox):
    compiled = sparsecc.compile(neox, (tokens(),), sparsity={"tokens": {"capacity": 0.5, "layers": EVERY_BLOCK}})
    assert _routed(compiled) == ["gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"]
    record = compiled.report().layers[0]
    assert record.details["kept"] == 3 and record.flops_after < 0.6 * record.flops_before
    assert 0 < compiled.report().error_vs_dense < 1


def test_neox_parallel_block_at_capacity_one_matches_the_model(neox):
    ids = tokens()
    compiled = sparsecc.compile(neox, (ids,), sparsity={"tokens": {"capacity": 1.0, "layers": EVERY_BLOCK}})
    assert len(_routed(compiled)) == 2
    with torch.no_grad():   # attention is added to h before the MLP branch: equal up to rounding
        torch.testing.assert_close(_logits(compiled(ids)), _logits(neox(ids)), rtol=1e-5, atol=1e-5)


def test_neox_unrouted_tokens_still_get_attention(neox):
    """At capacity 0.5 the tokens left out of the MLP branch get h + attn(h), not h alone."""
    ids = tokens(batch=1)
    compiled = sparsecc.compile(neox, (ids,), sparsity={"tokens": {"capacity": 0.5, "layers": ["0"]}})
    layer = neox.gpt_neox.layers[0]
    with torch.no_grad():
        h = neox.gpt_neox.embed_in(ids)
        position = torch.arange(ids.shape[1])[None]
        cos_sin = neox.gpt_neox.rotary_emb(h, position)
        attn = layer.attention(layer.input_layernorm(h), attention_mask=None, position_embeddings=cos_sin)[0]
        kept = torch.ops.sparsecc.route(torch.linalg.vector_norm(layer.post_attention_layernorm(h), dim=-1), 0.5)
        out = h + attn
        out[:, kept[0]] += layer.mlp(layer.post_attention_layernorm(h[:, kept[0]]))
        rest = neox.gpt_neox.layers[1](out, attention_mask=None, position_ids=position, position_embeddings=cos_sin)
        rest = rest[0] if isinstance(rest, tuple) else rest
        expected = neox.lm_head(neox.gpt_neox.final_layer_norm(rest))
        torch.testing.assert_close(_logits(compiled(ids)), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def deepseek():
    return deepseek_v3("batched_mm")


def test_deepseek_v3_moe_mlps_are_routed(deepseek):
    ids = tokens()
    compiled = sparsecc.compile(deepseek, (ids,), sparsity={"tokens": {"capacity": 0.5, "layers": EVERY_BLOCK}})
    assert _routed(compiled) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    routers = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.aten.topk.default]
    assert routers and all(n.meta["val"][0].shape[0] == 2 * 3 for n in routers)   # only B*K tokens are routed


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_deepseek_v3_at_capacity_one_matches_the_model(implementation):
    """grouped_mm: the dispatch's arange over B*S*k (token, expert) pairs runs over B*K*k in the copy."""
    model, ids = deepseek_v3(implementation), tokens()
    compiled = sparsecc.compile(model, (ids,), sparsity={"tokens": {"capacity": 1.0, "layers": EVERY_BLOCK}})
    assert len(_routed(compiled)) == 2
    with torch.no_grad():
        torch.testing.assert_close(_logits(compiled(ids)), _logits(model(ids)), rtol=1e-5, atol=1e-5)


class ParallelWithSideInput(torch.nn.Module):
    """h + attn(h) + mlp(h) * gate, where the gate is a model input: the MLP branch reads more than h."""

    def __init__(self, width=16):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 32), torch.nn.GELU(), torch.nn.Linear(32, width))

    def forward(self, h, gate):
        return h + self.attn(h, h, h, need_weights=False)[0] + self.mlp(h) * gate


def test_parallel_block_that_cannot_be_routed_says_why_by_module_not_node():
    block = ParallelWithSideInput().eval()
    compiled = sparsecc.compile(block, (torch.randn(2, 6, 16), torch.randn(2, 6, 16)),
                                sparsity={"tokens": {"capacity": 0.5, "layers": EVERY_BLOCK}})
    skips = compiled.report().skipped
    assert not _routed(compiled) and len(skips) == 1
    assert skips[0]["reason"].startswith("parallel residual block: the MLP branch reads")
    assert "%" not in skips[0]["reason"]


def test_neox_whole_parallel_layers_route_and_capacity_one_is_exact(neox):
    ids = tokens()
    compiled = sparsecc.compile(neox, (ids,), sparsity={"tokens": {"capacity": 1.0, "where": "layer",
                                                                   "layers": EVERY_BLOCK}})
    assert _routed(compiled) == ["gpt_neox.layers.0", "gpt_neox.layers.1"]
    with torch.no_grad():
        assert torch.equal(_logits(compiled(ids)), _logits(neox(ids)))


def test_falcon_parallel_block_with_one_shared_norm_is_routed_and_exact_at_capacity_one():
    """Falcon: one layer norm feeds attention and MLP, and `dropout_add(mlp + attn, h)` sums in the layer."""
    torch.manual_seed(0)
    config = hf.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             use_cache=False)
    model, ids = hf.FalconForCausalLM(config).eval(), tokens()
    compiled = sparsecc.compile(model, (ids,), sparsity={"tokens": {"capacity": 1.0, "layers": EVERY_BLOCK}})
    assert _routed(compiled) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    with torch.no_grad():
        assert torch.equal(_logits(compiled(ids)), _logits(model(ids)))


def test_shape_literals_and_pair_counts_rescale_to_the_kept_tokens():
    """B=2, S=8, K=4: an inferred dim takes up the tokens, so `[-1, 8]` (8 experts) stays; pair counts scale."""
    assert rescale_shape([-1, 8], 2, 8, 4) == [-1, 8]
    assert rescale_shape([2, 8, -1], 2, 8, 4) == [2, 4, -1]
    assert rescale_shape([16, 32], 2, 8, 4) == [8, 32]
    assert rescale_count(2 * 8 * 3, 2, 8, 4) == 2 * 4 * 3 and rescale_count(7, 2, 8, 4) == 7
