"""The CUDA path choice of nm_linear: candidates, the JSON cache, and (on a GPU) both paths and the tuning."""
import json

import pytest
import torch

from sparsecc.runtime.kernels import nm_autotune, tuning_cache
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask


def test_candidates_offer_semi_structured_only_for_large_2_4_half_gemms():
    assert nm_autotune.candidates(256, 2, 4, torch.float16) == ["triton", "semi_structured"]
    assert nm_autotune.candidates(256, 2, 4, torch.bfloat16) == ["triton", "semi_structured"]
    assert nm_autotune.candidates(8, 2, 4, torch.float16) == ["triton"]
    assert nm_autotune.candidates(256, 4, 8, torch.float16) == ["triton"]
    assert nm_autotune.candidates(256, 2, 4, torch.float32) == ["triton"]


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


def _weights(out: int, k: int, dtype, device="cuda"):
    w = torch.randn(out, k, dtype=dtype, device=device)
    values, indices = compress_nm(w, 2, 4, mask=nm_mask(w.abs(), 2, 4))
    return values, indices, decompress_nm(values, indices, 2, 4, k)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["triton", "semi_structured"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_cuda_paths_match_the_dense_pruned_linear(path, dtype):
    values, indices, dense = _weights(256, 512, dtype)
    bias = torch.randn(256, dtype=dtype, device="cuda")
    x = torch.randn(2, 128, 512, dtype=dtype, device="cuda")
    got = nm_autotune.RUNNERS[path](x, values, indices, bias, 2, 4, 512)
    want = torch.nn.functional.linear(x.float(), dense.float(), bias.float())
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
def test_autotune_times_both_paths_and_caches_the_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSECC_NM_PATH", raising=False)
    tuning_cache.forget()
    values, indices, dense = _weights(1024, 1024, torch.float16)
    x = torch.randn(512, 1024, dtype=torch.float16, device="cuda")
    y = torch.ops.sparsecc.nm_linear(x, values, indices, None, 2, 4, 1024)   # the registered CUDA kernel
    torch.testing.assert_close(y.float(), x.float() @ dense.float().T, rtol=2e-2, atol=2e-1)
    entry = next(iter(json.loads((tmp_path / "nm_autotune.json").read_text()).values()))
    assert entry["path"] in ("triton", "semi_structured")
    assert set(entry["ms"]) == {"triton", "semi_structured"}
    assert isinstance(entry["ms"]["triton"], float)
    print("autotune:", entry)
