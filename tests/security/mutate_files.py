"""Fuzz mutations outside the program: the manifest's own fields and the weights' tensors.

The program mutations live in `fuzz.py`; these change what the loader reads before the program
(targets, the weights' name, the files table, the kernel table) and the constants the program
runs on (dtype, shape, values, presence), as an attacker who rewrites the safetensors file would.
"""
from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

from sparsecc.runtime.artifact import WEIGHTS

FILE_NAMES = [WEIGHTS, "../" + WEIGHTS, "/etc/passwd", "manifest.json", "manifest.sha256", "", ".", "kernels",
              "a/../../b", "weights.safetensors/", "x" * 5000, "\x00", "/dev/zero"]
TARGETS = ["cpu", "cuda:90", "cuda:80", "hip:gfx942", "cpu:1", "", "tpu", "cuda:1000"]
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.int8]


def mutate_manifest_fields(data: Any, manifest: dict[str, Any]) -> str:
    field_name = data.draw(st.sampled_from(["targets", "weights", "files", "kernels", "versions", "format"]))
    if field_name == "targets":
        manifest["targets"] = data.draw(st.lists(st.sampled_from(TARGETS) | st.integers(), max_size=3))
        return f"manifest targets = {manifest['targets']!r}"
    if field_name == "weights":
        manifest["weights"] = data.draw(st.sampled_from(FILE_NAMES) | st.integers() | st.none())
        return f"manifest weights = {manifest['weights']!r}"
    if field_name == "files":
        return _mutate_files_table(data, manifest)
    if field_name == "kernels":
        kernel = {"id": "k0", "kernel": data.draw(st.text(max_size=8)), "signature": {}, "constexprs": {},
                  "options": {}, "binaries": {"cuda:90": {"file": data.draw(st.sampled_from(FILE_NAMES))}}}
        manifest["kernels"] = data.draw(st.sampled_from([[kernel], [{}], ["k0"], {}, None, [kernel, kernel]]))
        return f"manifest kernels = {manifest['kernels']!r}"
    key = "versions" if field_name == "versions" else "format_version"
    manifest[key] = data.draw(st.sampled_from([None, 1, 2, 3, "2", {}, [], 2**70]))
    return f"manifest {key} = {manifest[key]!r}"


def _mutate_files_table(data: Any, manifest: dict[str, Any]) -> str:
    files = manifest["files"]
    name = data.draw(st.sampled_from(FILE_NAMES))
    entry = data.draw(st.sampled_from([
        {"sha256": "0" * 64, "bytes": 0}, {"sha256": "", "bytes": -1}, {"sha256": None, "bytes": 1 << 62},
        {"bytes": 10}, {}, [], "x", {"sha256": "0" * 64, "bytes": 1.5}, {"sha256": "0" * 64, "bytes": True}]))
    if data.draw(st.booleans()) and WEIGHTS in files:
        files[WEIGHTS] = entry
        return f"files[{WEIGHTS!r}] = {entry!r}"
    files[name] = entry
    return f"files[{name!r}] = {entry!r}"


def mutate_weights(data: Any, weights: dict[str, torch.Tensor]) -> str:
    """Change one constant: dtype, shape, values, or drop it; or add one."""
    name = data.draw(st.sampled_from(sorted(weights)))
    tensor = weights[name]
    change = data.draw(st.sampled_from(["dtype", "shape", "truncate", "values", "drop", "add"]))
    if change == "dtype":
        dtype = data.draw(st.sampled_from(DTYPES))
        weights[name] = tensor.to(dtype)
        return f"weights[{name!r}] as {dtype}"
    if change == "shape":
        shape = data.draw(st.sampled_from([[-1], [1, -1], [-1, 1], list(tensor.shape[::-1]), [tensor.numel(), 1, 1]]))
        weights[name] = tensor.reshape(shape)
        return f"weights[{name!r}] reshaped to {shape}"
    if change == "truncate":
        weights[name] = tensor.reshape(-1)[: data.draw(st.integers(0, max(tensor.numel() - 1, 0)))].clone()
        return f"weights[{name!r}] truncated to {weights[name].numel()} elements"
    if change == "values":
        value = data.draw(st.sampled_from([0, 1, 255, -1, 2**31 - 1, float("nan"), float("inf"), 1e30]))
        weights[name] = torch.full_like(tensor, value) if _fits(value, tensor.dtype) else tensor
        return f"weights[{name!r}] filled with {value!r}"
    if change == "drop":
        del weights[name]
        return f"weights[{name!r}] removed"
    weights["extra." + name] = torch.zeros(data.draw(st.sampled_from([[0], [1], [1 << 20]])))
    return f"weights['extra.{name}'] added"


def _fits(value: Any, dtype: torch.dtype) -> bool:
    if dtype.is_floating_point:
        return True
    if dtype == torch.bool or isinstance(value, float):
        return False
    info = torch.iinfo(dtype)
    return info.min <= value <= info.max
