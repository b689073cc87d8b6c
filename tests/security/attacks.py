"""The attacks issue 13 found, each as an edit of a saved artifact with every hash recomputed.

An attack is (name, edit, expected outcomes). `edit(root)` rewrites a private copy of the pristine
artifact; the harness then loads and calls it. The expected outcomes are where the refusal must
come: structure, allowlist, registers, constants, shapes and sparse-op metadata are all known
before anything runs, so they are refused at load; values computed at run time (route indices)
may be refused at call or made safe by construction.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sparsecc.runtime.artifact import MANIFEST, MANIFEST_HASH, WEIGHTS

from .attacker import (BATCH, SEQ, add_constants, append_and_return, find, instruction, replace_file,
                       rewrite_manifest, rewrite_program, rewrite_weights, write_manifest_text)

LOAD = ("refused_load",)
REFUSED = ("refused_load", "refused_call")
HUGE = 1 << 40


@dataclass(frozen=True)
class Attack:
    name: str
    edit: Callable[[Path], None]
    expect: tuple[str, ...]


# ---- structure: torch's pytree decoder imports a module named in the file

def _pytree_spec_importing_payload() -> str:
    leaf = {"type": None, "context": None, "children_spec": []}
    imports_payload = json.dumps([{"__enum__": True, "fqn": "payload:Evil", "name": "A"}])
    return json.dumps([1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": "builtins.tuple", "context": "null", "children_spec": [leaf]},
        {"type": "builtins.dict", "context": imports_payload, "children_spec": [leaf]}]}])


def pytree_in_spec(root: Path) -> None:
    rewrite_program(root, lambda p: p.update(in_spec=_pytree_spec_importing_payload()))


def pytree_out_spec(root: Path) -> None:
    rewrite_program(root, lambda p: p.update(out_spec=_pytree_spec_importing_payload()))


def output_class_by_module_path(root: Path) -> None:
    spec = {"kind": "output", "class": "payload.Evil", "keys": ["logits"], "items": [{"kind": "leaf"}]}
    rewrite_program(root, lambda p: p.update(out_spec=spec))


def deeply_nested_spec(root: Path) -> None:
    """A tuple nested 200 deep: parses as JSON, far past any structure a model returns."""
    rewrite_program(root, lambda p: p.update(out_spec="DEEP"))
    deep = '{"kind": "tuple", "items": [' * 200 + '{"kind": "leaf"}' + "]}" * 200
    write_manifest_text(root, (root / MANIFEST).read_bytes().replace(b'"DEEP"', deep.encode()))


def deeply_nested_manifest_json(root: Path) -> None:
    """JSON nested past Python's recursion limit: the parser itself must fail as an ArtifactError."""
    text = (root / MANIFEST).read_bytes()
    write_manifest_text(root, text[:-1] + b', "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")


# ---- memory-unsafe ATen ops (the denylist let them through)

def reshape_alias_past_a_weight(root: Path) -> None:
    add_constants(root, {"attack.one": torch.ones(1)})
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::_reshape_alias.default", [{"c": "attack.one"}, [1 << 28], [1]], [r]),
        instruction("aten::clone.default", [{"r": r}], [r + 1])]))


def segment_reduce_unsafe(root: Path) -> None:
    add_constants(root, {"attack.lengths": torch.tensor([1 << 26], dtype=torch.int64)})
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::segment_reduce.default", [{"c": "embed.weight"}, "sum"], [r],
                    kwargs={"lengths": {"c": "attack.lengths"}, "unsafe": True})]))


def csr_to_coo_bad_crow(root: Path) -> None:
    add_constants(root, {"attack.crow": torch.tensor([0, 1 << 26], dtype=torch.int64),
                         "attack.col": torch.zeros(1, dtype=torch.int64)})
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::_convert_indices_from_csr_to_coo.default", [{"c": "attack.crow"}, {"c": "attack.col"}],
                    [r])]))


def sobol_draw_past_its_state(root: Path) -> None:
    add_constants(root, {"attack.quasi": torch.zeros(1 << 12, dtype=torch.int64),
                         "attack.state": torch.zeros(1, 30, dtype=torch.int64)})
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::_sobol_engine_draw.default",
                    [{"c": "attack.quasi"}, 1 << 10, {"c": "attack.state"}, 1 << 12, 0, None], [r, r + 1],
                    unpack=True)]))


def sparse_indices_written_in_place(root: Path) -> None:
    """to_sparse, then `_indices` (a view) filled with a huge index, then to_dense: a write out of bounds."""
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::to_sparse.default", [{"c": "embed.weight"}], [r]),
        instruction("aten::_indices.default", [{"r": r}], [r + 1]),
        instruction("aten::fill_.Scalar", [{"r": r + 1}, 1 << 40], [r + 2]),
        instruction("aten::to_dense.default", [{"r": r}], [r + 3])]))


# ---- sparse-op metadata

def _nm_indices(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def attack(root: Path) -> None:
        rewrite_weights(root, lambda w: w.update({"lm_head.weight_nm_indices": edit(w["lm_head.weight_nm_indices"])}))
    return attack


nm_indices_too_narrow = _nm_indices(lambda idx: idx[:, :1])
nm_indices_wrong_dtype = _nm_indices(lambda idx: idx.to(torch.int64))
nm_positions_repeated = _nm_indices(lambda idx: torch.zeros_like(idx))   # every pair of kept values at position 0


def nm_in_features_past_values(root: Path) -> None:
    """2:4 with in_features 4096 over values for 32 inputs: positions land far past each row."""
    rewrite_program(root, lambda p: find(p, "sparsecc::nm_linear")["args"].__setitem__(6, 4096))


def nm_group_of_eight_on_two_bit_indices(root: Path) -> None:
    rewrite_program(root, lambda p: find(p, "sparsecc::nm_linear")["args"].__setitem__(5, 8))


def moe_fewer_experts_than_router(root: Path) -> None:
    def drop_expert(w: dict) -> None:
        for name in [n for n in w if n.startswith("layers.0.moe.moe_w_")]:
            w[name] = w[name][:-1]
    rewrite_weights(root, drop_expert)


def moe_top_k_zero(root: Path) -> None:
    rewrite_program(root, lambda p: find(p, "sparsecc::moe")["args"].__setitem__(7, 0))


def moe_top_k_past_experts(root: Path) -> None:
    rewrite_program(root, lambda p: find(p, "sparsecc::moe")["args"].__setitem__(7, 9))


def moe_negative_capacity(root: Path) -> None:
    rewrite_program(root, lambda p: find(p, "sparsecc::moe")["args"].__setitem__(12, -1.0))


def route_negative_capacity(root: Path) -> None:
    rewrite_program(root, lambda p: find(p, "sparsecc::route")["args"].__setitem__(1, -0.5))


def block_attention_zero_block(root: Path) -> None:
    """block_q = 0 in the attention call (its layout is folded into constants: no layout op runs)."""
    rewrite_program(root, lambda p: find(p, "sparsecc::block_attention")["args"].__setitem__(9, 0))


def _shift_route_indices(op: str, shift: list[list[int]]) -> Callable[[Path], None]:
    """Insert `indices + shift` before `op`, so its indices for sequence 0 point into another sequence's rows."""
    def attack(root: Path) -> None:
        add_constants(root, {"attack.shift": torch.tensor(shift, dtype=torch.int64)})

        def edit(p: dict) -> None:
            target = find(p, op)
            r = p["num_registers"]
            p["num_registers"] += 1
            at = p["instructions"].index(target)
            p["instructions"].insert(at, instruction("aten::add.Tensor", [target["args"][-1], {"c": "attack.shift"}], [r]))
            target["args"][-1] = {"r": r}
        rewrite_program(root, edit)
    return attack


unroute_into_another_sequence = _shift_route_indices("sparsecc::unroute", [[SEQ]] + [[0]] * (BATCH - 1))
route_gather_from_another_sequence = _shift_route_indices("sparsecc::route_gather", [[SEQ]] + [[0]] * (BATCH - 1))
route_gather_far_out_of_bounds = _shift_route_indices("sparsecc::route_gather", [[1 << 30]] * BATCH)


# ---- registers, shapes, allocation

def negative_register_argument(root: Path) -> None:
    rewrite_program(root, lambda p: p["instructions"][1]["args"].__setitem__(0, {"r": -1}))


def negative_register_output(root: Path) -> None:
    rewrite_program(root, lambda p: p["instructions"][0].update(outputs=[-3]))


def register_past_the_file(root: Path) -> None:
    rewrite_program(root, lambda p: p["instructions"][1]["args"].__setitem__(0, {"r": 10**6}))


def ten_billion_registers(root: Path) -> None:
    rewrite_program(root, lambda p: p.update(num_registers=10**10))


def huge_input_spec(root: Path) -> None:
    rewrite_program(root, lambda p: p["input_specs"][0].update(shape=[HUGE, HUGE]))


def negative_input_spec(root: Path) -> None:
    rewrite_program(root, lambda p: p["input_specs"][0].update(shape=[-BATCH, SEQ]))


def empty_of_huge_shape(root: Path) -> None:
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::empty.memory_format", [[HUGE, HUGE]], [r], kwargs={"dtype": {"dtype": "float32"}})]))


def fill_a_weight_in_place(root: Path) -> None:
    """A weight written in place would change every later call (and the caller's next artifact run)."""
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::fill_.Scalar", [{"c": "embed.weight"}, 0.0], [r])]))


def write_a_weight_through_a_view(root: Path) -> None:
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::view.default", [{"c": "embed.weight"}, [-1]], [r]),
        instruction("aten::mul_.Scalar", [{"r": r}, 0.0], [r + 1])]))


def write_a_weight_through_dropout(root: Path) -> None:
    """`dropout(train=False)` returns its input with no alias annotation in its schema."""
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::dropout.default", [{"c": "embed.weight"}, 0.5, False], [r]),
        instruction("aten::mul_.Scalar", [{"r": r}, 0.0], [r + 1])]))


def write_the_callers_input(root: Path) -> None:
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::mul_.Scalar", [{"r": p["inputs"][0]}, 0], [r])]))


def allocation_sized_by_item(root: Path) -> None:
    """A size read from a constant at run time: the load cannot see it (1.2 GB, over the 1 GiB limit)."""
    add_constants(root, {"attack.n": torch.tensor(300_000_000, dtype=torch.int64)})
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::_local_scalar_dense.default", [{"c": "attack.n"}], [r]),
        instruction("aten::full.default", [[{"r": r}], 1.0], [r + 1])]))


def _python_arithmetic(op: str, args: list) -> Callable[[Path], None]:
    """A `py::` op on numbers whose result torch never sees: it must stay an int64 and never divide by zero."""
    def attack(root: Path) -> None:
        def edit(p: dict) -> None:
            p["instructions"].insert(0, instruction(op, args, [p["num_registers"]]))
            p["num_registers"] += 1
        rewrite_program(root, edit)
    return attack


python_floordiv_by_zero = _python_arithmetic("py::floordiv", [1, 0])
python_mul_past_int64 = _python_arithmetic("py::mul", [1 << 62, 1 << 62])


def missing_constant(root: Path) -> None:
    rewrite_program(root, lambda p: find(p, "aten::embedding.default")["args"].__setitem__(0, {"c": "no.such"}))


def dtype_by_attribute_name(root: Path) -> None:
    """`{"dtype": name}` resolved with getattr(torch, name) would reach any torch attribute."""
    rewrite_program(root, lambda p: append_and_return(p, lambda r: [
        instruction("aten::empty.memory_format", [[1]], [r], kwargs={"dtype": {"dtype": "save"}})]))


def program_output_of_unknown_layout(root: Path) -> None:
    """Found by the fuzzer: a program output encoding is decoded too, and must be refused as the artifact's fault."""
    rewrite_program(root, lambda p: p.update(outputs=[{"layout": "sparse_coo"}]))


def op_outside_namespaces(root: Path) -> None:
    rewrite_program(root, lambda p: p["instructions"][0].update(op="builtins::eval"))


# ---- files

def fifo_as_manifest_hash(root: Path) -> None:
    (root / MANIFEST_HASH).unlink()
    os.mkfifo(root / MANIFEST_HASH)


def dev_zero_as_weights(root: Path) -> None:
    (root / WEIGHTS).unlink()
    (root / WEIGHTS).symlink_to("/dev/zero")
    rewrite_manifest(root, lambda m: m["files"][WEIGHTS].update(bytes=1 << 40))


def weights_name_climbing_out(root: Path) -> None:
    outside = root.parent / "outside.safetensors"
    outside.write_bytes((root / WEIGHTS).read_bytes())

    def edit(m: dict) -> None:
        m["weights"] = "../outside.safetensors"
        m["files"]["../outside.safetensors"] = dict(m["files"].pop(WEIGHTS))
    rewrite_manifest(root, edit)


def weights_symlink_to_outside_file(root: Path) -> None:
    outside = root.parent / "outside.safetensors"
    outside.write_bytes((root / WEIGHTS).read_bytes())
    (root / WEIGHTS).unlink()
    (root / WEIGHTS).symlink_to(outside)


def _safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _weights_file(data: bytes) -> Callable[[Path], None]:
    return lambda root: replace_file(root, WEIGHTS, data)


weights_header_lies_about_shape = _weights_file(_safetensors(
    {"embed.weight": {"dtype": "F32", "shape": [1 << 40, 32], "data_offsets": [0, 8]}}, bytes(8)))
weights_overlapping_tensors = _weights_file(_safetensors(
    {"embed.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
     "lm_head.weight_nm_values": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)))
weights_shape_overflows = _weights_file(_safetensors(
    {"embed.weight": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 0]}}, b""))
weights_header_length_huge = _weights_file(struct.pack("<Q", 1 << 62) + b"{}")


ATTACKS = [Attack(name, edit, expect) for name, edit, expect in [
    ("pytree_in_spec_imports_payload", pytree_in_spec, LOAD),
    ("pytree_out_spec_imports_payload", pytree_out_spec, LOAD),
    ("output_class_by_module_path", output_class_by_module_path, LOAD),
    ("deeply_nested_spec", deeply_nested_spec, LOAD),
    ("deeply_nested_manifest_json", deeply_nested_manifest_json, LOAD),
    ("reshape_alias_past_a_weight", reshape_alias_past_a_weight, LOAD),
    ("segment_reduce_unsafe", segment_reduce_unsafe, LOAD),
    ("csr_to_coo_bad_crow", csr_to_coo_bad_crow, LOAD),
    ("sobol_draw_past_its_state", sobol_draw_past_its_state, LOAD),
    ("sparse_indices_written_in_place", sparse_indices_written_in_place, LOAD),
    ("nm_indices_too_narrow", nm_indices_too_narrow, LOAD),
    ("nm_indices_wrong_dtype", nm_indices_wrong_dtype, LOAD),
    ("nm_positions_repeated", nm_positions_repeated, LOAD),
    ("nm_in_features_past_values", nm_in_features_past_values, LOAD),
    ("nm_group_of_eight_on_two_bit_indices", nm_group_of_eight_on_two_bit_indices, LOAD),
    ("moe_fewer_experts_than_router", moe_fewer_experts_than_router, LOAD),
    ("moe_top_k_zero", moe_top_k_zero, LOAD),
    ("moe_top_k_past_experts", moe_top_k_past_experts, LOAD),
    ("moe_negative_capacity", moe_negative_capacity, LOAD),
    ("route_negative_capacity", route_negative_capacity, LOAD),
    ("block_attention_zero_block", block_attention_zero_block, LOAD),
    ("route_gather_far_out_of_bounds", route_gather_far_out_of_bounds, REFUSED + ("ran",)),
    ("negative_register_argument", negative_register_argument, LOAD),
    ("negative_register_output", negative_register_output, LOAD),
    ("register_past_the_file", register_past_the_file, LOAD),
    ("ten_billion_registers", ten_billion_registers, LOAD),
    ("huge_input_spec", huge_input_spec, LOAD),
    ("negative_input_spec", negative_input_spec, LOAD),
    ("empty_of_huge_shape", empty_of_huge_shape, LOAD),
    ("missing_constant", missing_constant, LOAD),
    ("fill_a_weight_in_place", fill_a_weight_in_place, LOAD),
    ("write_a_weight_through_a_view", write_a_weight_through_a_view, LOAD),
    ("write_a_weight_through_dropout", write_a_weight_through_dropout, REFUSED),
    ("write_the_callers_input", write_the_callers_input, REFUSED),
    ("allocation_sized_by_item", allocation_sized_by_item, REFUSED),
    ("python_floordiv_by_zero", python_floordiv_by_zero, REFUSED),
    ("python_mul_past_int64", python_mul_past_int64, REFUSED),
    ("dtype_by_attribute_name", dtype_by_attribute_name, LOAD),
    ("op_outside_namespaces", op_outside_namespaces, LOAD),
    ("program_output_of_unknown_layout", program_output_of_unknown_layout, LOAD),
    ("fifo_as_manifest_hash", fifo_as_manifest_hash, LOAD),
    ("dev_zero_as_weights", dev_zero_as_weights, LOAD),
    ("weights_name_climbing_out", weights_name_climbing_out, LOAD),
    ("weights_symlink_to_outside_file", weights_symlink_to_outside_file, LOAD),
    ("weights_header_lies_about_shape", weights_header_lies_about_shape, LOAD),
    ("weights_overlapping_tensors", weights_overlapping_tensors, LOAD),
    ("weights_shape_overflows", weights_shape_overflows, LOAD),
    ("weights_header_length_huge", weights_header_length_huge, LOAD),
]]
