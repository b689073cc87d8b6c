"""Kernel-path choices measured once and remembered: in memory and in a JSON file.

A tuner (the N:M linear's CUDA and CPU path choosers) names a decision by a
key (device, dtype, pattern, shape, token bucket, ...) and measures the
candidates the first time the key is seen; the entry {"path": fastest, "ms":
{path: time or why it could not run}} is kept in memory and in
$SPARSECC_CACHE_DIR/nm_autotune.json (default ~/.cache/sparsecc), written
atomically, so a later process does not tune again. An unreadable file is
re-tuned, never fatal.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .cpu.layer_calls import forget_bound_calls

_choices: dict[str, dict] = {}
_lock = threading.RLock()
_warned: set[Path] = set()   # cache files already reported unwritable


def cache_file() -> Path:
    root = os.environ.get("SPARSECC_CACHE_DIR") or Path.home() / ".cache" / "sparsecc"
    return Path(root) / "nm_autotune.json"


def load() -> None:
    """Read the file into memory once (nothing to do when memory already holds choices)."""
    if _choices or not cache_file().exists():
        return
    try:
        _choices.update(json.loads(cache_file().read_text()))
    except (OSError, ValueError):
        pass  # an unreadable cache is re-tuned, never fatal


def store(key: str, entry: dict) -> None:
    """Remember `entry` in memory, and in the file merged with what other processes wrote there since.
    A file that cannot be written leaves the choice in memory only (warned once): never fatal."""
    _choices[key] = entry
    path = cache_file()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        on_disk = json.loads(path.read_text()) if path.exists() else {}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".nm_autotune.")
        with os.fdopen(fd, "w") as f:
            json.dump({**on_disk, **_choices}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except (OSError, ValueError) as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        _warn_unwritable(path, err)


def _warn_unwritable(path: Path, err: Exception) -> None:
    if path in _warned:
        return
    _warned.add(path)
    warnings.warn(f"sparsecc: kernel path choices are not saved to {path} ({type(err).__name__}: {err}); "
                  "they are measured again in the next process", stacklevel=4)


def remembered(key: str, tune: Callable[[], dict]) -> dict:
    """The entry for `key`, measured by `tune()` the first time any process asks."""
    with _lock:
        load()
        if key not in _choices:
            store(key, tune())
        return _choices[key]


def choices() -> dict[str, dict]:
    """Every remembered decision, by key (a copy)."""
    with _lock:
        load()
        return dict(_choices)


def forget() -> None:
    """Drop the in-memory choices (the file stays) and the layers' calls bound on them: the next decision
    reads the file again."""
    with _lock:
        _choices.clear()
    forget_bound_calls()


def bucket(tokens: int) -> int:
    """The token-count bucket a decision is made for: the next power of two."""
    return 1 << max(tokens - 1, 0).bit_length()


EXPECTED_FAILURES = (RuntimeError, ValueError, NotImplementedError, MemoryError)   # a path that cannot run here


def fastest(runners: dict[str, Callable[[], object]], clock: Callable[[Callable[[], object]], float],
            rounds: int = 1, check: Optional[Callable[[Any], Optional[str]]] = None) -> dict:
    """{"path": fastest, "ms": {path: ms or "unavailable: why" or "disagrees: why"}}. Each candidate runs once
    untimed (compiling its kernel, allocating), then `rounds` rounds time every candidate once in turn (a
    drifting machine slows all alike) and each keeps its median; a candidate that raises (untimed or timed)
    is left out with the reason, and one whose untimed output `check` finds wrong (check(output) -> why, or
    None) too. An exception other than EXPECTED_FAILURES (a bug rather than a path this machine lacks) is
    also warned about, once per kind: the choice is remembered, so a silent one would stick."""
    timings: dict[str, object] = {}
    samples: dict[str, list[float]] = {}
    for path, run in runners.items():
        try:
            output = run()
            why = check(output) if check is not None else None
            del output
        except Exception as err:  # noqa: BLE001 - any failure of one candidate leaves it out (and is said)
            timings[path] = _unavailable(path, err)
            continue
        if why is not None:
            timings[path] = f"disagrees: {why}"
            continue
        samples[path] = []
    for _ in range(rounds):
        for path in list(samples):
            try:
                samples[path].append(clock(runners[path]))
            except Exception as err:  # noqa: BLE001 - as above, in a timed call
                timings[path] = _unavailable(path, err)
                del samples[path]
    timings.update({path: sorted(times)[len(times) // 2] for path, times in samples.items()})
    timed = {p: t for p, t in timings.items() if isinstance(t, float)}
    if not timed:
        raise RuntimeError(f"no candidate ran: {timings}")
    return {"path": min(timed, key=timed.get), "ms": timings}


def _unavailable(path: str, err: Exception) -> str:
    why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
    if not isinstance(err, EXPECTED_FAILURES) and (path, type(err)) not in _warned_failures:
        _warned_failures.add((path, type(err)))
        warnings.warn(f"sparsecc: kernel path {path!r} failed while being tuned and is left out ({why}); "
                      "this looks like a bug: please report it", stacklevel=3)
    return f"unavailable: {why}"


_warned_failures: set = set()


def cpu_ms(run: Callable[[], object]) -> float:
    """Wall time of one call of `run`, in ms."""
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e3
