"""Load `MODULE:FACTORY` (or `path/to/file.py:FACTORY`) for the command line.

The factory is called with no arguments and returns the model and how to call it:
`model`, `(model, args)` or `(model, args, kwargs)`, the way `sparsecc.compile(model, args,
example_kwargs=kwargs)` takes them (`args` a tuple or a lone tensor, `kwargs` a dict such as
`{"attention_mask": mask}`). `MODULE` is imported from the current directory first, then from
the installed packages (`sparsecc.examples.tiny_transformer:build` works from anywhere).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, NamedTuple

import torch

from .errors import FactoryError

FACTORY_RESULTS = "a model, (model, args) or (model, args, kwargs)"
FACTORY_HELP = f"MODULE:FACTORY or file.py:FACTORY; the factory returns {FACTORY_RESULTS}"


class FactoryCall(NamedTuple):
    """What a factory returned: the model and the example call `model(*args, **kwargs)`."""
    model: torch.nn.Module
    args: Any
    kwargs: dict


def load_factory(spec: str) -> FactoryCall:
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise FactoryError(f"expected MODULE:FACTORY (e.g. sparsecc.examples.tiny_transformer:build), got {spec!r}")
    module = _import(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise FactoryError(f"{module_name} has no attribute {attr!r}")
    if not callable(factory):
        raise FactoryError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    return unpack_factory_result(spec, factory())


def _import(name: str):
    if name.endswith(".py"):
        return _import_file(name)
    if os.getcwd() not in sys.path:   # the console script's sys.path lacks the current directory; last, so
        sys.path.append(os.getcwd())  # a stray file there never shadows a library imported later
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise FactoryError(f"cannot import module {name!r} from the current directory or the installed "
                           f"packages: {err}") from err


def _import_file(path: str):
    if not os.path.isfile(path):
        raise FactoryError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unpack_factory_result(spec: str, result: Any) -> FactoryCall:
    """The factory's result as a FactoryCall, or an error saying what it must return."""
    parts = result if isinstance(result, tuple) else (result,)
    if not 1 <= len(parts) <= 3 or not isinstance(parts[0], torch.nn.Module):
        raise FactoryError(f"{spec} must return {FACTORY_RESULTS}; got {_describe(result)}")
    model, args, kwargs = (*parts, *((), {})[len(parts) - 1:])   # missing args are (), missing kwargs {}
    if not isinstance(kwargs, dict):
        raise FactoryError(f"{spec}: the keyword inputs (third item) must be a dict, got {type(kwargs).__name__}")
    if len(parts) == 1 and (missing := _required_inputs(model)):
        raise FactoryError(f"{spec} returned a model alone, but its forward needs {', '.join(missing)}: "
                           f"return (model, args) or (model, args, kwargs)")
    return FactoryCall(model, args, kwargs)


def _required_inputs(model: torch.nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):   # a forward without a readable signature: let capture decide
        return []
    return [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _describe(result: Any) -> str:
    if isinstance(result, tuple):
        return f"a tuple of {len(result)} ({', '.join(type(x).__name__ for x in result)})"
    return type(result).__name__
