"""The CPU paths of nm_linear and the measured choice between them (kernels/cpu/nm_paths.py)."""
import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.runtime.kernels import tuning_cache
from sparsecc.runtime.kernels.cpu import nm_paths
from sparsecc.runtime.kernels.cpu.mlir.nm_decode import decode_spec
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask


def weight(out: int, k: int, dtype=torch.float32, n: int = 2, m: int = 4):
    w = torch.randn(out, k).to(dtype)
    values, indices = compress_nm(w, n, m, mask=nm_mask(w.float().abs(), n, m))
    return values, indices, decompress_nm(values, indices, n, m, k)


@pytest.fixture
def fresh_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("SPARSECC_NM_CPU_PATH", raising=False)
    tuning_cache.forget()
    yield tmp_path
    tuning_cache.forget()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("path", nm_paths.PATHS)
def test_every_path_computes_the_pruned_linear(path, tokens, dtype):
    values, indices, dense = weight(300, 128, dtype)
    x, bias = torch.randn(tokens, 128).to(dtype), torch.randn(300).to(dtype)
    if path == "generated" and decode_spec(x, values, 2, 4, 128) is None:
        pytest.skip("no generated decode kernel for this call on this host")
    got = nm_paths.RUNNERS[path](x, values, indices, bias, 2, 4, 128)
    want = F.linear(x.float(), dense.float(), bias.float())
    tolerance = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    assert got.dtype == dtype and got.shape == (tokens, 300)
    torch.testing.assert_close(got.float(), want, **tolerance)


def test_candidates_follow_the_token_count_and_keep():
    values, _, _ = weight(64, 128)
    few, many = torch.randn(4, 128), torch.randn(64, 128)
    generated = ["generated"] if decode_spec(few, values, 2, 4, 128) else []
    assert nm_paths.candidates(few, values, 2, 4, 128, "memory") == generated + ["whole", "tiles"]
    assert nm_paths.candidates(many, values, 2, 4, 128, "memory") == ["whole", "tiles"]
    assert nm_paths.candidates(many, values, 2, 4, 128, "speed") == ["whole", "tiles", "dense"]


def test_the_choice_is_measured_once_per_bucket_and_remembered(fresh_tuning, monkeypatch):
    values, indices, _ = weight(64, 128)
    timed = []

    def clock(run):   # "dense" measures fastest; each measurement is counted
        timed.append(run.func.__name__)
        return {"dense": 1.0}.get(run.func.__name__, 2.0)
    monkeypatch.setattr(nm_paths, "cpu_ms", clock)
    x = torch.randn(40, 128)
    assert nm_paths.choose_path(x, values, indices, None, 2, 4, 128, "speed") == "dense"
    assert nm_paths.choose_path(torch.randn(33, 128), values, indices, None, 2, 4, 128, "speed") == "dense"
    rounds, samples = nm_paths.TUNING_ROUNDS, nm_paths.SAMPLES_PER_ROUND   # 33 and 40 tokens: one bucket, one tuning
    assert timed == [path for path in ("whole", "tiles", "dense") for _ in range(samples)] * rounds
    [entry] = nm_paths.decisions(torch.float32, 2, 4, 64, 128)
    assert entry["tokens"] == 64 and entry["keep"] == "speed" and entry["path"] == "dense"
    assert (fresh_tuning / "nm_autotune.json").exists()


def test_a_dense_copy_timed_but_not_chosen_is_dropped(fresh_tuning, monkeypatch):
    values, indices, _ = weight(64, 128)
    def clock(run):   # "dense" (which made its copy in the untimed first call) measures slowest
        return {"dense": 3.0}.get(run.func.__name__, 1.0)
    monkeypatch.setattr(nm_paths, "cpu_ms", clock)
    assert nm_paths.choose_path(torch.randn(40, 128), values, indices, None, 2, 4, 128, "speed") == "whole"
    assert not nm_paths.holds_dense_copy(values)


def test_a_forced_path_is_checked_and_used_where_it_applies(fresh_tuning, monkeypatch):
    values, indices, _ = weight(64, 128)
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "tiles")
    assert nm_paths.choose_path(torch.randn(1, 128), values, indices, None, 2, 4, 128, "memory") == "tiles"
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "dense")       # keep="memory": no dense copy kept
    assert nm_paths.choose_path(torch.randn(40, 128), values, indices, None, 2, 4, 128, "memory") == "tiles"
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "csr")
    with pytest.raises(ValueError, match="SPARSECC_NM_CPU_PATH='csr'"):
        nm_paths.choose_path(torch.randn(1, 128), values, indices, None, 2, 4, 128, "memory")


def test_the_report_shows_the_measured_choice_and_keep_reaches_the_program(fresh_tuning):
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128)).eval()
    x = torch.randn(1, 128)
    compiled = sparsecc.compile(model, (x,), sparsity={"weights": {"pattern": "2:4", "keep": "speed"}})
    report = compiled.report()
    assert "keep=speed" in report.pipeline
    calls = [i for i in compiled.program.instructions if i.op == "sparsecc::nm_linear"]
    assert len(calls) == 2 and all(i.kwargs == {"keep": "speed"} for i in calls)
    assert {k["layer"] for k in report.kernels} == {"0", "2"} and all(k["tokens"] == 1 for k in report.kernels)
    assert all(set(k["ms"]) >= {"whole", "tiles", "dense"} for k in report.kernels)
    assert "Linear kernels (CPU" in str(report)
    torch.testing.assert_close(compiled(x), compiled(x))


def test_an_unknown_keep_is_refused_before_capture():
    with pytest.raises(sparsecc.ConfigError, match="weights.keep: keep must be one of memory, speed"):
        sparsecc.compile(torch.nn.Linear(8, 8), (torch.randn(1, 8),), sparsity={"weights": {"keep": "fast"}})


def test_an_empty_batch_is_no_tuning_and_gives_an_empty_result(fresh_tuning):
    values, indices, _ = weight(64, 128)
    y = torch.ops.sparsecc.nm_linear(torch.randn(0, 128), values, indices, None, 2, 4, 128)
    assert y.shape == (0, 64) and not tuning_cache.choices()


def test_a_remembered_path_this_call_cannot_take_falls_back_to_the_fastest_it_can(fresh_tuning):
    values, indices, _ = weight(64, 128)
    x = torch.randn(40, 128)
    key = nm_paths.tuning_key(40, values, 2, 4, 128, "memory")   # as if written where a "generated" ran here
    tuning_cache.store(key, {"path": "generated", "ms": {"generated": 1.0, "whole": 3.0, "tiles": 2.0}})
    assert nm_paths.choose_path(x, values, indices, None, 2, 4, 128, "memory") == "tiles"


def test_an_unwritable_cache_directory_warns_and_the_call_runs(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(blocker / "cache"))    # under a file: cannot be created
    tuning_cache.forget()
    values, indices, dense = weight(64, 128)
    x = torch.randn(40, 128)
    with pytest.warns(UserWarning, match="not saved to"):
        y = torch.ops.sparsecc.nm_linear(x, values, indices, None, 2, 4, 128)
    torch.testing.assert_close(y, F.linear(x, dense))
    tuning_cache.forget()


def test_keep_speed_keeps_a_dense_copy_of_inference_tensors(fresh_tuning, monkeypatch):
    with torch.inference_mode():
        values, indices, dense = weight(64, 128)
    monkeypatch.setenv("SPARSECC_NM_CPU_PATH", "dense")
    x = torch.randn(40, 128)
    y = torch.ops.sparsecc.nm_linear(x, values, indices, None, 2, 4, 128, "speed")
    torch.testing.assert_close(y, F.linear(x, dense))
    assert nm_paths.holds_dense_copy(values)


def test_a_round_keeps_its_fastest_call(monkeypatch):
    times = iter([9.0, 1.0, 5.0])   # a call preempted by another process only ever reads slower
    monkeypatch.setattr(nm_paths, "cpu_ms", lambda run: next(times))
    assert nm_paths.quiet_ms(lambda: None) == 1.0
