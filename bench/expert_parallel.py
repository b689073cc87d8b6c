"""Time a Mixtral-like MoE block per call with its experts split over 1, 2 and 4 processes (gloo, CPU).

    python bench/expert_parallel.py [--tokens 2048] [--dim 512] [--hidden 1024] [--worlds 1 2 4] [--reps 10]

Every rank gets its own `--tokens` tokens (so W ranks process W times the tokens of one).
Columns, medians of `--reps` calls after 2 warm-ups, the two programs' calls alternating; each
call starts after a barrier and counts until its slowest rank finishes:

    replicated    sparsecc.compile(..., sparsity={"moe": "dispatch"}) on every rank: sparsecc::moe with
                  all E experts, no exchange (with 1 rank: one process, the baseline)
    ep            the same compiled with distributed={"experts": "ep"} under `torchrun --nproc-per-node W`:
                  sparsecc::moe_ep, E/W experts per rank, rows exchanged with all_to_all_single
    ep/one process  ep against the 1-rank replicated time (the first world size listed must be 1)
    max_error     largest |ep - replicated| over the ranks (each rank's own tokens)

Each world size is its own torchrun launch of this file with `--rank-worker`. The processes share
the machine's cores: with fewer cores than ranks, more ranks are not faster (the table says how many).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import sparsecc
from sparsecc.examples.tiny_moe import LoopMoE

EXPERTS, TOP_K = 8, 2


def block(args: argparse.Namespace) -> LoopMoE:
    torch.manual_seed(0)   # every rank builds the same weights
    return LoopMoE(args.dim, args.hidden, EXPERTS, TOP_K).eval()


def _call_ms(run, x: torch.Tensor) -> float:
    """ms of one call, from a barrier to the slowest rank's finish."""
    dist.barrier()
    start = time.perf_counter()
    run(x)
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item() * 1e3


def interleaved_ms(runs: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median ms per call of each run, their calls alternating (so load that drifts hits both alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps + 2):
        for name, run in runs.items():
            elapsed = _call_ms(run, x)
            if rep >= 2:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def rank_worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = block(args)
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank))
    one = sparsecc.compile(model, (x,), sparsity={"moe": "dispatch"}, check=False)
    ep = sparsecc.compile(model, (x,), sparsity={"moe": "dispatch"}, distributed={"experts": "ep"}, check=False)
    error = torch.tensor([(ep(x) - one(x)).abs().max().item()])
    dist.all_reduce(error, op=dist.ReduceOp.MAX)
    row = {"world": world, **interleaved_ms({"replicated_ms": one, "ep_ms": ep}, x, args.reps),
           "max_error": error.item(), "threads": torch.get_num_threads()}
    if rank == 0:
        Path(args.out).write_text(json.dumps(row))
    dist.destroy_process_group()


def launch(args: argparse.Namespace, world: int, folder: Path) -> dict:
    out = folder / f"world{world}.json"
    threads = max(1, (os.cpu_count() or 1) // world)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", __file__,
               "--rank-worker", "--out", str(out), "--tokens", str(args.tokens), "--dim", str(args.dim),
               "--hidden", str(args.hidden), "--reps", str(args.reps)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return rank_worker(args)
    with tempfile.TemporaryDirectory() as folder:
        rows = [launch(args, world, Path(folder)) for world in args.worlds]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, E={EXPERTS} top-{TOP_K}, H={args.dim}, "
          f"I={args.hidden}, fp32, {args.tokens} tokens per rank")
    print(f"{'ranks':>5} {'threads/rank':>12} {'replicated ms':>13} {'ep ms':>7} {'ep/replicated':>13} "
          f"{'ep/one process':>14} {'tokens/s (all ranks)':>21} {'max_error':>10}")
    alone = rows[0]["replicated_ms"]
    for r in rows:
        rate = r["world"] * args.tokens / r["ep_ms"] * 1e3
        print(f"{r['world']:>5} {r['threads']:>12} {r['replicated_ms']:>13.1f} {r['ep_ms']:>7.1f} "
              f"{r['ep_ms'] / r['replicated_ms']:>13.2f} {r['ep_ms'] / alone:>14.2f} {rate:>21.0f} "
              f"{r['max_error']:>10.1e}")

if __name__ == "__main__":
    main()
