"""prune_checkpoint prunes MoE experts as compile does (inside sparsecc::moe), writes them under the checkpoint's
own per-expert names in the shards and the compressed tensors, and compile(compressed=) takes them back
(Mixtral; Qwen2-MoE with a shared expert)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import sparsecc

transformers = pytest.importorskip("transformers")

VOCAB = 128
SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             num_experts_per_tok=2, use_cache=False, tie_word_embeddings=False)
FAMILIES = {   # config, model class, a checkpoint name of an expert (transformers stacks them into one parameter)
    "mixtral": (lambda: transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, **SIZES),
                "MixtralForCausalLM", "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
    "qwen2_moe": (lambda: transformers.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                                      num_experts=4, **SIZES),   # with a shared expert
                  "Qwen2MoeForCausalLM", "model.layers.0.mlp.experts.3.up_proj.weight"),
}


def _batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=generator) for _ in range(2)]


def _saved(family: str, folder) -> torch.nn.Module:
    """A random 1-layer model of `family` saved to `folder` as small shards (experts one tensor each)."""
    config, cls, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config()).eval()
    model.save_pretrained(folder, max_shard_size="100KB")
    return model


# each method on one family (every case costs a prune and three compiles: ~13-26 s each on the shared 2 cores)
@pytest.mark.slow
@pytest.mark.parametrize("family, method", [("mixtral", "wanda"), ("qwen2_moe", "magnitude")])
def test_experts_pruned_as_compile_prunes_them(tmp_path, family, method):
    path, out = tmp_path / "dense", tmp_path / "pruned"
    model = _saved(family, path)
    _, cls, expert_name = FAMILIES[family]
    request = {"weights": {"pattern": "2:4", "method": method}}
    summary = sparsecc.prune_checkpoint(path, out, "2:4", method, calibration=_batches(), progress=False)
    shared = 3 if family == "qwen2_moe" else 0
    assert summary.weights == 4 + 4 * 3 + shared + 1    # attention, 4 experts x 3 matrices, shared expert, lm_head

    by_method = sparsecc.compile(model, (_batches()[0],), sparsity=request, calibration=_batches(), check=False)
    expected = by_method.pruned_state_dict()
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"} <= set(expected)
    pruned_model = getattr(transformers, cls).from_pretrained(out).eval()
    loaded = pruned_model.state_dict()
    for name, weight in expected.items():
        assert torch.equal(loaded[name], weight), name

    compressed = sparsecc.load_compressed(out)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert expert_name in compressed.weights and len(compressed.weights) == summary.weights
    for name in compressed.weights:   # under the checkpoint's names, equal to the dense shards' tensors
        with safe_open(out / weight_map[name], "pt") as f:
            assert torch.equal(compressed.dense(name), f.get_tensor(name)), name

    # compile takes them back, experts included (a shared expert is built from several parameters), same outputs
    given = sparsecc.compile(pruned_model, (_batches()[0],), sparsity=request, compressed=out, check=False)
    experts = [r for r in given.report().layers if "expert" in r.layer]
    assert len(experts) == 1 + bool(shared)
    assert all(r.details["calibration"] == f"none: masks taken from {out}" for r in experts)
    for ids in _batches():
        assert torch.equal(given(ids).logits, by_method(ids).logits)
