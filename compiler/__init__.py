"""sparsecc: a compiler for sparsity in neural networks.

The public API is loaded lazily so that `import sparsecc.runtime` (what a
deployed artifact needs) loads neither the compiler nor the passes.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compile": ("sparsecc.api", "compile"),
    "CompiledModel": ("sparsecc.api", "CompiledModel"),
    "SparsityConfig": ("sparsecc.config", "SparsityConfig"),
    "WeightsConfig": ("sparsecc.config", "WeightsConfig"),
    "MoEConfig": ("sparsecc.config", "MoEConfig"),
    "AttentionConfig": ("sparsecc.config", "AttentionConfig"),
    "SparseccError": ("sparsecc.errors", "SparseccError"),
    "ConfigError": ("sparsecc.errors", "ConfigError"),
    "CaptureError": ("sparsecc.errors", "CaptureError"),
    "InputMismatchError": ("sparsecc.runtime.errors", "InputMismatchError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sparsecc' has no attribute '{name}'")
    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
