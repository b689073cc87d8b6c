"""The per-layer memo of checked calls: found by the same tensor only, gone with it."""
from __future__ import annotations

import gc

import torch

from sparsecc.runtime.kernels.cpu.layer_calls import LayerCalls


def test_a_runner_is_found_for_the_same_tensor_and_key_only():
    calls = LayerCalls(max_keys_per_layer=2)
    weight, other = torch.randn(4, 4), torch.randn(4, 4)
    calls.put(weight, "k", len)
    assert calls.get(weight, "k") is len
    assert calls.get(weight, "j") is None and calls.get(other, "k") is None


def test_an_entry_goes_with_its_tensor_and_a_new_tensor_never_finds_it():
    calls = LayerCalls(max_keys_per_layer=2)
    weight = torch.randn(4, 4)
    calls.put(weight, "k", len)
    ident = id(weight)
    del weight
    gc.collect()
    assert ident not in calls._by_id
    fresh = [torch.randn(4, 4) for _ in range(64)]   # one may reuse the id: it must not see the old runner
    assert all(calls.get(t, "k") is None for t in fresh)


def test_keys_per_layer_are_bounded():
    calls = LayerCalls(max_keys_per_layer=2)
    weight = torch.randn(4, 4)
    for key in range(5):
        calls.put(weight, key, len)
    assert sum(calls.get(weight, key) is len for key in range(5)) <= 2 and calls.get(weight, 4) is len
