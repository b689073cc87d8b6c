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


def test_environ_value_follows_the_environment_as_os_environ_changes_it(monkeypatch):
    from sparsecc.runtime.kernels.cpu.layer_calls import environ_value
    monkeypatch.delenv("SPARSECC_TEST_SETTING", raising=False)
    assert environ_value("SPARSECC_TEST_SETTING") is None
    monkeypatch.setenv("SPARSECC_TEST_SETTING", "generated")
    first = environ_value("SPARSECC_TEST_SETTING")
    monkeypatch.setenv("SPARSECC_TEST_SETTING", "tiles")
    second = environ_value("SPARSECC_TEST_SETTING")
    assert first in ("generated", b"generated") and second in ("tiles", b"tiles") and first != second
    monkeypatch.delenv("SPARSECC_TEST_SETTING")
    assert environ_value("SPARSECC_TEST_SETTING") is None


def test_a_forced_path_set_between_calls_reaches_the_next_call(monkeypatch):
    """The memo key reads SPARSECC_NM_CPU_PATH through environ_value: a change takes effect at once."""
    from sparsecc.runtime.kernels.cpu import nm_paths
    from sparsecc.runtime.kernels.cpu.nm_linear import nm_linear_cpu
    from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask
    weight = torch.randn(24, 64)
    values, indices = compress_nm(weight, 2, 4, mask=nm_mask(weight.abs(), 2, 4))
    x = torch.randn(1, 64)
    taken = []
    for path in ("tiles", "whole"):
        monkeypatch.setenv(nm_paths.FORCE_ENV, path)
        monkeypatch.setitem(nm_paths.RUNNERS, path,
                            lambda *args, p=path, run=nm_paths.RUNNERS[path]: taken.append(p) or run(*args))
        y = nm_linear_cpu(x, values, indices, None, 2, 4, 64)
        torch.testing.assert_close(y, x @ decompress_nm(values, indices, 2, 4, 64).T, rtol=1e-5, atol=1e-5)
    assert taken == ["tiles", "whole"]
