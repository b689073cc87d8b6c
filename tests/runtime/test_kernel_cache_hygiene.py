"""A writer killed mid-write leaves nothing a later run trips over; orphaned temp folders are removed."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sparsecc.runtime import kernel_cache
from sparsecc.runtime.kernel_cache import STALE_SECONDS, KernelCache, cache_key

KEY = cache_key("0" * 64, {"block": 64}, "cuda:90", "3.9")

# The child stops inside put() once the temp folder holds both files, just before the rename.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sparsecc.runtime import kernel_cache

    def stall(self, tmp, entry):
        Path(sys.argv[2]).write_text(str(tmp))
        time.sleep(600)

    kernel_cache.KernelCache._publish = stall
    kernel_cache.KernelCache(sys.argv[1]).put(sys.argv[3], b"half-written" * 100, {"name": "k"}, "cubin")
""")


def _killed_writer(root, tmp_path) -> tuple[int, str]:
    marker = tmp_path / "writing"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(marker), KEY])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the writer never reached its temp folder"
        orphan = marker.read_text()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return child.pid, orphan


def test_a_killed_writer_leaves_nothing_behind(tmp_path):
    root = tmp_path / "cache"
    cache = KernelCache(root)                        # open before the writer dies: put() must clean up
    pid, orphan = _killed_writer(root, tmp_path)
    assert os.path.basename(orphan).startswith(f".tmp-{pid}-") and os.path.isdir(orphan)
    assert cache.get(KEY) is None                    # lookups never see a temp folder
    stored = cache.put(KEY, b"binary", {"name": "k"}, "cubin")
    assert not os.path.exists(orphan)
    assert cache.get(KEY) == stored and stored.binary == b"binary"
    assert [p.name for p in (root / KEY[:2]).iterdir()] == [KEY]


def test_opening_the_cache_removes_a_dead_writers_folder(tmp_path):
    dead = tmp_path / KEY[:2] / f"{kernel_cache.temp_prefix().replace(str(os.getpid()), '999999999')}abc"
    dead.mkdir(parents=True)                         # pid 999999999 is above any kernel's pid_max
    KernelCache(tmp_path)
    assert not dead.exists()


def test_a_live_writers_folder_stays_until_it_is_stale(tmp_path):
    shard = tmp_path / KEY[:2]
    live = shard / f"{kernel_cache.temp_prefix()}abc"   # this process: a writer still at work
    legacy = shard / f".{KEY[:16]}-xyz"              # the old naming, without a pid
    for folder in (live, legacy):
        folder.mkdir(parents=True)
        (folder / "kernel.cubin").write_bytes(b"x")
    KernelCache(tmp_path)
    assert live.exists() and legacy.exists()
    old = time.time() - STALE_SECONDS - 60
    for folder in (live, legacy):
        os.utime(folder, (old, old))
    assert KernelCache(tmp_path).clean() == 0        # the constructor already removed both
    assert not live.exists() and not legacy.exists()


@pytest.mark.parametrize("name", [".tmp-notapid-1", ".tmp-", ".tmp-999999999-0000abcd-x"])   # the last: another host
def test_unreadable_names_are_left_to_the_age_rule(tmp_path, name):
    (tmp_path / KEY[:2] / name).mkdir(parents=True)
    KernelCache(tmp_path)
    assert (tmp_path / KEY[:2] / name).exists()
