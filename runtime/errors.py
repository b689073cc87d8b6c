"""Errors the runtime raises. They subclass ValueError so callers that guard
against bad input generically still catch them."""
from __future__ import annotations


class RuntimeProgramError(ValueError):
    """A Program that cannot run: unknown op, op outside the allowlist, bad encoding."""


class InputMismatchError(ValueError):
    """Inputs that differ from what the program was compiled for."""


class ArtifactError(ValueError):
    """A saved artifact that cannot be loaded: tampered, truncated, wrong version, missing target."""
