"""The batches a data-driven rewrite observes: the user's calibration, or the example inputs."""
from __future__ import annotations

from torch import Tensor

from .manager import PassContext

NO_CALIBRATION = "example inputs (no calibration given)"


def calibration_batches(ctx: PassContext, pass_name: str) -> tuple[list[tuple], str]:
    """The batches (flat tensors in placeholder order) and a line saying where they came from.
    A batch may be a lone tensor; an empty calibration is refused, naming the pass."""
    if ctx.calibration is None:
        return [tuple(ctx.example_inputs)], NO_CALIBRATION
    batches = [(batch,) if isinstance(batch, Tensor) else tuple(batch) for batch in ctx.calibration]
    if not batches:
        raise ValueError(f"{pass_name}: calibration is empty; pass at least one batch or None")
    first = batches[0][0] if batches[0] and isinstance(batches[0][0], Tensor) else None
    shape = "" if first is None else f" of {list(first.shape)}"
    return batches, f"calibration: {len(batches)} batch(es){shape}"


__all__ = ["NO_CALIBRATION", "calibration_batches"]
