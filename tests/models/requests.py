"""The requests issue 15 judges every family with, and how to read what a compile did with one."""
from __future__ import annotations

from typing import Any

REQUESTS: dict[str, Any] = {
    "2:4": "2:4",
    "moe": {"moe": "dispatch"},
    "attention-mask": {"attention": {"policy": "mask"}},
    "tokens-0.5": {"tokens": {"capacity": 0.5}},
}
RULES_OF = {"2:4": ("nm-", "prune-nm"), "moe": ("moe-dispatch",), "attention-mask": ("sparse-attention",),
            "tokens-0.5": ("token-routing",)}   # skip entries name the rule; N:M rules are nm-<form>
OPS_OF = {"2:4": ("nm_linear", "nm_decompress", "nm_conv2d"), "moe": ("moe",),
          "attention-mask": ("block_attention",), "tokens-0.5": ("route",)}
EXACT = {"2:4": "error_vs_reference", "moe": "error_vs_dense", "attention-mask": "error_vs_dense"}


def sparse_ops(compiled, request: str) -> int:
    """How many instructions of the program are the request's sparse ops."""
    wanted = {f"sparsecc::{op}" for op in OPS_OF[request]}
    return sum(inst.op in wanted for inst in compiled.program.instructions)


def skip_reasons(compiled, request: str) -> list[str]:
    """The report's skipped entries of the request's pass, as `layer: reason`."""
    return [f"{s['layer']}: {s['reason']}" for s in compiled.report().to_dict()["skipped"]
            if s["rule"].startswith(RULES_OF[request])]
