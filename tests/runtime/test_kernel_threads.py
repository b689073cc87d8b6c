"""Row chunks of a generated kernel run on torch's OpenMP team (or a pool): each once, errors raised."""
import threading

import pytest

from sparsecc.runtime.kernels.cpu.mlir import threads


@pytest.mark.parametrize("team", ["openmp", "pool"])
def test_every_chunk_runs_once_and_an_error_is_raised_after_the_region(team, monkeypatch):
    if team == "pool":
        monkeypatch.setattr(threads, "_gomp_parallel", lambda: None)
    elif threads._gomp_parallel() is None:
        pytest.skip("torch loaded no GOMP_parallel here")
    done, lock = [], threading.Lock()

    def work(chunk):
        with lock:
            done.append(chunk)
    chunks = [(i, i + 1) for i in range(40)]
    threads.run_chunks(work, chunks, threads=2)
    assert sorted(done) == chunks

    def broken(chunk):
        if chunk == (7, 8):
            raise ValueError("chunk 7 failed")
    with pytest.raises(ValueError, match="chunk 7 failed"):
        threads.run_chunks(broken, chunks, threads=2)
