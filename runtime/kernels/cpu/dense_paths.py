"""The CPU paths of a dense `aten::linear` in a compiled program at few tokens, chosen by measurement.

    "aten"       F.linear (MKL / oneDNN)
    "generated"  the MLIR-generated dense decode kernel (kernels/cpu/mlir/dense_decode.py): streams the
                 weight once per token group; 1..MAX_DECODE_TOKENS tokens, fp32 / bf16, AVX-512 hosts

Decode (a generator's step, a batch-1 forward) is bound by weight bytes, and MKL's one-token GEMV does
not read them at the rate the memory allows. The first call for a key (host, threads, dtype, out x in,
token bucket) times both and keeps the faster (kernels/tuning_cache.py, shared with nm_linear's choices).
Each timed call starts with the weight out of the caches (a buffer larger than the last-level cache read
first), as in a decode step that streams every layer's weight from memory: timed hot, the one-thread
kernel beat MKL's two-thread GEMV on layers that lose to it in a real step (bf16 1024-wide example:
compiled dense 10.8 ms vs eager 7.5 ms per token before, measured on the 2-core Zen 4).
More tokens than MAX_DECODE_TOKENS always take F.linear. SPARSECC_DENSE_CPU_PATH=aten|generated forces one.
"""
from __future__ import annotations

import os
from functools import lru_cache, partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..tuning_cache import bucket, choices, cpu_ms, fastest, remembered
from .layer_calls import LayerCalls, environ_value
from .mlir.dense_decode import DenseCall, dense_spec
from .mlir.host import cpu_model, host_target
from .nm_paths import MAX_DECODE_TOKENS, SAMPLES_PER_ROUND, TUNING_ROUNDS, bound_once, taken

PATHS = ("aten", "generated")
TUNING_VERSION = 3   # 2: timed with the weight evicted from the caches; 3: rows split in native code
EVICT_BYTES = 96 << 20   # read before each timed call: more than the last-level cache of the CPUs measured
# smaller weights stay in cache between calls, where F.linear's GEMV is not starved: not worth a JIT or a tuning
MIN_WEIGHT_BYTES = 1 << 20
FORCE_ENV = "SPARSECC_DENSE_CPU_PATH"
_layer_runs = LayerCalls(max_keys_per_layer=64)   # weight -> {call key: F.linear or its bound kernel}


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """aten::linear as a compiled program runs it: F.linear, or the generated kernel where it measured faster."""
    if (input.device.type != "cpu" or weight.dim() != 2 or input.requires_grad
            or weight.numel() * weight.element_size() < MIN_WEIGHT_BYTES
            or input.numel() > MAX_DECODE_TOKENS * weight.shape[1]):
        return F.linear(input, weight, bias)
    key = call_key(input, weight, bias)
    run = _layer_runs.get(weight, key) if key is not None else None
    if run is None:
        spec = dense_spec(input, weight, bias)
        generated_path = spec is not None and choose_path(input, weight, bias) == "generated"
        run = DenseCall(spec, weight, bias) if generated_path else _aten
        if key is not None:
            _layer_runs.put(weight, key, run)
    return run(input, weight, bias)


def _aten(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.linear(x, weight, bias)


def call_key(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[tuple]:
    """What a layer's path and bound kernel depend on, or None (an inference-mode bias: no version counter)."""
    try:
        bias_state = None if bias is None else (bias.dtype, bias.shape, bias.device, bias.data_ptr(), bias._version)
    except RuntimeError:
        return None
    return (x.dtype, x.shape, weight.dtype, weight.shape, weight.data_ptr(), weight.is_contiguous(), bias_state,
            environ_value(FORCE_ENV), torch.get_num_threads())


def choose_path(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> str:
    """Forced by SPARSECC_DENSE_CPU_PATH, else the measured faster for this layer and token bucket."""
    forced = os.environ.get(FORCE_ENV)
    if forced:
        if forced not in PATHS:
            raise ValueError(f"{FORCE_ENV}={forced!r}: expected one of {PATHS}")
        return forced
    out_features, in_features = weight.shape
    key = _layer_key(x.dtype, out_features, in_features, torch.get_num_threads()) + str(bucket(x.numel() // in_features))
    return remembered(key, partial(tune, x, weight, bias))["path"]


def tune(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> dict:
    def bind() -> DenseCall:   # timed as a program runs it: bound once (linear keeps the bound call)
        return DenseCall(taken(dense_spec(x, weight, bias), "dense decode"), weight, bias)

    runners = {"aten": partial(F.linear, x, weight, bias), "generated": bound_once(bind, x)}
    return fastest(runners, cold_ms, rounds=TUNING_ROUNDS)


def cold_ms(run) -> float:
    """The least of SAMPLES_PER_ROUND calls, each after the caches were filled with other data."""
    best = float("inf")
    for _ in range(SAMPLES_PER_ROUND):
        _evict()
        best = min(best, cpu_ms(run))
    return best


def _evict() -> None:
    global _eviction_buffer
    if _eviction_buffer is None:
        _eviction_buffer = torch.ones(EVICT_BYTES // 4)
    _eviction_buffer.sum()


_eviction_buffer: Optional[Tensor] = None


@lru_cache(maxsize=4096)
def _layer_key(dtype: torch.dtype, out_features: int, in_features: int, threads: int) -> str:
    """A layer's decision key on this host up to its token bucket (other hosts' or tuners' choices not reused)."""
    model = cpu_model().replace("|", "/")
    return f"cpu:{model}:{host_target()}|dense-v{TUNING_VERSION}|threads={threads}|" \
           f"{str(dtype).removeprefix('torch.')}|{out_features}x{in_features}|tokens<="


def decisions(dtype: torch.dtype, out_features: int, in_features: int) -> list[dict]:
    """What this host chose so far for a dense linear of this kind: {"tokens": bucket, "path", "ms"} each."""
    prefix = _layer_key(dtype, out_features, in_features, torch.get_num_threads())
    found = [{"tokens": int(key[len(prefix):]), **entry} for key, entry in choices().items() if key.startswith(prefix)]
    return sorted(found, key=lambda d: d["tokens"])
