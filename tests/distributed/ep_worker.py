"""One rank of the expert-parallel check, launched by torchrun (see test_expert_parallel.py).

    torchrun --nproc-per-node W tests/distributed/ep_worker.py DIR

DIR holds `model.safetensors` (the MoE block's weights), `inputs.safetensors` (input and
one-process output per rank) and `artifact/` (saved with world_size=W). Each rank compiles
the block with distributed={"experts": "ep"}, loads the artifact as its rank, runs both on its
own input and writes DIR/rank<r>.json: the largest difference from the one-process output and
the shape of every constant each holds, and the largest difference of the `sparsecc::moe_ep` op
(capacity 1.0, a different token count per rank) from `sparsecc::moe` (one process group serves both checks:
each launch of W processes takes seconds).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

import sparsecc
from sparsecc.examples.tiny_moe import LoopMoE
from sparsecc.runtime.ops.moe import sample_moe_arguments
from sparsecc.runtime.ops.moe_ep import local_experts

DIM, HIDDEN, EXPERTS, TOP_K = 32, 64, 8, 2
MOE_CALL = (2, True, "softmax", "silu", True)   # top_k, normalize, scoring, activation, gated


def block() -> LoopMoE:
    """A Mixtral-style block: softmax router, top-2, renormalised, SwiGLU experts as a loop."""
    return LoopMoE(DIM, HIDDEN, EXPERTS, TOP_K).eval()


def moe_arguments(tokens: int, seed: int) -> tuple:
    torch.manual_seed(seed)
    return sample_moe_arguments(tokens, 16, 8, EXPERTS, True, True, True)


def moe_ep_error(rank: int, world: int, capacity: float = 1.0) -> float:
    """Largest difference of moe_ep over this rank's experts from moe over all, on this rank's own tokens."""
    _, _, w_gate_up, w_down, *shared = moe_arguments(24, 0)
    hidden, logits = moe_arguments(24 + 8 * rank, rank + 1)[:2]   # every rank its own tokens, a different count
    want = torch.ops.sparsecc.moe(hidden, logits, w_gate_up, w_down, *shared, *MOE_CALL, capacity)
    got = torch.ops.sparsecc.moe_ep(hidden, logits, local_experts(w_gate_up, world, rank),
                                    local_experts(w_down, world, rank), *shared, *MOE_CALL, capacity,
                                    world_size=world)
    return (got - want).abs().max().item()


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = block()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    inputs = load_file(folder / "inputs.safetensors")
    x, want = inputs[f"x{rank}"], inputs[f"y{rank}"]
    compiled = sparsecc.compile(model, (x,), sparsity={"moe": "dispatch"}, distributed={"experts": "ep"}, check=False)
    loaded = sparsecc.runtime.load(folder / "artifact")
    result = {"rank": rank, "world_size": dist.get_world_size()}
    for name, program in (("compiled", compiled), ("loaded", loaded)):
        result[name] = {"error": (program(x) - want).abs().max().item(),
                        "constants": {k: list(v.shape) for k, v in program.constants.items()}}
    result["loaded"]["expert_bytes"] = sum(v.numel() * v.element_size() for k, v in loaded.constants.items()
                                           if "moe_w_" in k)
    result["ir"] = compiled.ir()
    result["moe_ep_error"] = moe_ep_error(rank, dist.get_world_size())
    (folder / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()   # no rank tears gloo down while another still finishes its last exchange
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
