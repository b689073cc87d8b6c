"""How the Triton launchers start a kernel: `launcher(kernel, grid)(*args, **kwargs)`.

Normally that is `kernel[grid](...)` (Triton's JIT). Under `use_launcher(hook)`
it is `hook(kernel, grid, *args, **kwargs)` instead: the AOT build records the
launches a program makes (`KernelSpec` of each), and a loaded artifact runs
them from prebuilt binaries. The launchers' host code (routing, strides, grids)
runs unchanged either way, so build and load see the same specialisations.

A specialisation is what `triton.compile(ASTSource(fn, signature, constexprs),
options=...)` needs: every parameter's type (`*fp16`, `i32`, `fp32`, or
`constexpr`), the constexpr values and the compile options (num_warps, num_stages).
"""
from __future__ import annotations

import functools
import inspect
import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                 torch.bool: "i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")
KERNEL_MODULE_PREFIX = "sparsecc.runtime.kernels.triton."

_hook: ContextVar[Optional[Callable[..., Any]]] = ContextVar("sparsecc_triton_launch_hook", default=None)


@dataclass(frozen=True)
class KernelSpec:
    kernel: str                    # "sparsecc.runtime.kernels.triton.nm_linear:nm_linear_kernel"
    signature: dict[str, str]      # every parameter, in order -> type or "constexpr"
    constexprs: dict[str, Any]
    options: dict[str, int]       # the launch's explicit num_warps / num_stages; the backend's defaults otherwise

    @property
    def entry(self) -> str:
        return self.kernel.rpartition(":")[2]

    def key(self) -> str:
        """Canonical text of the specialisation: what a launch is matched against at load."""
        return json.dumps({"kernel": self.kernel, "signature": self.signature, "constexprs": self.constexprs,
                           "options": self.options}, sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "signature": self.signature, "constexprs": self.constexprs,
                "options": self.options}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelSpec":
        return cls(data["kernel"], dict(data["signature"]), dict(data["constexprs"]), dict(data["options"]))


def input_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input_precision for every kernel: fp32 follows torch's matmul precision setting, so it
    matches F.linear's default ("highest" -> ieee); 16-bit inputs take the tensor-core path."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def launcher(kernel: Any, grid: Any) -> Callable[..., Any]:
    """`kernel[grid]`, or the active hook bound to (kernel, grid)."""
    hook = _hook.get()
    return kernel[grid] if hook is None else functools.partial(hook, kernel, grid)


@contextmanager
def use_launcher(hook: Callable[..., Any]) -> Iterator[None]:
    """Route every `launcher(...)` call in this context to hook(kernel, grid, *args, **kwargs)."""
    token = _hook.set(hook)
    try:
        yield
    finally:
        _hook.reset(token)


def kernel_name(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable[..., Any]) -> tuple[tuple[str, bool], ...]:
    """(name, is_constexpr) per parameter; annotations may be strings (`from __future__ import annotations`)."""
    return tuple((p.name, "constexpr" in str(p.annotation)) for p in inspect.signature(fn).parameters.values())


def bind_launch(kernel: Any, args: tuple, kwargs: dict) -> tuple[KernelSpec, list[tuple[str, Any]]]:
    """The specialisation of one launch and its runtime arguments [(type, value)] in parameter order."""
    params = _parameters(getattr(kernel, "fn", kernel))
    names = [name for name, _ in params]
    if len(args) > len(names):
        raise TypeError(f"{kernel_name(kernel)} takes {len(names)} arguments, got {len(args)}")
    values = dict(zip(names, args))
    options = {k: int(kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs}
    values.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    missing = [name for name in names if name not in values]
    if missing:
        raise TypeError(f"{kernel_name(kernel)}: missing arguments {missing}")
    signature, constexprs, runtime_args = {}, {}, []
    for name, is_constexpr in params:
        value = values[name]
        if is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = arg_type(name, value)
            runtime_args.append((signature[name], value))
    return KernelSpec(kernel_name(kernel), signature, constexprs, options), runtime_args


def arg_type(name: str, value: Any) -> str:
    """Triton's type for a runtime argument (no value specialisation: every int is a plain i32/i64)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in POINTER_TYPES:
            raise TypeError(f"argument '{name}': tensors of dtype {value.dtype} are not supported")
        return "*" + POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument '{name}': cannot pass a {type(value).__name__} to a kernel")
