"""sparsecc::moe on CPU with the stacked expert weights kept N:M-compressed: no dense expert weight per call.

    gate_up_values [E, 2I|I, H*N/M], gate_up_indices [E, 2I|I, bytes(H)]   (nm_format, per expert row)
    down_values    [E, H, I*N/M],    down_indices    [E, H, bytes(I)]

Routing, the sort by expert, the expert form (biases, interleaved GLU, GPT-OSS's clamped SwiGLU), the
weighted scatter back and the shared expert are moe.py's (`dispatch_moe`); only the expert runner
differs. Each expert that received rows runs its two projections as two nm_linear calls on its own
slice of the compressed tensors, each through nm_linear's CPU path choice (`nm_paths.choose_path`,
keep="memory"): the MLIR-generated decode kernel for 1..16 rows (values and packed positions streamed
once, never a dense weight), the decompressed-tile / whole-weight GEMMs above that, measured per
projection shape and row bucket on the first call. Experts no token reached are never read, where
nm_decompress of the stacked weights (the form prune-nm emits today) expands every expert every call.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ...nm_format import decompress_nm, nm_weight_problem
from ..checks import refuse
from ..moe_contract import MoECall, call_problem
from .moe import ALL_ACTIVATIONS, ExpertForm, dispatch_moe
from .nm_paths import RUNNERS, choose_path


@dataclass(frozen=True)
class NMExperts:
    """A moe call's stacked expert weights in N:M-compressed form (layout: `sparsecc.runtime.nm_format`)."""
    gate_up_values: Tensor
    gate_up_indices: Tensor
    down_values: Tensor
    down_indices: Tensor
    n: int
    m: int

    @property
    def width(self) -> int:
        """H: the gate/up projection's reduction dim."""
        return self.gate_up_values.shape[-1] * self.m // self.n

    @property
    def intermediate(self) -> int:
        """I: the down projection's reduction dim."""
        return self.down_values.shape[-1] * self.m // self.n

    def problem(self, check_data: bool) -> Optional[str]:
        """None when both stacked weights are well-formed [E, rows, K] N:M weights, else why not."""
        for name, values, indices, k in (("gate_up", self.gate_up_values, self.gate_up_indices, self.width),
                                         ("down", self.down_values, self.down_indices, self.intermediate)):
            if values.dim() != 3:
                return f"{name} values {list(values.shape)} must be [E, rows, K*N/M]"
            problem = nm_weight_problem(values, indices, self.n, self.m, k, check_data)
            if problem:
                return f"{name}: {problem}"
        return None

    def dense_shaped(self) -> tuple[Tensor, Tensor]:
        """Meta tensors shaped as the dense (w_gate_up, w_down): the moe contract's checks read shapes only."""
        return (torch.empty(*self.gate_up_values.shape[:-1], self.width, dtype=self.gate_up_values.dtype,
                            device="meta"),
                torch.empty(*self.down_values.shape[:-1], self.intermediate, dtype=self.down_values.dtype,
                            device="meta"))

    def decompressed(self) -> tuple[Tensor, Tensor]:
        """The dense (w_gate_up, w_down): what nm_decompress of each stacked weight makes (for comparisons)."""
        return (decompress_nm(self.gate_up_values, self.gate_up_indices, self.n, self.m, self.width),
                decompress_nm(self.down_values, self.down_indices, self.n, self.m, self.intermediate))

    def run(self, sorted_rows: Tensor, tokens_per_expert: Tensor, call: MoECall, form: ExpertForm) -> Tensor:
        """An ExpertRunner (moe.py): each used expert's segment of the expert-sorted rows through its
        compressed gate_up, the expert form and its compressed down projection."""
        out, start = torch.empty_like(sorted_rows), 0
        for expert, count in enumerate(tokens_per_expert.tolist()):
            if count:
                rows = sorted_rows[start:start + count]
                projected = self.project(rows, self.gate_up_values[expert], self.gate_up_indices[expert],
                                         _bias(call.b_gate_up, expert), self.width)
                out[start:start + count] = self.project(form.apply(projected), self.down_values[expert],
                                                        self.down_indices[expert], _bias(call.b_down, expert),
                                                        self.intermediate)
                start += count
        return out

    def project(self, x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor], k: int) -> Tensor:
        """x @ W.T + bias for one expert's compressed W [out, k], on nm_linear's measured CPU path."""
        path = choose_path(x, values, indices, bias, self.n, self.m, k, "memory")
        return RUNNERS[path](x, values, indices, bias, self.n, self.m, k)


def _bias(bias: Optional[Tensor], expert: int) -> Optional[Tensor]:
    return None if bias is None else bias[expert]


def moe_cpu_nm(experts: NMExperts, *args, **kwargs) -> Tensor:
    """sparsecc::moe with `experts` in place of the dense w_gate_up / w_down: args and kwargs are the
    op's (semantics in `sparsecc.runtime.ops.moe`), w_gate_up and w_down among them given as None."""
    refuse("moe", experts.problem(check_data=True))
    call = MoECall(*args, **kwargs)
    w_gate_up, w_down = experts.dense_shaped()
    call = replace(call, w_gate_up=w_gate_up, w_down=w_down)   # shapes for the checks; never read
    refuse("moe", call_problem(call, ALL_ACTIVATIONS))
    return dispatch_moe(call, experts.run)
