"""Decode speed of text generation on the CPU: transformers, torch.compile and sparsecc, side by side.

    python bench/generate.py [--quick] [--dtypes fp32,bf16] [--new-tokens 64] [--no-torch-compile]
                             [--no-long | --no-short]

A Llama-shaped model (hidden 1024, 8 layers, intermediate 2816, vocab 32000, 16 heads: ~100M
parameters, random weights; `--quick`: a tiny one) generates greedily from a 16-token prompt,
batch 1, every row over a static KV cache of prompt + new tokens:

    transformers   its `generate` on the dense model (sdpa, cache_implementation="static")
    torch.compile  the same, with `model.forward` compiled by torch.compile (Inductor)
    sparsecc dense `sparsecc.compile(..., mode="generate")` without sparsity (the runtime's own overhead)
    sparsecc 2:4   the same with sparsity="2:4" (every linear, lm_head included, magnitude-pruned)

Decode tok/s excludes the prefill: a streamer stamps every new token and the rate is one over the
median gap between consecutive tokens (a gap another process stole time from does not move the
median). Each row runs in a fresh process (`--same-process` to keep one): measured in one process, the
sparsecc rows after transformers' and torch.compile's ran ~20 % slower (bf16 2:4: 45.4 vs 55 tok/s). Compile s is the first generate call (plus sparsecc.compile) less a steady one. Peak RSS
is the process's high-water mark while generating (reset after compiling where Linux allows). KV bytes are
the cache tensors. The long-context rows prefill 8192 tokens (`--quick`: 128) and decode after
them with a dense 2:4 cache and with window 1024 + 4 sinks (a ring buffer of window + sinks slots).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gc
import multiprocessing
import resource
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import transformers

import sparsecc

MODELS = {"full": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=2816, vocab_size=32000,
                       num_attention_heads=16),
          "quick": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256,
                        num_attention_heads=4)}
LONG = {"full": dict(context=8192, window=1024, sinks=4), "quick": dict(context=128, window=32, sinks=4)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = 16


@dataclass
class Row:
    name: str
    tok_s: Optional[float] = None
    compile_s: Optional[float] = None
    peak_rss: Optional[int] = None
    kv_bytes: Optional[int] = None
    note: str = ""


class TokenClock:
    """A streamer (`put`/`end`) that stamps each new token; the prompt's `put` comes first."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def tok_s(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]   # new token to new token: one decode step
        return 1.0 / statistics.median(gaps)


def llama(size: str, dtype: torch.dtype) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**MODELS[size], max_position_embeddings=16384, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval().to(dtype)
    model.generation_config.eos_token_id = None   # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def kv_bytes(config, max_length: int, dtype: torch.dtype) -> int:
    """A static cache's keys and values: 2 x layers x kv heads x max_length x head dim (batch 1)."""
    heads = config.num_key_value_heads or config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * max_length * head_dim * torch.finfo(dtype).bits // 8


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux: /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as status:
            line = next(l for l in status if l.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_row(name: str, build: Callable[[], tuple[Callable, int]], prompt: torch.Tensor, new_tokens: int,
              twice: bool = True, failed: str = "failed") -> Row:
    """build() -> (generate(prompt, new_tokens, streamer), kv bytes), then generate: twice (the first compiles,
    the second is timed), or once (a long prompt: compile s is build() alone, the decode gaps are timed)."""
    gc.collect()
    try:
        start = time.perf_counter()
        generate, cache = build()
        built = time.perf_counter() - start
        reset_peak_rss()   # the peak while generating (compiling holds dense references and both programs)
        clock = TokenClock()
        if not twice:
            generate(prompt, new_tokens, clock)
            return Row(name, clock.tok_s(), built, peak_rss(), cache)
        generate(prompt, new_tokens, TokenClock())
        first = time.perf_counter() - start
        start = time.perf_counter()
        generate(prompt, new_tokens, clock)
        steady = time.perf_counter() - start
    except Exception as err:   # a row that cannot run says why; the others still run
        return Row(name, note=f"{failed}: {type(err).__name__}: {str(err).splitlines()[0][:90]}")
    return Row(name, clock.tok_s(), max(first - steady, 0.0), peak_rss(), cache)


def hf_generate(model) -> Callable:
    def generate(prompt, new_tokens, streamer):
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, cache_implementation="static",
                                  disable_compile=True, streamer=streamer)
    return generate


def transformers_row(model, prompt, new_tokens, compiled: bool) -> Row:
    def build():
        if compiled:
            model.forward = torch.compile(model.forward, dynamic=False)
        return hf_generate(model), kv_bytes(model.config, prompt.shape[1] + new_tokens, model.dtype)
    row = timed_row("torch.compile" if compiled else "transformers", build, prompt, new_tokens)
    if compiled:
        del model.forward   # back to the class's eager forward
        torch._dynamo.reset()
    return row


def sparsecc_row(name: str, model, prompt, new_tokens: int, sparsity, max_length: int, **timing) -> Row:
    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = prompt[:, :PROMPT]   # a short example: capture and checks need no long prompt
            gen = sparsecc.compile(model, (example,), sparsity=sparsity, mode="generate", max_length=max_length,
                                   progress=False)

        def generate(ids, count, streamer):
            return gen.generate(ids, max_new_tokens=count, eos_token_id=[], streamer=streamer)
        return generate, gen.spec.cache.get("bytes")
    return timed_row(name, build, prompt, new_tokens, **timing)


SHORT_ROWS = ("transformers", "torch.compile", "sparsecc dense", "sparsecc 2:4")
LONG_ROWS = ("dense cache", "window")


def short_row(size: str, dtype: str, new_tokens: int, which: str) -> Row:
    """One row of the short table, the model and prompt built here (the same in every process: seeded)."""
    model = llama(size, DTYPES[dtype])
    prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    max_length = PROMPT + new_tokens
    if which in ("transformers", "torch.compile"):
        return transformers_row(model, prompt, new_tokens, compiled=which == "torch.compile")
    return sparsecc_row(which, model, prompt, new_tokens, None if which == "sparsecc dense" else "2:4", max_length)


def long_row(size: str, dtype: str, new_tokens: int, which: str) -> Row:
    """Decode after a long context: 2:4 with the dense static cache, or with a window + sinks ring buffer."""
    long = LONG[size]
    model = llama(size, DTYPES[dtype])
    context = torch.randint(3, model.config.vocab_size, (1, long["context"]), generator=torch.Generator().manual_seed(1))
    max_length = long["context"] + new_tokens
    label = f"{long['context']} ctx"
    if which == "dense cache":
        return sparsecc_row(f"{label}, 2:4 dense cache", model, context, new_tokens, "2:4", max_length, twice=False)
    window = {"policy": "window", "window": long["window"], "sinks": long["sinks"]}
    return sparsecc_row(f"{label}, 2:4 window {long['window']}+{long['sinks']}", model, context, new_tokens,
                        {"weights": "2:4", "attention": window}, max_length, twice=False, failed="not built")


def run_row(isolate: bool, fn: Callable[..., Row], *args) -> Row:
    """`fn(*args)`, in a fresh process when `isolate`: each row starts from a clean interpreter (no other row's
    threads, compiled kernels or heap), and its peak RSS is its own."""
    if not isolate:
        return fn(*args)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def ratio(value: Optional[float], base: Optional[float]) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def mib(value: Optional[int]) -> str:
    return f"{value / 2**20:.{1 if value >= 2**20 else 3}f}" if value else "-"


def print_table(title: str, rows: list[Row], base: Optional[Row] = None, compiled: Optional[Row] = None,
                base_label: str = "vs transformers") -> None:
    print(f"\n{title}")
    print(f"{'':32} {'decode tok/s':>12} {base_label:>15} {'vs torch.compile':>16} {'compile s':>9} "
          f"{'peak RSS MiB':>12} {'KV MiB':>8}  note")
    for r in rows:
        tok_s = f"{r.tok_s:.1f}" if r.tok_s else "-"
        compile_s = f"{r.compile_s:.1f}" if r.compile_s is not None else "-"
        print(f"{r.name:32} {tok_s:>12} {ratio(r.tok_s, base and base.tok_s):>15} "
              f"{ratio(r.tok_s, compiled and compiled.tok_s):>16} {compile_s:>9} {mib(r.peak_rss):>12} "
              f"{mib(r.kv_bytes):>8}  {r.note}", flush=True)


def main(argv: Optional[list[str]] = None) -> dict[str, list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke run of every row")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per generate (default 64; quick 8)")
    parser.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile row (~1 min each)")
    parser.add_argument("--no-long", action="store_true", help="skip the long-context rows")
    parser.add_argument("--no-short", action="store_true", help="only the long-context rows")
    parser.add_argument("--same-process", action="store_true",
                        help="run every row in this process (default: each row in a fresh one; --quick: same)")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}: expected {list(DTYPES)}")
    print(f"{size} model {MODELS[size]}, {torch.get_num_threads()} threads, prompt {PROMPT}, {new_tokens} new tokens, "
          f"batch 1")
    tables = {}
    isolate = not args.quick and not args.same_process
    for name in [] if args.no_short else dtypes:
        rows = [Row(which, note="skipped") if which == "torch.compile" and args.no_torch_compile
                else run_row(isolate, short_row, size, name, new_tokens, which) for which in SHORT_ROWS]
        print_table(name, rows, base=rows[0], compiled=rows[1])
        tables[name] = rows
    if not args.no_long:
        long = [run_row(isolate, long_row, size, dtypes[0], new_tokens, which) for which in LONG_ROWS]
        print_table(f"{dtypes[0]}, long context ({long[0].name.split(',')[0]})", long, base=long[0],
                    base_label="vs dense cache")
        dense, window = long
        if dense.kv_bytes and window.kv_bytes:
            print(f"window cache: {window.kv_bytes / dense.kv_bytes:.3f} of the dense cache's bytes")
        tables["long"] = long
    return tables


if __name__ == "__main__":
    main()
