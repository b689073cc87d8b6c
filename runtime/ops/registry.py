"""One entry per sparse op: schema lives in the op module, everything else is named here.

An `OpDef` is the single place the rest of sparsecc looks an op up:
the custom op (for FX graphs and fake shapes), the kernels per backend
(what the Program executor calls), the verifier (what the PassManager calls
after every pass) and the name of the ONNX export rule (which lives in the
compiler, so the runtime never imports it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

# verify(*args, **kwargs) receives the op's arguments: FakeTensors from the
# PassManager, or real tensors for constants and FakeTensors for registers from
# the load-time validator. It checks shapes, dtypes and static arguments always,
# and the data of metadata tensors that `has_data`; returns None when the call is
# well formed, else a one-line reason.
Verifier = Callable[..., Optional[str]]


def has_data(t: Any) -> bool:
    """True for a tensor whose values can be read (not a FakeTensor, not on the meta device)."""
    return isinstance(t, torch.Tensor) and not is_fake(t) and t.device.type != "meta"


@dataclass(frozen=True)
class OpDef:
    name: str                                   # "nm_linear" -> sparsecc::nm_linear
    op: Any                                     # torch.ops.sparsecc.<name>.default
    kernels: dict[str, Callable[..., Any]]      # backend ("torch", "triton") -> kernel
    verify: Verifier
    onnx_export: Optional[str] = None           # export rule in sparsecc.onnx.export.rules.EXPORT_RULES
    attrs: tuple[str, ...] = field(default=())  # non-tensor arguments, printed as {k=v}
    # Small well-formed argument tuples (CPU), for the registry test that walks every op.
    samples: Optional[Callable[[], list[tuple]]] = None
    # backend -> factory(args, kwargs) of a kernel for one program instruction, given its decoded arguments
    # (constants as tensors, registers as placeholders): a callable with the kernel's signature that may keep
    # what the instruction's fixed operands let it decide once, or None where it has nothing to keep
    instruction_kernels: dict[str, Callable[[list, dict], Optional[Callable[..., Any]]]] = field(default_factory=dict)

    @property
    def qualname(self) -> str:
        return f"sparsecc::{self.name}"

    def kernel(self, backend: str) -> Callable[..., Any]:
        try:
            return self.kernels[backend]
        except KeyError:
            have = ", ".join(sorted(self.kernels))
            raise KeyError(f"op {self.qualname} has no '{backend}' kernel (has: {have})") from None
