"""sparsecc.runtime: the sparse ops, their kernels and the Program executor.

Imports nothing from `sparsecc` outside this package, so a lowered program
runs without the compiler or the passes.
"""
from __future__ import annotations

from .errors import ArtifactError, InputMismatchError, RuntimeProgramError
from .executor import Executor
from .loaded_generator import load_any as load
from .program import Instruction, Program

__all__ = ["ArtifactError", "Executor", "InputMismatchError", "Instruction", "Program", "RuntimeProgramError",
           "load"]
