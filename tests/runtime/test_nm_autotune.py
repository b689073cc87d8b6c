"""The CUDA path choice of nm_linear: candidates, the JSON cache, and (on a GPU) both paths and the tuning."""
import json
from functools import partial

import pytest
import torch

from sparsecc.runtime.kernels import cusparselt, nm_autotune, tuning_cache
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask


def test_candidates_offer_the_sparse_gemms_only_for_large_2_4_half_gemms(monkeypatch):
    monkeypatch.setattr(cusparselt, "available", lambda: False)
    assert nm_autotune.candidates(256, 2, 4, torch.float16) == ["triton", "semi_structured"]
    assert nm_autotune.candidates(256, 2, 4, torch.bfloat16) == ["triton", "semi_structured"]
    assert nm_autotune.candidates(8, 2, 4, torch.float16) == ["triton"]
    assert nm_autotune.candidates(256, 4, 8, torch.float16) == ["triton"]
    assert nm_autotune.candidates(256, 2, 4, torch.float32) == ["triton"]
    monkeypatch.setattr(cusparselt, "available", lambda: True)     # torch built with cuSPARSELt, a GPU present
    assert nm_autotune.candidates(256, 2, 4, torch.float16, 4096, 4096) == ["triton", "cusparselt", "semi_structured"]
    assert nm_autotune.candidates(256, 2, 4, torch.float16, 4096, 4104) == ["triton", "semi_structured"]  # not /16
    assert nm_autotune.candidates(8, 2, 4, torch.float16, 4096, 4096) == ["triton"]            # decode: Triton
    assert nm_autotune.candidates(8, 2, 4, torch.float16, 64, 64, keep="speed") == ["triton", "dense"]
    assert nm_autotune.candidates(8, 4, 8, torch.float32, 64, 64, keep="speed") == ["triton", "dense"]


def test_tuning_leaves_out_a_candidate_whose_numbers_disagree_with_the_reference():
    want = torch.randn(8, 16)
    runners = {"reference": lambda: want, "close": lambda: want + 1e-4, "wrong": lambda: want.flip(0),
               "nan": lambda: want * float("nan"), "shape": lambda: want[:4], "half": lambda: want.half()}
    for name, run in runners.items():
        run.__name__ = name
    clock = {"reference": 2.0, "close": 1.0}                 # every other one would be fastest of all
    entry = tuning_cache.fastest(runners, lambda run: clock.get(run.__name__, 0.5),
                                 check=partial(nm_autotune.disagreement, want=want))
    assert entry["path"] == "close" and entry["ms"] == {**entry["ms"], "reference": 2.0, "close": 1.0}
    assert entry["ms"]["wrong"].startswith("disagrees: relative error")
    assert entry["ms"]["nan"].startswith("disagrees: relative error nan")
    assert entry["ms"]["shape"] == "disagrees: torch.float32[4, 16] != torch.float32[8, 16]"
    assert entry["ms"]["half"].startswith("disagrees: torch.float16[8, 16]")


def test_a_candidate_failing_in_any_way_untimed_or_timed_is_left_out_with_the_reason():
    def typo():
        raise TypeError("an untested library call")
    calls = {"flaky": 0}

    def flaky_clock(run):
        if run.__name__ == "flaky":
            calls["flaky"] += 1
            raise MemoryError("out of memory in a timed call")
        return 1.0
    runners = {"ok": lambda: torch.ones(2), "typo": typo, "flaky": lambda: torch.ones(2)}
    runners["ok"].__name__, runners["flaky"].__name__ = "ok", "flaky"
    with pytest.warns(UserWarning, match="'typo' failed while being tuned .* looks like a bug"):
        entry = tuning_cache.fastest(runners, flaky_clock, rounds=3)    # a MemoryError is expected: no warning
    assert entry["path"] == "ok" and calls["flaky"] == 1
    assert entry["ms"]["typo"] == "unavailable: TypeError: an untested library call"
    assert entry["ms"]["flaky"] == "unavailable: MemoryError: out of memory in a timed call"


def test_autotune_checks_every_candidate_against_the_dense_product_and_drops_the_losers_copies(monkeypatch):
    values, indices, dense = _weights(32, 64, torch.float16, device="cpu")
    x = torch.randn(64, 64, dtype=torch.float16)
    right = torch.nn.functional.linear(x, dense)
    cusparselt.packed_weights.get(values, indices, torch.float16, lambda: torch.empty(1))   # its untimed run's
    nm_autotune._dense_weights.get(values, indices, torch.float16, lambda: dense)
    monkeypatch.setattr(nm_autotune, "candidates", lambda *a, **k: ["triton", "cusparselt", "dense"])
    monkeypatch.setattr(nm_autotune, "RUNNERS", {"triton": lambda *a: right, "cusparselt": lambda *a: -right,
                                                 "dense": lambda *a: right.clone()})
    monkeypatch.setattr(nm_autotune, "_time_ms", lambda run: 1.0 if run() is right else 0.5)
    entry = nm_autotune.autotune(x, values, indices, None, 2, 4, 64, keep="speed")
    assert entry["path"] == "dense" and entry["ms"]["cusparselt"].startswith("disagrees: relative error 2")
    assert cusparselt.packed_weights.kept(values) is None and nm_autotune._dense_weights.kept(values) is dense


def test_a_remembered_path_this_machine_cannot_take_falls_back_to_triton(monkeypatch):
    monkeypatch.delenv("SPARSECC_NM_PATH", raising=False)
    monkeypatch.setattr(cusparselt, "available", lambda: False)       # a choice file from a machine that had it
    monkeypatch.setattr(nm_autotune, "tuning_key", lambda *a: "key")
    monkeypatch.setattr(nm_autotune, "remembered", lambda key, tune: {"path": "cusparselt"})
    x = torch.randn(128, 64, dtype=torch.float16)
    assert nm_autotune.choose_path(x, torch.empty(32, 32), None, None, 2, 4, 64) == "triton"


def test_no_candidate_is_the_reference_so_a_failing_one_hands_nothing_on():
    """Each output is checked against the dense product, not against whichever path ran first."""
    def broken():
        raise RuntimeError("no Triton here")
    want = torch.ones(4)
    entry = tuning_cache.fastest({"triton": broken, "wrong": lambda: -want, "right": lambda: want.clone()},
                                 lambda run: 1.0, check=partial(nm_autotune.disagreement, want=want))
    assert entry["path"] == "right" and entry["ms"]["wrong"].startswith("disagrees")
    assert entry["ms"]["triton"] == "unavailable: RuntimeError: no Triton here"


def _fake_cusparselt(monkeypatch, calls):
    """cuSPARSELt's documented contract on CPU tensors: compress keeps the pruned matrix (a stand-in for its
    packed form), sparse_mm(A, B, bias, transpose_result) = (A @ B + bias[:, None]) transposed when asked."""
    def compress(dense):
        calls.append("compress")
        assert dense.is_contiguous()
        return dense.clone()

    def sparse_mm(packed, dense_b, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0,
                  split_k=1, split_k_mode=-1):
        calls.append(("mm", tuple(dense_b.shape), dense_b.stride(), alg_id))
        assert dense_b.shape[1] % cusparselt.TOKEN_MULTIPLE == 0
        y = packed.float() @ dense_b.float() + (0 if bias is None else bias.float()[:, None])
        return (y.t() if transpose_result else y).contiguous().to(packed.dtype)

    def search(packed, dense_b, bias=None, alpha=None, out_dtype=None, transpose_result=False):
        calls.append("search")
        return 3
    monkeypatch.setattr(torch, "_cslt_compress", compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search)
    monkeypatch.setattr(cusparselt, "_algorithms", {})


def test_cusparselt_path_passes_x_transposed_pads_tokens_and_keeps_its_compressed_weight(monkeypatch):
    calls = []
    _fake_cusparselt(monkeypatch, calls)
    values, indices, dense = _weights(32, 64, torch.bfloat16, device="cpu")
    bias = torch.randn(32, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)               # 10 tokens: padded to 16
    got = cusparselt.nm_linear_cusparselt(x, values, indices, bias, 2, 4, 64)
    want = torch.nn.functional.linear(x.float(), dense.float(), bias.float())
    assert got.shape == (2, 5, 32) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)
    assert calls == ["compress", "search", ("mm", (64, 16), (1, 64), 3)]     # x^T as a column-major view
    cusparselt.nm_linear_cusparselt(x[:, :4], values, indices, None, 2, 4, 64)   # 8 tokens: another bucket
    cusparselt.nm_linear_cusparselt(x[:, :4], values, indices, None, 2, 4, 64)   # the same: nothing searched
    assert calls[3:] == ["search", ("mm", (64, 8), (1, 64), 3), ("mm", (64, 8), (1, 64), 3)]
    values.mul_(2)                                                 # an in-place change: compressed again
    got = cusparselt.nm_linear_cusparselt(x, values, indices, bias, 2, 4, 64)
    assert calls[6] == "compress"
    torch.testing.assert_close(got.float(), torch.nn.functional.linear(x.float(), 2 * dense.float(), bias.float()),
                               rtol=2e-2, atol=1e-1)


def test_cusparselt_path_refuses_what_cusparselt_cannot_run():
    values, indices, _ = _weights(24, 64, torch.float16, device="cpu")
    with pytest.raises(NotImplementedError, match=r"weight \[24, 64\]: both sizes must be multiples of 16"):
        cusparselt.nm_linear_cusparselt(torch.randn(8, 64, dtype=torch.float16), values, indices, None, 2, 4, 64)
    with pytest.raises(NotImplementedError, match="fp16/bf16 only"):
        cusparselt.nm_linear_cusparselt(torch.randn(8, 64), values.float(), indices, None, 2, 4, 64)


def test_copies_of_inference_tensors_are_made_every_call_not_kept_stale():
    """An inference tensor has no version counter: nothing proves a kept copy current, so none is reused."""
    with torch.inference_mode():
        values, indices, dense = _weights(16, 32, torch.float32, device="cpu")
        x = torch.randn(3, 32)
        first = nm_autotune.RUNNERS["dense"](x, values, indices, None, 2, 4, 32)
        values.mul_(-1)
        torch.testing.assert_close(nm_autotune.RUNNERS["dense"](x, values, indices, None, 2, 4, 32), -first)


def test_dense_copy_path_is_made_once_per_weight_version_and_matches():
    values, indices, dense = _weights(16, 32, torch.float32, device="cpu")
    x = torch.randn(3, 32)
    torch.testing.assert_close(nm_autotune.RUNNERS["dense"](x, values, indices, None, 2, 4, 32), x @ dense.T)
    kept = nm_autotune._dense_weights.kept(values)
    nm_autotune.RUNNERS["dense"](x, values, indices, None, 2, 4, 32)
    assert nm_autotune._dense_weights.kept(values) is kept
    values.mul_(-1)
    torch.testing.assert_close(nm_autotune.RUNNERS["dense"](x, values, indices, None, 2, 4, 32), -(x @ dense.T))


def test_choices_are_written_atomically_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    tuning_cache.forget()
    tuning_cache.store("GPU|float16|2:4|64x64|tokens<=128", {"path": "semi_structured", "ms": {"triton": 2.0}})
    on_disk = json.loads((tmp_path / "nm_autotune.json").read_text())
    assert on_disk["GPU|float16|2:4|64x64|tokens<=128"]["path"] == "semi_structured"
    assert [p.name for p in tmp_path.iterdir()] == ["nm_autotune.json"]      # no temp file left behind
    tuning_cache.forget()
    assert tuning_cache.choices() == on_disk
    tuned = []
    entry = tuning_cache.remembered("GPU|float16|2:4|64x64|tokens<=128", lambda: tuned.append(1))
    assert entry["path"] == "semi_structured" and not tuned      # remembered: not measured again
    tuning_cache.forget()


def test_the_fastest_candidate_wins_and_a_failing_one_says_why():
    def broken():
        raise RuntimeError("no kernel for this shape")
    clock = {"slow": [3.0, 0.5, 3.0], "fast": [1.0, 1.0, 9.0]}     # medians 3.0 and 1.0: one outlier each
    entry = tuning_cache.fastest({"slow": lambda: "slow", "fast": lambda: "fast", "broken": broken},
                                 lambda run: clock[run()].pop(0), rounds=3)
    assert entry["path"] == "fast" and entry["ms"]["fast"] == 1.0 and entry["ms"]["slow"] == 3.0
    assert entry["ms"]["broken"].startswith("unavailable: RuntimeError: no kernel")


def test_forced_path_is_checked(monkeypatch):
    monkeypatch.setenv("SPARSECC_NM_PATH", "cusparse")
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="SPARSECC_NM_PATH='cusparse'"):
        nm_autotune.choose_path(x, x, x, None, 2, 4, 8)
    monkeypatch.setenv("SPARSECC_NM_PATH", "dense")
    with pytest.raises(ValueError, match='only for keep="speed"'):
        nm_autotune.choose_path(x, x, x, None, 2, 4, 8)
    assert nm_autotune.choose_path(x, x, x, None, 2, 4, 8, keep="speed") == "dense"


def _weights(out: int, k: int, dtype, device="cuda"):
    w = torch.randn(out, k, dtype=dtype, device=device)
    values, indices = compress_nm(w, 2, 4, mask=nm_mask(w.abs(), 2, 4))
    return values, indices, decompress_nm(values, indices, 2, 4, k)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["triton", "cusparselt", "semi_structured", "dense"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [128, 37])       # 2 x 37: padded to a multiple of 8 for cuSPARSELt
def test_every_cuda_path_matches_the_dense_pruned_linear(path, dtype, tokens):
    values, indices, dense = _weights(256, 512, dtype)
    bias = torch.randn(256, dtype=dtype, device="cuda")
    x = torch.randn(2, tokens, 512, dtype=dtype, device="cuda")
    got = nm_autotune.RUNNERS[path](x, values, indices, bias, 2, 4, 512)
    want = torch.nn.functional.linear(x.float(), dense.float(), bias.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
def test_autotune_times_every_path_and_caches_the_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSECC_NM_PATH", raising=False)
    tuning_cache.forget()
    values, indices, dense = _weights(1024, 1024, torch.float16)
    x = torch.randn(512, 1024, dtype=torch.float16, device="cuda")
    y = torch.ops.sparsecc.nm_linear(x, values, indices, None, 2, 4, 1024)   # the registered CUDA kernel
    torch.testing.assert_close(y.float(), x.float() @ dense.float().T, rtol=2e-2, atol=2e-1)
    entry = next(iter(json.loads((tmp_path / "nm_autotune.json").read_text()).values()))
    paths = {"triton", "semi_structured"} | ({"cusparselt"} if cusparselt.available() else set())
    assert entry["path"] in paths and set(entry["ms"]) == paths
    assert all(isinstance(ms, float) for ms in entry["ms"].values()), entry    # none failed or disagreed
    assert isinstance(entry["ms"]["triton"], float)
    print("autotune:", entry)
