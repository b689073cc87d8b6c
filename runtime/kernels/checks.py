"""Per-call refusal shared by the kernels: a call whose operands break the op's contract raises
`RuntimeProgramError` naming the op, before any memory is touched."""
from __future__ import annotations

from typing import Optional

from ..errors import RuntimeProgramError


def refuse(op: str, problem: Optional[str]) -> None:
    """Raise RuntimeProgramError("sparsecc::<op>: <problem>") when a check found a problem."""
    if problem:
        raise RuntimeProgramError(f"sparsecc::{op}: {problem}")
