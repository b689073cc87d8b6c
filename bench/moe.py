"""Benchmark sparsecc::moe (sorted, grouped expert dispatch) against transformers' Mixtral MoE block on CPU.

    python bench/moe.py [--quick] [--json PATH]

Per block config (E experts, top k, hidden H, expert width I; fp32) and token count T,
all with the same weights, medians of timed reps after a warm-up under `torch.no_grad()`,
the reps of all columns interleaved:

    hf_grouped  MixtralSparseMoeBlock, experts_implementation "grouped_mm": what transformers
                5.x picks by default for a Mixtral model (on CPU: aten::_grouped_mm, one mm per expert)
    hf_eager    the same block with "eager" (a one_hot mask, torch.where per hit expert): what
                a bare block falls back to when its config names no implementation
    hf_batched  "batched_mm"; gathers each pair's expert weights, T*k*(3*H*I) floats, so it is
                skipped with a note when that exceeds BATCHED_MM_LIMIT bytes
    dense       plain torch: every expert on every token, weighted by a [T, E] routing matrix that
                is zero outside the top k (softmax -> top-k -> renormalise, as Mixtral)
    compiled    sparsecc.compile(..., sparsity={"moe": "dispatch"}), compiled per token count

Before timing, dense and compiled are checked against hf_grouped (max |diff| / max |ref|).
Targets: compiled / hf_grouped <= 1.0 and dense / compiled >= 0.7 * E / k.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

import sparsecc


@dataclass(frozen=True)
class BlockShape:
    name: str
    experts: int
    top_k: int
    hidden: int
    inter: int


SHAPES = [BlockShape("mixtral-like", 8, 2, 1024, 2816), BlockShape("fine-grained", 64, 2, 1024, 512)]
QUICK_SHAPES = [BlockShape("mixtral-like", 8, 2, 256, 704), BlockShape("fine-grained", 64, 2, 256, 128)]
TOKENS, QUICK_TOKENS = (512, 2048), (64, 256)
BATCHED_MM_LIMIT = 4e9     # bytes of per-pair weight copies batched_mm may make
TOLERANCE = 1e-4           # max |diff| / max |ref| accepted for an exact rewrite in fp32
IMPLEMENTATIONS = {"hf_grouped": "grouped_mm", "hf_eager": "eager", "hf_batched": "batched_mm"}


def mixtral_block(shape: BlockShape, implementation: str) -> MixtralSparseMoeBlock:
    config = transformers.MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.inter,
                                        num_local_experts=shape.experts, num_experts_per_tok=shape.top_k)
    config._experts_implementation = implementation
    return MixtralSparseMoeBlock(config).eval()


def random_weights(shape: BlockShape) -> dict[str, torch.Tensor]:
    """Router logits and expert activations of order 1: each weight is randn / sqrt(fan_in)."""
    torch.manual_seed(0)
    like = mixtral_block(shape, "eager").state_dict()
    return {name: torch.randn(t.shape) / t.shape[-1] ** 0.5 for name, t in like.items()}


def blocks_sharing(shape: BlockShape, weights: dict) -> dict[str, MixtralSparseMoeBlock]:
    blocks = {}
    for column, implementation in IMPLEMENTATIONS.items():
        blocks[column] = mixtral_block(shape, implementation)
        blocks[column].load_state_dict(weights, assign=True)  # one copy of the weights for all
    return blocks


def dense_moe(hidden: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
              top_k: int) -> torch.Tensor:
    """y = sum_e routing[:, e] * expert_e(hidden) over all E experts; routing is 0 outside the top k."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    probs = F.linear(flat, router).float().softmax(-1)
    weights, experts = probs.topk(top_k, -1)
    routing = torch.zeros_like(probs).scatter_(1, experts, weights / weights.sum(-1, keepdim=True))
    routing = routing.to(hidden.dtype)
    y = torch.zeros_like(flat)
    for e in range(gate_up.shape[0]):
        gate, up = F.linear(flat, gate_up[e]).chunk(2, dim=-1)
        y.addcmul_(F.linear(F.silu(gate) * up, down[e]), routing[:, e, None])
    return y.reshape(hidden.shape)


def first(output):
    """The hidden states of a block call, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def interleaved_ms(runs: dict, reps: dict[str, int]) -> dict[str, list[float]]:
    """Each run's times in ms; the reps go round-robin so a slow spell of a shared machine hits every
    column alike instead of one whole column."""
    times = {name: [] for name in runs}
    for i in range(max(reps.values())):
        for name, run in runs.items():
            if i < reps[name]:
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def batched_mm_bytes(shape: BlockShape, tokens: int) -> float:
    return tokens * shape.top_k * 3 * shape.hidden * shape.inter * 4


def compile_block(block: torch.nn.Module, x: torch.Tensor) -> tuple:
    start = time.perf_counter()
    compiled = sparsecc.compile(block, (x,), sparsity={"moe": "dispatch"}, check=False)
    seconds = time.perf_counter() - start
    report = compiled.report()
    if not any(r.op == "sparsecc.moe" for r in report.layers):
        raise SystemExit(f"moe-dispatch did not rewrite the block; skipped: {report.skipped}")
    return compiled, seconds, report.layers[0].details["tokens_per_expert"]


def measure(shape: BlockShape, blocks: dict, tokens: int, reps: int, dense_reps: int) -> dict:
    torch.manual_seed(1)
    x = torch.randn(1, tokens, shape.hidden)
    row = {"config": shape.name, "E": shape.experts, "k": shape.top_k, "H": shape.hidden, "I": shape.inter,
           "tokens": tokens, "notes": []}
    compiled, row["compile_s"], row["tokens_per_expert"] = compile_block(blocks["hf_grouped"], x)
    experts = blocks["hf_grouped"].experts
    runs = {column: (lambda b=block: first(b(x))) for column, block in blocks.items()}
    runs["dense"] = lambda: dense_moe(x, blocks["hf_grouped"].gate.weight, experts.gate_up_proj,
                                      experts.down_proj, shape.top_k)
    runs["compiled"] = lambda: first(compiled(x))
    if batched_mm_bytes(shape, tokens) > BATCHED_MM_LIMIT:
        del runs["hf_batched"]
        row["notes"].append(f"hf_batched skipped: would copy {batched_mm_bytes(shape, tokens) / 1e9:.1f} GB "
                            f"of expert weights (> {BATCHED_MM_LIMIT / 1e9:.0f} GB)")
    reference = runs["hf_grouped"]()
    for column, run in runs.items():  # checks each against the reference and warms it up
        row[f"err_{column}"] = max_rel_error(run(), reference)
    samples = interleaved_ms(runs, {c: dense_reps if c == "dense" else reps for c in runs})
    row["samples_ms"] = samples
    row.update({f"{column}_ms": statistics.median(t) for column, t in samples.items()})
    return finish_row(row)


def finish_row(row: dict) -> dict:
    row["compiled_vs_hf"] = row["compiled_ms"] / row["hf_grouped_ms"]
    row["compiled_vs_eager"] = row["compiled_ms"] / row["hf_eager_ms"]
    row["dense_over_compiled"] = row["dense_ms"] / row["compiled_ms"]
    row["dense_target"] = 0.7 * row["E"] / row["k"]
    row["met_vs_hf"] = row["compiled_vs_hf"] <= 1.0
    row["met_dense"] = row["dense_over_compiled"] >= row["dense_target"]
    row["exact"] = all(row[f"err_{c}"] <= TOLERANCE for c in ("dense", "compiled"))
    return row


def ms(row: dict, column: str) -> str:
    value = row.get(f"{column}_ms")
    return f"{'skipped':>10}" if value is None else f"{value:10.1f}"


def print_times(rows: list[dict]) -> None:
    columns = ("hf_grouped", "hf_eager", "hf_batched", "dense", "compiled")
    print(f"\n{'config':<13} {'E':>3} {'k':>2} {'T':>5} " + " ".join(f"{c:>10}" for c in columns)
          + f" {'err dense':>9} {'err comp':>9} {'compile':>7}  (ms, median; err = max|d|/max|ref| vs hf_grouped)")
    for r in rows:
        print(f"{r['config']:<13} {r['E']:>3} {r['k']:>2} {r['tokens']:>5} " + " ".join(ms(r, c) for c in columns)
              + f" {r['err_dense']:9.1e} {r['err_compiled']:9.1e} {r['compile_s']:6.1f}s")
    for r in rows:
        for note in r["notes"]:
            print(f"  {r['config']} T={r['tokens']}: {note}")


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_targets(rows: list[dict]) -> None:
    print(f"\n{'config':<13} {'T':>5} {'compiled/hf_grouped':>20} {'(<= 1.0)':>9} {'compiled/hf_eager':>18} "
          f"{'dense/compiled':>15} {'target':>8} {'':>8} {'exact':>6}  tokens/expert min/med/max")
    for r in rows:
        spread = r["tokens_per_expert"]
        print(f"{r['config']:<13} {r['tokens']:>5} {r['compiled_vs_hf']:20.2f} {met(r['met_vs_hf']):>9} "
              f"{r['compiled_vs_eager']:18.2f} {r['dense_over_compiled']:15.2f} {'>= %.1f' % r['dense_target']:>8} "
              f"{met(r['met_dense']):>8} {'yes' if r['exact'] else 'NO':>6}  "
              f"{spread['min']}/{spread['median']}/{spread['max']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args()
    shapes, token_counts = (QUICK_SHAPES, QUICK_TOKENS) if args.quick else (SHAPES, TOKENS)
    reps = 3 if args.quick else 7
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, reps {reps} (dense: 3, E >= 64 at T >= 2048: 2), "
          "interleaved across columns")
    rows = []
    with torch.no_grad():
        for shape in shapes:
            blocks = blocks_sharing(shape, random_weights(shape))
            for tokens in token_counts:
                dense_reps = 2 if shape.experts >= 64 and tokens >= 2048 else 3
                rows.append(measure(shape, blocks, tokens, reps, dense_reps))
                print(f"done {shape.name} T={tokens}", flush=True)
    print_times(rows)
    print_targets(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
