"""sparsecc: a compiler for sparsity in neural networks.

The public API and the public subpackages are loaded lazily so that
`import sparsecc.runtime` (what a deployed artifact needs) loads neither the
compiler nor the passes, while `import sparsecc; sparsecc.runtime.load(...)`
works as written.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compile": ("sparsecc.entry", "compile"),
    "CompiledModel": ("sparsecc.api", "CompiledModel"),
    "plan": ("sparsecc.planner", "plan"),
    "SparsityConfig": ("sparsecc.config", "SparsityConfig"),
    "WeightsConfig": ("sparsecc.config", "WeightsConfig"),
    "MoEConfig": ("sparsecc.config", "MoEConfig"),
    "AttentionConfig": ("sparsecc.config", "AttentionConfig"),
    "SparseccError": ("sparsecc.errors", "SparseccError"),
    "ConfigError": ("sparsecc.errors", "ConfigError"),
    "CaptureError": ("sparsecc.errors", "CaptureError"),
    "InputMismatchError": ("sparsecc.runtime.errors", "InputMismatchError"),
    "prune_checkpoint": ("sparsecc.prune_checkpoint", "prune_checkpoint"),
    "load_compressed": ("sparsecc.checkpoint_io", "load_compressed"),
}

# subpackages a user reaches as attributes of `sparsecc` (imported on first use)
SUBPACKAGES = ("examples", "onnx", "passes", "runtime")

__all__ = sorted(_LAZY) + list(SUBPACKAGES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in SUBPACKAGES:
        value = importlib.import_module(f"sparsecc.{name}")
    elif name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    else:
        raise AttributeError(f"module 'sparsecc' has no attribute '{name}'")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
