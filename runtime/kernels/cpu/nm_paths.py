"""The CPU paths of sparsecc::nm_linear, and the choice between them, measured per layer and token bucket.

    "generated"  the MLIR-generated decode kernel (kernels/cpu/mlir/nm_decode.py): streams the
                 compressed values and packed positions once, never a dense weight; up to
                 MAX_DECODE_TOKENS tokens, on hosts with the AVX-512 features it needs
    "tiles"      BLOCK_ROWS weight rows at a time decompressed into one reused workspace (the
                 generated decompression kernel where it runs, else nm_format.decompress_nm), each
                 tile a dense F.linear (MKL / oneDNN): the tile stays in cache between the two
    "whole"      the whole weight decompressed per call into a workspace reused by every layer (one
                 per thread and dtype, the size of the largest layer), then one F.linear: MKL packs x
                 once instead of once per tile (measured at 512 tokens: 0.96-1.04x dense, tiles
                 1.1-1.6x)
    "dense"      the whole weight decompressed once and kept (only when the layer was compiled
                 with keep="speed": it trades the compressed layout's memory saving for speed)

The first call for a key (host, threads, dtype, N:M, out x in, token bucket, keep) times each
candidate and keeps the fastest (kernels/tuning_cache.py: in memory and on disk).
SPARSECC_NM_CPU_PATH=generated|whole|tiles|dense forces a path where it applies.
"""
from __future__ import annotations

import os
import threading
from functools import lru_cache, partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...nm_format import decompress_nm
from ..tuning_cache import bucket, choices, cpu_ms, fastest, remembered
from ..weight_copies import WeightCopies
from .mlir.host import cpu_model, host_target
from .mlir.nm_decode import DecodeCall, decode_spec, nm_decompress_mlir, nm_linear_mlir

PATHS = ("generated", "whole", "tiles", "dense")
FORCE_ENV = "SPARSECC_NM_CPU_PATH"
KEEPS = ("memory", "speed")
MAX_DECODE_TOKENS = 16
TUNING_VERSION = 5  # in every key: choices measured with other paths, kernels or clocks are not reused
TUNING_ROUNDS = 7   # timed rounds per candidate, interleaved; the median round decides
SAMPLES_PER_ROUND = 3  # calls per round, the fastest kept (v2 took one: a busy host's choices were noise)
BLOCK_ROWS = 256  # 32..512 rows measured at K=4096 and 11008, fp32 and bf16, 512 tokens: 256 best or within noise
_dense_weights = WeightCopies()   # values -> its decompressed weight: keep="speed" only
_workspaces = threading.local()          # the "whole" path's decompression buffers, by dtype


def tiles(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
          in_features: int) -> Tensor:
    """y = x @ W.T + bias, W decompressed BLOCK_ROWS rows at a time into one workspace."""
    tokens = x.reshape(-1, in_features)
    out_features = values.shape[0]
    y = tokens.new_empty(tokens.shape[0], out_features)
    workspace = tokens.new_empty(min(BLOCK_ROWS, out_features), in_features)
    for start in range(0, out_features, BLOCK_ROWS):
        stop = min(start + BLOCK_ROWS, out_features)
        weight = decompress_tile(values[start:stop], indices[start:stop], n, m, in_features,
                                 workspace[: stop - start])
        block_bias = None if bias is None else bias[start:stop].to(y.dtype)
        y[:, start:stop] = F.linear(tokens, weight, block_bias)
    return y.reshape(*x.shape[:-1], out_features)


def decompress_tile(values: Tensor, indices: Tensor, n: int, m: int, k: int, out: Tensor) -> Tensor:
    """The dense rows of (values, indices) written into `out`: the generated kernel where it runs."""
    written = nm_decompress_mlir(values, indices, n, m, k, out)
    return written if written is not None else decompress_nm(values, indices, n, m, k, out=out)


def generated(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
              in_features: int) -> Tensor:
    y = nm_linear_mlir(x, values, indices, bias, n, m, in_features)   # a kernel the JIT cannot build raises
    return taken(y, "decode")                                          # KernelCompileError: a path not taken


def bound_once(bind: Callable[[], Callable[[Tensor], Tensor]], x: Tensor) -> Callable[[], Tensor]:
    """A tuning candidate that binds its kernel on the first timed call (a kernel the JIT cannot build raises
    there, inside the tuner: a path not taken), then runs the bound call on x."""
    bound = []

    def run() -> Tensor:
        if not bound:
            bound.append(bind())
        return bound[0](x)
    return run


def taken(found, kernel: str):
    """`found`, or NotImplementedError (the tuner's "path not taken here") where it is None."""
    if found is None:
        raise NotImplementedError(f"no generated {kernel} kernel for this call on this host")
    return found


def dense(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
          in_features: int) -> Tensor:
    """F.linear with the weight decompressed once per weight (values and indices state) and kept."""
    weight = _dense_weights.get(values, indices, None, lambda: decompress_tile(
        values, indices, n, m, in_features, values.new_empty(values.shape[0], in_features)))
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def whole(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
          in_features: int) -> Tensor:
    """F.linear with the weight decompressed into the thread's workspace (never kept per layer)."""
    rows = values.shape[0]
    buffer = workspace(values.dtype, rows * in_features)[: rows * in_features].view(rows, in_features)
    weight = decompress_tile(values, indices, n, m, in_features, buffer)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def workspace(dtype: torch.dtype, numel: int) -> Tensor:
    """This thread's decompression buffer of `dtype`, grown to hold at least `numel` elements."""
    buffers = getattr(_workspaces, "by_dtype", None)
    if buffers is None:
        buffers = _workspaces.by_dtype = {}
    if dtype not in buffers or buffers[dtype].numel() < numel:
        buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffers[dtype]


def holds_dense_copy(values: Tensor) -> bool:
    """Whether the "dense" path keeps a decompressed copy of this weight (keep="speed", chosen)."""
    return _dense_weights.kept(values) is not None


RUNNERS: dict[str, Callable[..., Tensor]] = {"generated": generated, "whole": whole, "tiles": tiles,
                                             "dense": dense}


def candidates(x: Tensor, values: Tensor, n: int, m: int, in_features: int, keep: str) -> list[str]:
    tokens = x.numel() // in_features
    paths = ["generated"] if tokens <= MAX_DECODE_TOKENS and decode_spec(x, values, n, m, in_features) else []
    return paths + ["whole", "tiles"] + (["dense"] if keep == "speed" else [])


def tuning_key(tokens: int, values: Tensor, n: int, m: int, in_features: int, keep: str) -> str:
    return f"{_layer_key(values.dtype, n, m, values.shape[0], in_features)}{bucket(tokens)}|keep={keep}"


def _layer_key(dtype: torch.dtype, n: int, m: int, out_features: int, in_features: int) -> str:
    """The key of a layer's decisions on this host, up to its token bucket (decisions of other CPU models,
    features, thread counts or tuner versions are not reused)."""
    return _host_layer_key(dtype, n, m, out_features, in_features, torch.get_num_threads())


@lru_cache(maxsize=4096)
def _host_layer_key(dtype: torch.dtype, n: int, m: int, out_features: int, in_features: int, threads: int) -> str:
    """_layer_key, built once per layer kind and thread count (every nm_linear call asks for it)."""
    model = cpu_model().replace("|", "/")
    return f"cpu:{model}:{host_target()}|v{TUNING_VERSION}|threads={threads}|" \
           f"{str(dtype).removeprefix('torch.')}|{n}:{m}|{out_features}x{in_features}|tokens<="


def choose_path(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
                in_features: int, keep: str) -> str:
    """The path for this call: forced by SPARSECC_NM_CPU_PATH, the only candidate, or the measured fastest."""
    paths = candidates(x, values, n, m, in_features, keep)
    if x.numel() == 0:
        return "tiles"   # no token: nothing to time, and no bucket's choice may be made from an empty call
    forced = os.environ.get(FORCE_ENV)
    if forced:
        if forced not in PATHS:
            raise ValueError(f"{FORCE_ENV}={forced!r}: expected one of {PATHS}")
        return forced if forced in paths else paths[-1 if forced == "dense" else 0]
    if len(paths) == 1:
        return paths[0]
    key = tuning_key(x.numel() // in_features, values, n, m, in_features, keep)
    entry = remembered(key, partial(tune, paths, x, values, indices, bias, n, m, in_features))
    if entry["path"] in paths:
        return entry["path"]
    # remembered where this call cannot take it (a file from a host with torch-mlir): the fastest it can
    timed = {p: t for p, t in entry.get("ms", {}).items() if p in paths and isinstance(t, float)}
    return min(timed, key=timed.get) if timed else "tiles"


def tune(paths: list[str], x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], n: int, m: int,
         in_features: int) -> dict:
    """Time every path on this call's operands (runners built here: a call that finds its choice made builds none)."""
    runners = {path: partial(RUNNERS[path], x, values, indices, bias, n, m, in_features) for path in paths}
    if "generated" in runners:   # timed as a program runs it: bound once (nm_linear keeps the bound call)
        def bind() -> DecodeCall:
            return DecodeCall(taken(decode_spec(x, values, n, m, in_features), "decode"), values, indices, bias)
        runners["generated"] = bound_once(bind, x)
    entry = fastest(runners, quiet_ms, rounds=TUNING_ROUNDS)
    if entry["path"] != "dense":
        _dense_weights.forget(values)   # timed, not chosen: the layer stays compressed in memory
    if entry["path"] != "whole" and not any(e.get("path") == "whole" for e in choices().values()):
        getattr(_workspaces, "by_dtype", {}).pop(values.dtype, None)   # timed, and no layer runs "whole"
    return entry


def quiet_ms(run: Callable[[], object]) -> float:
    """The least of SAMPLES_PER_ROUND timed calls: a preempted call (a 4-8 ms scheduler slice on a shared host,
    measured) only ever adds time, so the minimum is what the path costs."""
    return min(cpu_ms(run) for _ in range(SAMPLES_PER_ROUND))


def decisions(dtype: torch.dtype, n: int, m: int, out_features: int, in_features: int) -> list[dict]:
    """What this host chose so far for an nm_linear of this kind, one entry per token bucket and keep:
    {"tokens": bucket, "keep": ..., "path": ..., "ms": {path: ms or why not}}."""
    prefix = _layer_key(dtype, n, m, out_features, in_features)
    found = []
    for key, entry in choices().items():
        if key.startswith(prefix):
            tokens, keep = key[len(prefix):].split("|keep=")
            found.append({"tokens": int(tokens), "keep": keep, **entry})
    return sorted(found, key=lambda d: (d["tokens"], d["keep"]))
