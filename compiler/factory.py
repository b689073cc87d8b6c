"""Load `MODULE:FACTORY` (or `path/to/file.py:FACTORY`) for the command line.

The factory is called with no arguments and returns `(model, example_inputs)`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

import torch

from .errors import FactoryError


def load_factory(spec: str) -> tuple[torch.nn.Module, Any]:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"expected MODULE:FACTORY (e.g. examples.tiny_transformer:build), got {spec!r}")
    module = _import(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise FactoryError(f"{module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise FactoryError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    return _unpack(spec, factory())


def _import(name: str):
    if name.endswith(".py"):
        return _import_file(name)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise FactoryError(f"cannot import module {name!r}: {err}") from err


def _import_file(path: str):
    if not os.path.isfile(path):
        raise FactoryError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unpack(spec: str, result: Any) -> tuple[torch.nn.Module, Any]:
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise FactoryError(f"{spec} must return (model, example_inputs); got {type(result).__name__}")
    return result
