"""One rank of the expert-parallel check, launched by torchrun (see test_expert_parallel.py).

    torchrun --nproc-per-node W tests/distributed/ep_worker.py DIR

DIR holds `model.safetensors` (the MoE block's weights), `inputs.safetensors` (input and
one-process output per rank) and `artifact/` (saved with world_size=W). Each rank compiles
the block with distributed={"experts": "ep"}, loads the artifact as its rank, runs both on its
own input and writes DIR/rank<r>.json: the largest difference from the one-process output and
the shape of every constant each holds.
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

DIM, HIDDEN, EXPERTS, TOP_K = 32, 64, 8, 2


def block() -> LoopMoE:
    """A Mixtral-style block: softmax router, top-2, renormalised, SwiGLU experts as a loop."""
    return LoopMoE(DIM, HIDDEN, EXPERTS, TOP_K).eval()


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
    (folder / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
