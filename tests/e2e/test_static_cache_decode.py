"""Decode steps over a transformers StaticCache: the KV cache is program state.

A tiny random Llama (hidden 64, 2 layers, vocab 128, fp32) wrapped so that one call is one
decode step: it writes the new token's keys and values into the cache buffers at
`cache_position` and returns the logits. The compiled program must give eager's logits at
every step of a run (its own cache filling up as eager's does), and leave the user's model
and cache untouched.
"""
from __future__ import annotations

import copy

import pytest
import torch

import sparsecc

transformers = pytest.importorskip("transformers")

STEPS = 5
MAX_CACHE = 8
HEADS, KV_HEADS, HIDDEN = 4, 2, 64


class DecodeStep(torch.nn.Module):
    """One token in, logits out; the StaticCache's tensors are this module's buffers."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=MAX_CACHE)
        self.cache.early_initialization(1, KV_HEADS, HIDDEN // HEADS, torch.float32, "cpu")
        for i, layer in enumerate(self.cache.layers):
            self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
            self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
            self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        out = self.model(input_ids=input_ids, cache=self.cache, use_cache=True,
                         position_ids=cache_position.unsqueeze(0))
        return out.logits


@pytest.fixture(scope="module")
def decode_step() -> DecodeStep:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=128,
                                      max_position_embeddings=64)
    return DecodeStep(transformers.LlamaForCausalLM(config).eval())


def step_inputs(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[3 + 7 * step]]), torch.tensor([step])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: t.detach().clone() for name, t in tensors}


def decode(step_fn, steps: int = STEPS) -> list[torch.Tensor]:
    with torch.no_grad():
        return [step_fn(*step_inputs(step)).clone() for step in range(steps)]


@pytest.fixture(scope="module")
def dense_step(decode_step) -> tuple[dict[str, torch.Tensor], sparsecc.CompiledModel]:
    """(the step's tensors before compiling, the step compiled with no sparsity request): compiled once for the
    tests below (seconds each); each resets its state first."""
    before = snapshot(decode_step)
    return before, sparsecc.compile(decode_step, step_inputs(0))


@pytest.mark.parametrize("sparsity", [None, "2:4"])
def test_decode_steps_match_eager_and_leave_the_model_untouched(decode_step, dense_step, sparsity):
    if sparsity is None:
        before, cm = dense_step
        cm.reset_state()
    else:
        before = snapshot(decode_step)
        cm = sparsecc.compile(decode_step, step_inputs(0), sparsity=sparsity)
    reference = DecodeStep(copy.deepcopy(decode_step.model))   # its own, empty cache
    if sparsity is not None:
        reference.load_state_dict(cm.pruned_state_dict(), strict=False)
        assert cm.report().error_vs_reference < 1e-5
    assert len(cm.program.state_names) >= 4    # both layers' key and value caches
    for step, (got, want) in enumerate(zip(decode(cm), decode(reference))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"decode step {step}: {m}")
    after = snapshot(decode_step)
    assert [n for n, t in before.items() if not torch.equal(t, after[n])] == []
    for layer in decode_step.cache.layers:   # the user's cache: still empty, still a plain leaf tensor
        assert not layer.keys.any() and not layer.values.any() and layer.keys.is_leaf and not layer.keys.requires_grad


def test_reset_state_empties_the_cache(dense_step):
    cm = dense_step[1]
    cm.reset_state()
    first = decode(cm, 2)
    cm.reset_state()
    assert all(not t.any() for name, t in cm.state_dict().items() if "cumulative" not in name)
    torch.testing.assert_close(decode(cm, 2), first, rtol=0, atol=0)


def test_a_loaded_artifact_decodes_with_its_own_cache(decode_step, dense_step, tmp_path):
    cm = dense_step[1]
    cm.reset_state()
    cm.save(str(tmp_path), targets=["cpu"], progress=False)
    loaded = sparsecc.runtime.load(str(tmp_path))
    want = decode(DecodeStep(copy.deepcopy(decode_step.model)))
    for step, (got, expected) in enumerate(zip(decode(loaded), want)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"decode step {step}: {m}")
    assert all(not t.any() for name, t in cm.state_dict().items() if "cumulative" not in name)
