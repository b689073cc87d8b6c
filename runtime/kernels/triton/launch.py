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
    divisible: tuple[str, ...] = ()   # runtime arguments known divisible by 16 (pointers: 16-byte aligned)

    @property
    def entry(self) -> str:
        return self.kernel.rpartition(":")[2]

    def key(self) -> str:
        """Canonical text of the specialisation: what a launch is matched against at load."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "signature": self.signature, "constexprs": self.constexprs,
                "options": self.options, "divisible": list(self.divisible)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelSpec":
        return cls(data["kernel"], dict(data["signature"]), dict(data["constexprs"]), dict(data["options"]),
                   tuple(data.get("divisible", ())))


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


def jit(*, per_call: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Any]:
    """`triton.jit` for a kernel the launchers start. `per_call` names the integer arguments whose values
    change from call to call (token counts, pair counts): like Triton's do_not_specialize, neither the JIT
    nor the kernel cache specialises them on divisibility by 16, so one binary serves every value (an AOT
    artifact stays valid at any token count). The module's source hash at import is kept, so an
    in-process build can tell when the file on disk has changed since."""
    import triton

    def decorate(fn: Callable[..., Any]) -> Any:
        fn.sparsecc_per_call = tuple(per_call)
        fn.sparsecc_source_sha256 = _imported_source_sha256(inspect.getsourcefile(fn))
        return triton.jit(do_not_specialize=list(per_call))(fn)
    return decorate


@functools.lru_cache(maxsize=None)
def _imported_source_sha256(path: str) -> str:
    """The kernel module's file as it was when imported (read once per module, not per kernel)."""
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@functools.lru_cache(maxsize=None)
def _parameters(fn: Callable[..., Any]) -> tuple[tuple[str, bool], ...]:
    """(name, is_constexpr) per parameter; annotations may be strings (`from __future__ import annotations`)."""
    return tuple((p.name, "constexpr" in str(p.annotation)) for p in inspect.signature(fn).parameters.values())


def _divisible(name: str, value: Any, per_call: tuple[str, ...]) -> bool:
    """Triton's "D" specialisation: a 16-byte-aligned pointer, or an int divisible by 16 (not a per-call one)."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and name not in per_call and value % 16 == 0


LaunchKey = tuple   # (kernel function, per parameter (type, divisible by 16) or ("constexpr", value), options)


def launch_key(kernel: Any, args: tuple, kwargs: dict) -> tuple[LaunchKey, list[tuple[str, Any]]]:
    """A hashable key of one launch's specialisation, and its runtime arguments [(type, value)] in
    parameter order: the per-launch work of a launch hook (a KernelSpec is built once per key)."""
    fn = getattr(kernel, "fn", kernel)
    params = _parameters(fn)
    if len(args) > len(params):
        raise TypeError(f"{kernel_name(kernel)} takes {len(params)} arguments, got {len(args)}")
    unknown = set(kwargs) - {name for name, _ in params} - set(LAUNCH_OPTIONS)
    if unknown:
        raise TypeError(f"{kernel_name(kernel)}: unknown launch arguments {sorted(unknown)}")
    per_call = getattr(fn, "sparsecc_per_call", ())
    parts, runtime_args = [], []
    for index, (name, is_constexpr) in enumerate(params):
        if index < len(args):
            value = args[index]
        elif name in kwargs:
            value = kwargs[name]
        else:
            missing = [n for n, _ in params[index:] if n not in kwargs]
            raise TypeError(f"{kernel_name(kernel)}: missing arguments {missing}")
        if is_constexpr or value is None:
            parts.append(("constexpr", value))
        else:
            kind = arg_type(name, value)
            parts.append((kind, _divisible(name, value, per_call)))
            runtime_args.append((kind, value))
    options = tuple((k, int(kwargs[k])) for k in LAUNCH_OPTIONS if k in kwargs)
    return (fn, tuple(parts), options), runtime_args


@functools.lru_cache(maxsize=None)
def spec_of(key: LaunchKey) -> KernelSpec:
    fn, parts, options = key
    signature, constexprs, divisible = {}, {}, []
    for (name, _), (kind, value) in zip(_parameters(fn), parts):
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = kind
            if value:
                divisible.append(name)
    return KernelSpec(kernel_name(fn), signature, constexprs, dict(options), tuple(divisible))


def bind_launch(kernel: Any, args: tuple, kwargs: dict) -> tuple[KernelSpec, list[tuple[str, Any]]]:
    """The specialisation of one launch and its runtime arguments [(type, value)] in parameter order."""
    key, runtime_args = launch_key(kernel, args, kwargs)
    return spec_of(key), runtime_args


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
