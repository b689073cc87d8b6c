"""token-routing on transformers models (tiny configs, random weights): Llama, GPT-2, Mixtral with moe-dispatch."""
import pytest
import sparsecc
import torch

from ..hf_attention import gpt2, ids_and_padding, llama
from ..hf_moe import mixtral, qwen2_moe


def _logits(out):
    return out["logits"]


def test_llama_capacity_one_is_exact():
    model, ids = llama("sdpa", layers=2), torch.randint(0, 64, (2, 10))
    compiled = sparsecc.compile(model, (ids,), sparsity={"tokens": {"capacity": 1.0, "layers": ["*"]}})
    assert [r.layer for r in compiled.report().layers] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with torch.no_grad():
        assert torch.equal(_logits(compiled(ids)), _logits(model(ids)))


def test_gpt2_mlp_with_flattened_conv1d_shapes_is_routed():
    model, ids = gpt2("sdpa", layers=2), torch.randint(0, 64, (2, 10))
    compiled = sparsecc.compile(model, (ids,), sparsity={"tokens": {"capacity": 0.5, "layers": ["*"]}})
    layers = compiled.report().layers
    assert [r.layer for r in layers] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    addmms = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.aten.addmm.default
              and "mlp" in str(n.meta.get("nn_module_stack"))]
    assert addmms and all(n.meta["val"].shape[0] == 2 * 5 for n in addmms)   # B*K rows, not B*S
    assert 0 < compiled.report().error_vs_dense < 1


def test_mixtral_only_routed_tokens_reach_the_experts():
    model, ids = mixtral(layers=2), torch.randint(0, 64, (2, 8))
    compiled = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch",
                                                         "tokens": {"capacity": 0.5, "layers": ["*"]}})
    graph = compiled.graph_module.graph
    moes = [n for n in graph.nodes if n.target is torch.ops.sparsecc.moe.default]
    assert len(moes) == 2 and all(n.meta["val"].shape[0] == 2 * 4 for n in moes)
    routes = [r for r in compiled.report().layers if r.op == "sparsecc.route"]
    assert [r.layer for r in routes] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert routes[0].flops_after < 0.55 * routes[0].flops_before


def test_mixtral_capacity_one_with_dispatch_matches_the_model():
    model, ids = mixtral(layers=1), torch.randint(0, 64, (2, 8))
    routed = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch", "tokens": {"capacity": 1.0, "layers": ["*"]}})
    assert [r.op for r in routed.report().layers] == ["sparsecc.moe", "sparsecc.route"]
    with torch.no_grad():
        torch.testing.assert_close(_logits(routed(ids)), _logits(model(ids)), rtol=1e-4, atol=1e-5)


def test_llama_layer_routing_at_capacity_one_is_exact():
    model, ids = llama("sdpa", layers=2), torch.randint(0, 64, (2, 10))
    compiled = sparsecc.compile(model, (ids,), sparsity={"tokens": {"capacity": 1.0, "where": "layer",
                                                                    "layers": ["*"]}})
    assert [r.layer for r in compiled.report().layers] == ["model.layers.0", "model.layers.1"]
    with torch.no_grad():
        assert torch.equal(_logits(compiled(ids)), _logits(model(ids)))


def test_llama_routed_layer_attends_causally_among_kept_tokens_at_their_positions():
    model, ids = llama("sdpa", layers=1), torch.randint(0, 64, (1, 12))
    compiled = sparsecc.compile(model, (ids,), sparsity={"tokens": {"capacity": 0.5, "where": "layer",
                                                                    "layers": ["*"]}})
    inner, layer = model.model, model.model.layers[0]
    with torch.no_grad():
        hidden = inner.embed_tokens(ids)
        kept = torch.ops.sparsecc.route(torch.linalg.vector_norm(layer.input_layernorm(hidden), dim=-1), 0.5)
        sub = hidden[:, kept[0]]
        cos_sin = inner.rotary_emb(sub, kept)                  # rotary at the tokens' original positions
        routed = layer(sub, attention_mask=None, position_ids=kept, position_embeddings=cos_sin)  # causal
        routed = routed[0] if isinstance(routed, tuple) else routed
        full = hidden.clone()
        full[:, kept[0]] = routed
        expected = model.lm_head(inner.norm(full))
        torch.testing.assert_close(_logits(compiled(ids)), expected, rtol=1e-5, atol=1e-5)
    assert compiled.report().layers[0].details["kept"] == 6


def test_gpt2_layers_are_routed_with_their_mask():
    model, ids = gpt2("sdpa", layers=2), torch.randint(0, 64, (2, 10))
    compiled = sparsecc.compile(model, (ids,), sparsity={"tokens": {"capacity": 0.5, "where": "layer",
                                                                    "layers": ["*"]}})
    layers = compiled.report().layers
    assert [r.layer for r in layers] == ["transformer.h.0", "transformer.h.1"]
    attention = [n for n in compiled.graph_module.graph.nodes
                 if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(attention) == 2 and all(n.meta["val"].shape[2] == 5 for n in attention)
    assert layers[0].flops_after < 0.55 * layers[0].flops_before


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_llama_layer_routing_gathers_a_padding_mask(attn):
    model, (ids, mask) = llama(attn, layers=1), ids_and_padding(2, 12, 4)
    exact = sparsecc.compile(model, (ids, mask), sparsity={"tokens": {"capacity": 1.0, "where": "layer",
                                                                      "layers": ["*"]}})
    with torch.no_grad():
        assert torch.equal(_logits(exact(ids, mask)), _logits(model(ids, attention_mask=mask)))
    graph = exact.graph_module.graph
    gathers = [n for n in graph.nodes if n.target is torch.ops.aten.gather.default]
    assert len(gathers) == 2 and gathers[-1].meta["val"].shape[-2:] == (12, 12)   # rows, then columns


def test_mixtral_layers_route_around_the_dispatched_experts():
    model, ids = mixtral(layers=1), torch.randint(0, 64, (2, 10))
    compiled = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch", "tokens": {
        "capacity": 0.5, "where": "layer", "layers": ["*"]}})
    assert [r.op for r in compiled.report().layers] == ["sparsecc.moe", "sparsecc.route"]
    moe = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.sparsecc.moe.default]
    assert moe[0].meta["val"].shape[0] == 2 * 5


def test_qwen2_moe_with_shared_expert_routes_its_mlp():
    model, ids = qwen2_moe(layers=1), torch.randint(0, 64, (2, 10))
    compiled = sparsecc.compile(model, (ids,), sparsity={"moe": "dispatch", "tokens": {"capacity": 0.5, "layers": ["*"]}})
    assert [r.op for r in compiled.report().layers] == ["sparsecc.moe", "sparsecc.route"]
    moe = [n for n in compiled.graph_module.graph.nodes if n.target is torch.ops.sparsecc.moe.default]
    assert moe[0].meta["val"].shape[0] == 2 * 5 and 0 < compiled.report().error_vs_dense < 1
