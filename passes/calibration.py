"""The batches a data-driven rewrite observes: the user's calibration, or the example inputs."""
from __future__ import annotations

from torch import Tensor

from .manager import PassContext

NO_CALIBRATION = "example inputs (no calibration given)"
SHAPES_SHOWN = 3   # a report line, not a listing


def calibration_batches(ctx: PassContext, pass_name: str) -> tuple[list[tuple], str]:
    """The batches (flat tensors in placeholder order) and a line saying where they came from.
    A batch may be a lone tensor and may differ in size from the example inputs (the compiler captured those
    dims dynamic, compiler/calibrate.py); an empty calibration is refused, naming the pass."""
    if ctx.calibration is None:
        return [tuple(ctx.example_inputs)], NO_CALIBRATION
    batches = [(batch,) if isinstance(batch, Tensor) else tuple(batch) for batch in ctx.calibration]
    if not batches:
        raise ValueError(f"{pass_name}: calibration is empty; pass at least one batch or None")
    return batches, f"calibration: {len(batches)} batch(es){_first_input_shapes(batches)}"


def _first_input_shapes(batches: list[tuple]) -> str:
    """' of [48, 32]', or each distinct shape of the first input when batches differ (up to SHAPES_SHOWN)."""
    shapes = list(dict.fromkeys(tuple(b[0].shape) for b in batches if b and isinstance(b[0], Tensor)))
    if not shapes:
        return ""
    more = f" and {len(shapes) - SHAPES_SHOWN} more shape(s)" if len(shapes) > SHAPES_SHOWN else ""
    return f" of {', '.join(str(list(shape)) for shape in shapes[:SHAPES_SHOWN])}{more}"


__all__ = ["NO_CALIBRATION", "calibration_batches"]
