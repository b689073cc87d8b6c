"""Errors sparsecc raises for bad input. Each message names what was wrong and what is accepted."""
from __future__ import annotations


class SparseccError(Exception):
    """Base class of every error sparsecc raises on purpose."""


class ConfigError(SparseccError, ValueError):
    """An invalid sparsity config, pipeline or option."""


class CaptureError(SparseccError):
    """torch.export could not capture the model; the exporter's reason is attached."""


class LoweringError(SparseccError):
    """The rewritten graph holds something the Program cannot express."""


class FactoryError(SparseccError):
    """A MODULE:FACTORY given on the command line cannot be loaded or returned the wrong thing."""
