"""The artifact fuzzer: hypothesis mutates a saved program, the harness loads and calls each mutant.

A case is 1-3 mutations of the pristine manifest (ops, arguments, registers, specs, shapes, symbol
ranges, sparse-op metadata, constant names, instruction order, and near misses: an argument changed
to a close value of the same kind, which gets past the structural checks), of the manifest's own
fields, or of the weights (`mutate_files.py`), written with every hash recomputed, as an attacker would. Its outcome must be one of refused_load / refused_call / ran;
a crash, a hang, another exception type or the planted payload running is a failure.
Used by tests/security/test_fuzz_artifacts.py (bounded) and bench/fuzz_artifacts.py (any N).
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sparsecc.runtime.artifact import WEIGHTS, sha256_file

from .attacker import Pristine, write_manifest_text
from .harness import Harness, Outcome
from .mutate_files import mutate_manifest_fields, mutate_weights

DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool", "complex64",
          "float8_e4m3fn", "qint8", "Tensor", "save", "load", "__class__", ""]
OTHER_OPS = [
    "aten::mm.default", "aten::bmm.default", "aten::index.Tensor", "aten::index_put_.default",
    "aten::index_select.default", "aten::gather.default", "aten::scatter.src", "aten::as_strided.default",
    "aten::as_strided_.default", "aten::empty_strided.default", "aten::new_empty.default", "aten::narrow.default",
    "aten::select.int", "aten::slice.Tensor", "aten::expand.default", "aten::repeat.default", "aten::cat.default",
    "aten::zeros.default", "aten::full.default", "aten::arange.start", "aten::topk.default", "aten::sort.default",
    "aten::copy_.default", "aten::unfold.default", "aten::embedding.default", "aten::view.dtype",
    "aten::_unsafe_view.default", "aten::_unsafe_index.Tensor", "aten::take.default", "aten::index_add.default",
]
DENIED_OPS = [
    "aten::_reshape_alias.default", "aten::segment_reduce.default", "aten::_convert_indices_from_csr_to_coo.default",
    "aten::_sobol_engine_draw.default", "aten::_indices.default", "aten::to_sparse.default", "aten::set_.source_Tensor",
    "aten::resize_.default", "aten::from_file.default", "aten::_sparse_coo_tensor_unsafe.default",
    "aten::_nested_tensor_from_mask.default", "aten::save.default", "aten::_print.default",
]
GARBAGE_OPS = ["", "aten::", "aten::linear", "aten::linear.nope", "aten::__class__.default", "os::system",
               "builtins::eval", "torch::load", "py::__import__", "py::getattr", "sparsecc::", "sparsecc::nope",
               "sparsecc::moe.default", "aten::linear.default.default"]
BIG_INTS = [-1, -2, 0, 1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, -2**63, 10**10, 10**30]

ints = st.one_of(st.integers(-3, 300), st.sampled_from(BIG_INTS))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e30]))
texts = st.text(max_size=12)


@dataclass
class FuzzCounts:
    tried: int = 0
    outcomes: Counter = field(default_factory=Counter)   # refused_load, refused_call, ran_correct, ran_changed, ...
    failures: list[tuple[str, Outcome]] = field(default_factory=list)

    def record(self, description: str, outcome: Outcome) -> None:
        self.tried += 1
        kind = outcome.kind if outcome.kind != "ran" else ("ran_correct" if outcome.correct else "ran_changed")
        self.outcomes[kind] += 1
        if not outcome.ok:
            self.failures.append((description, outcome))

    def table(self) -> str:
        rows = [("cases tried", self.tried)] + [(k, self.outcomes[k]) for k in
                                                ("refused_load", "refused_call", "ran_correct", "ran_changed")]
        rows += [(f"FAILED: {k}", n) for k, n in sorted(self.outcomes.items()) if k not in dict(rows)]
        return "\n".join(f"| {name:<22} | {count:>6} |" for name, count in rows)


def encodings(names: list[str]) -> st.SearchStrategy:
    """Any argument encoding, valid or not (registers, constants, dtypes, lists, odd scalars)."""
    scalar = st.one_of(
        st.builds(lambda i: {"r": i}, ints), st.builds(lambda c: {"c": c}, st.sampled_from(names) | texts),
        st.builds(lambda d: {"dtype": d}, st.sampled_from(DTYPES) | texts),
        st.builds(lambda d: {"device": d}, st.sampled_from(["cpu", "cuda", "meta", "cpu:99", "disk"])),
        st.builds(lambda d: {"layout": d}, st.sampled_from(["strided", "sparse_coo", "__doc__"])),
        st.builds(lambda d: {"memory_format": d}, st.sampled_from(["contiguous_format", "channels_last", "x"])),
        st.just({"r": 0, "c": "embed.weight"}), st.just({}), st.just({"eval": "1"}),
        ints, floats, st.booleans(), st.none(), texts)
    return st.recursive(scalar, lambda inner: st.lists(inner, max_size=4), max_leaves=8)


def tree_specs() -> st.SearchStrategy:
    kinds = st.sampled_from(["leaf", "none", "tuple", "list", "dict", "output", "payload.Evil", ""])
    leaf = st.builds(lambda k: {"kind": k}, kinds) | st.just(None) | texts | ints
    return st.recursive(leaf, lambda inner: st.builds(
        lambda k, items, keys, cls: {"kind": k, "items": items, "keys": keys, "class": cls},
        kinds, st.lists(inner, max_size=3), st.lists(texts | ints, max_size=3),
        st.sampled_from(["CausalLMOutput", "payload.Evil", "builtins.eval", ""])), max_leaves=6)


def mutate(data: Any, manifest: dict[str, Any]) -> str:
    """Apply one drawn mutation to `manifest` in place; a line that says what changed."""
    program = manifest["program"]
    instructions = program["instructions"]
    names = list(program["constant_names"]) or ["embed.weight"]
    if not instructions:   # earlier mutations deleted them all
        program["num_registers"] = data.draw(ints)
        return f"num_registers = {program['num_registers']!r}"
    used_ops = sorted({i["op"] for i in instructions})
    at = data.draw(st.integers(0, len(instructions) - 1))
    inst = instructions[at]
    kind = data.draw(st.sampled_from(MUTATIONS))
    if kind == "op":
        inst["op"] = data.draw(st.sampled_from(used_ops + OTHER_OPS + DENIED_OPS + GARBAGE_OPS) | texts)
        return f"instructions[{at}].op = {inst['op']!r}"
    if kind == "arg":
        j = data.draw(st.integers(0, len(inst["args"])))
        value = data.draw(encodings(names))
        inst["args"][j:j + 1] = [value]
        return f"instructions[{at}] ({inst['op']}).args[{j}] = {value!r}"
    if kind == "kwarg":
        key = data.draw(st.sampled_from(sorted(inst["kwargs"]) + ["dtype", "out", "unsafe", "self"]) | texts)
        inst["kwargs"][key] = data.draw(encodings(names))
        return f"instructions[{at}] ({inst['op']}).kwargs[{key!r}] = {inst['kwargs'][key]!r}"
    if kind == "metadata":
        return _mutate_metadata(data, instructions)
    if kind == "near":
        return _near_miss(data, program, at)
    if kind == "constant":
        return _mutate_constant(data, program, names)
    if kind == "registers":
        return _mutate_registers(data, program, inst, at)
    if kind == "specs":
        return _mutate_specs(data, program)
    return _mutate_order(data, instructions, at)


def _mutate_metadata(data: Any, instructions: list[dict]) -> str:
    """An int or float argument of a sparsecc op (n, m, in_features, top_k, block sizes, capacity, scale)."""
    sites = [(i, j) for i, inst in enumerate(instructions) if inst["op"].startswith("sparsecc::")
             for j, a in enumerate(inst["args"]) if isinstance(a, (int, float, str)) or a is None]
    if not sites:
        return "no sparse-op metadata left to change"
    i, j = data.draw(st.sampled_from(sites))
    value = data.draw(ints | floats | st.sampled_from(["softmax", "sigmoid", "relu", "zero", "nan", ""]))
    instructions[i]["args"][j] = value
    return f"instructions[{i}] ({instructions[i]['op']}).args[{j}] = {value!r}"


def _near_miss(data: Any, program: dict, at: int) -> str:
    """An argument changed to a value of the same kind close to the original (another valid register or
    constant, an int off by one or doubled, a list with one element changed): mutants that get past the
    structural checks and test shapes, metadata and the kernels themselves."""
    args = program["instructions"][at]["args"]
    if not args:
        return f"instructions[{at}] has no arguments to change"
    j = data.draw(st.integers(0, len(args) - 1))
    args[j] = data.draw(_near(args[j], program))
    return f"instructions[{at}] ({program['instructions'][at]['op']}).args[{j}] = {args[j]!r}"


def _near(value: Any, program: dict) -> st.SearchStrategy:
    if isinstance(value, bool) or value is None:
        return st.sampled_from([True, False, None])
    if isinstance(value, int):
        return st.sampled_from([value - 1, value + 1, 2 * value, -value, 0, value * 1024])
    if isinstance(value, float):
        return st.sampled_from([-value, 0.0, 2 * value, value + 1e-3, float("nan"), float("inf")])
    if isinstance(value, dict) and "r" in value:
        return st.builds(lambda r: {"r": r}, st.integers(0, max(program["num_registers"] - 1, 0)))
    if isinstance(value, dict) and "c" in value and program["constant_names"]:
        return st.builds(lambda c: {"c": c}, st.sampled_from(program["constant_names"]))
    if isinstance(value, list) and value:
        return st.integers(0, len(value) - 1).flatmap(
            lambda i: _near(value[i], program).map(lambda v: value[:i] + [v] + value[i + 1:]))
    return st.just(value)


def _mutate_constant(data: Any, program: dict, names: list[str]) -> str:
    sites = [(i, j) for i, inst in enumerate(program["instructions"]) for j, a in enumerate(inst["args"])
             if isinstance(a, dict) and "c" in a]
    if sites and data.draw(st.booleans()):
        i, j = data.draw(st.sampled_from(sites))
        name = data.draw(st.sampled_from(names) | texts)
        program["instructions"][i]["args"][j] = {"c": name}
        return f"instructions[{i}].args[{j}] = {{'c': {name!r}}}"
    program["constant_names"] = data.draw(st.lists(st.sampled_from(names) | texts, max_size=len(names) + 1))
    return f"constant_names = {program['constant_names']!r}"


def _mutate_registers(data: Any, program: dict, inst: dict, at: int) -> str:
    field_name = data.draw(st.sampled_from(["outputs", "unpack", "num_registers", "inputs", "program_outputs"]))
    if field_name == "outputs":
        inst["outputs"] = data.draw(st.lists(ints, max_size=4))
        return f"instructions[{at}].outputs = {inst['outputs']!r}"
    if field_name == "unpack":
        inst["unpack"] = not inst["unpack"]
        return f"instructions[{at}].unpack = {inst['unpack']!r}"
    if field_name == "num_registers":
        program["num_registers"] = data.draw(ints)
        return f"num_registers = {program['num_registers']!r}"
    if field_name == "inputs":
        program["inputs"] = data.draw(st.lists(ints, max_size=3))
        return f"inputs = {program['inputs']!r}"
    program["outputs"] = data.draw(st.lists(encodings(program["constant_names"] or ["embed.weight"]), max_size=3))
    return f"outputs = {program['outputs']!r}"


def _mutate_specs(data: Any, program: dict) -> str:
    target = data.draw(st.sampled_from(["dtype", "shape", "ranges", "hints", "in_spec", "out_spec", "state"]))
    spec = program["input_specs"][0]
    if target == "dtype":
        spec["dtype"] = data.draw(st.sampled_from(DTYPES) | texts)
        return f"input_specs[0].dtype = {spec['dtype']!r}"
    if target == "shape":
        spec["shape"] = data.draw(st.lists(ints | st.sampled_from(["s0", "u0", "", "s0*2"]), max_size=4))
        return f"input_specs[0].shape = {spec['shape']!r}"
    if target in ("ranges", "hints"):
        key = "symbol_ranges" if target == "ranges" else "symbol_hints"
        value = data.draw(st.lists(ints | st.none(), max_size=3) if target == "ranges" else ints | floats | texts)
        name = data.draw(st.sampled_from(sorted(program[key]) + ["s0", "u0"]) | texts)
        program[key][name] = value
        return f"{key}[{name!r}] = {value!r}"
    if target == "state":
        program["state_names"] = data.draw(st.lists(st.sampled_from(program["constant_names"] or ["embed.weight"]) | texts, max_size=2))
        return f"state_names = {program['state_names']!r}"
    program[target] = data.draw(tree_specs())
    return f"{target} = {program[target]!r}"


def _mutate_order(data: Any, instructions: list[dict], at: int) -> str:
    action = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
    if action == "delete":
        del instructions[at]
        return f"del instructions[{at}]"
    if action == "duplicate":
        instructions.insert(at, copy.deepcopy(instructions[at]))
        return f"instructions[{at}] duplicated"
    other = data.draw(st.integers(0, len(instructions) - 1))
    instructions[at], instructions[other] = instructions[other], instructions[at]
    return f"instructions[{at}] <-> instructions[{other}]"


MUTATIONS = ["op", "arg", "kwarg", "metadata", "near", "near", "near", "constant", "registers", "specs", "order"]


def mutate_case(data: Any, manifest: dict[str, Any], weights: dict[str, torch.Tensor]) -> str:
    """One mutation: mostly of the program, sometimes of the manifest's own fields or of the weights."""
    where = data.draw(st.sampled_from(["program"] * 8 + ["manifest", "weights"]))
    if where == "manifest":
        return mutate_manifest_fields(data, manifest)
    if where == "weights":
        return mutate_weights(data, weights)
    return mutate(data, manifest)


def run_case(manifest: dict[str, Any], weights: Optional[dict[str, torch.Tensor]], pristine: Pristine,
             harness: Harness, folder: Path) -> Outcome:
    """Write the mutant (the pristine weights unless `weights` is given), hashes recomputed, and run it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if weights is None:
        shutil.copyfile(pristine.folder / WEIGHTS, folder / WEIGHTS)
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS))
    entry = manifest.get("files", {}).get(WEIGHTS) if isinstance(manifest.get("files"), dict) else None
    if weights is not None and isinstance(entry, dict) and set(entry) == {"sha256", "bytes"}:
        entry.update(sha256=sha256_file(folder / WEIGHTS), bytes=(folder / WEIGHTS).stat().st_size)
    write_manifest_text(folder, json.dumps(manifest).encode())
    return harness.run(folder, pristine.inputs, pristine.reference, timeout_s=15.0)


def fuzz(pristine: Pristine, harness: Harness, examples: int) -> FuzzCounts:
    """Run `examples` derandomized hypothesis cases; every outcome is counted, failures collected (not raised)."""
    counts, base = FuzzCounts(), pristine.manifest()
    base_weights = load_file(str(pristine.folder / WEIGHTS))
    scratch = Path(tempfile.mkdtemp(prefix="sparsecc-fuzz-"))

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=(Phase.generate,), suppress_health_check=list(HealthCheck))
    @given(st.data())
    def case(data: Any) -> None:
        manifest, weights = copy.deepcopy(base), dict(base_weights)
        description = "; ".join(mutate_case(data, manifest, weights) for _ in range(data.draw(st.integers(1, 3))))
        changed = weights if weights.keys() != base_weights.keys() or any(
            weights[k] is not base_weights[k] for k in weights) else None
        counts.record(description, run_case(manifest, changed, pristine, harness, scratch / "case"))

    try:
        case()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return counts
