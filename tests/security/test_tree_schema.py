"""sparsecc's own input/output structure schema: round trips, and crafted structures refused with no import."""
import json
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

import sparsecc
from sparsecc.runtime import ArtifactError, InputMismatchError
from sparsecc.runtime import tree_schema
from sparsecc.runtime.tree_schema import OUTPUT_CLASSES, decode, encode, flatten, unflatten

from .attacker import copy_artifact, plant_payload, pristine_artifact, rewrite_program

modeling_outputs = pytest.importorskip("transformers.modeling_outputs")


def _round_trip(tree):
    leaves, spec = pytree.tree_flatten(tree)
    schema = decode(json.loads(json.dumps(encode(spec))))
    return schema, unflatten(schema, leaves)


@pytest.mark.parametrize("tree", [
    (torch.ones(2), [torch.zeros(1), None], {"mask": torch.ones(3), "scale": 2.0}),
    [torch.ones(1), (torch.ones(2),), []],
    {"b": torch.ones(1), "a": {"c": (torch.zeros(1),)}},
    torch.ones(4),
])
def test_plain_structures_round_trip(tree):
    schema, rebuilt = _round_trip(tree)
    assert pytree.tree_structure(rebuilt) == pytree.tree_structure(tree)
    assert all(a is b for a, b in zip(pytree.tree_leaves(rebuilt), pytree.tree_leaves(tree)))
    assert schema.num_leaves == len(pytree.tree_leaves(tree))


def test_a_transformers_output_is_rebuilt_as_its_class():
    out = modeling_outputs.CausalLMOutputWithPast(logits=torch.ones(2, 3), loss=torch.zeros(()))
    schema, rebuilt = _round_trip(out)
    assert schema.kind == "output" and schema.cls == "CausalLMOutputWithPast"
    assert type(rebuilt) is type(out) and rebuilt.logits is out.logits and rebuilt.loss is out.loss


def test_every_output_class_in_the_table_exists_in_transformers():
    assert sorted(tree_schema.output_classes()) == sorted(OUTPUT_CLASSES)


def test_without_transformers_outputs_are_rebuilt_as_dicts(monkeypatch):
    monkeypatch.setattr(tree_schema, "output_classes", lambda: {})
    schema = decode({"kind": "output", "class": "CausalLMOutputWithPast", "keys": ["logits"],
                     "items": [{"kind": "leaf"}]})
    logits = torch.ones(1)
    assert unflatten(schema, [logits]) == {"logits": logits}


def test_unsupported_node_types_are_named_when_encoding():
    pair = namedtuple("Pair", "a b")
    with pytest.raises(ValueError, match="Pair is not supported"):
        encode(pytree.tree_structure(pair(torch.ones(1), torch.ones(1))))
    with pytest.raises(ValueError, match="keys must be strings"):
        encode(pytree.tree_structure({1: torch.ones(1)}))


def test_inputs_of_another_structure_are_refused():
    schema = decode(encode(pytree.tree_structure(((torch.ones(1),), {"mask": torch.ones(1)}))))
    x = torch.ones(1)
    assert flatten(schema, (x,), {"mask": x}) == (x, x)
    for args, kwargs, message in [((x, x), {"mask": x}, "expected a tuple of 1, got tuple of 2"),
                                  ((x,), {}, r"expected keys \['mask'\], got \[\]"),
                                  (((x,),), {"mask": x}, r"inputs\[0\]\[0\]: expected a single value, got a tuple")]:
        with pytest.raises(InputMismatchError, match=message):
            flatten(schema, args, kwargs)


@pytest.mark.parametrize("data, message", [
    ({"kind": "module", "items": []}, "unknown node kind 'module'"),
    ({"kind": "output", "class": "payload.Evil", "keys": [], "items": []}, "output class 'payload.Evil' is not"),
    ({"kind": "output", "class": "transformers.modeling_outputs.CausalLMOutputWithPast", "keys": [], "items": []},
     "is not one sparsecc rebuilds"),
    ({"kind": "leaf", "type": "payload.Evil"}, "has fields"),
    ({"kind": "dict", "keys": ["a"], "items": []}, "'keys' must be a list of 0 strings"),
    ({"kind": "dict", "keys": ["a", "a"], "items": [{"kind": "leaf"}] * 2}, "keys must be distinct"),
    ({"kind": "tuple", "items": {"kind": "leaf"}}, "'items' must be a list"),
    ("[1, {\"type\": \"payload.Evil\"}]", "expected a node"),
    ([1, {"type": "payload.Evil", "context": "null", "children_spec": []}], "expected a node"),
])
def test_malformed_schemas_are_refused(data, message):
    with pytest.raises(ArtifactError, match=message):
        decode(data)


def test_output_fields_and_leaf_count_are_checked_at_load():
    schema = decode({"kind": "output", "class": "CausalLMOutputWithPast", "keys": ["logits", "payload"],
                     "items": [{"kind": "leaf"}, {"kind": "leaf"}]})
    with pytest.raises(ArtifactError, match=r"CausalLMOutputWithPast has no fields \['payload'\]"):
        tree_schema.check_outputs(schema, 2, "out_spec")
    with pytest.raises(ArtifactError, match="holds 2 values, the program returns 3"):
        tree_schema.check_outputs(schema, 3, "out_spec")


def test_depth_and_size_are_limited():
    deep = {"kind": "leaf"}
    for _ in range(tree_schema.MAX_DEPTH + 2):
        deep = {"kind": "list", "items": [deep]}
    with pytest.raises(ArtifactError, match="deeper than"):
        decode(deep)
    wide = {"kind": "list", "items": [{"kind": "leaf"}] * (tree_schema.MAX_NODES + 1)}
    with pytest.raises(ArtifactError, match="nodes"):
        decode(wide)


class _Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, extra):
        y = self.proj(x)
        return modeling_outputs.CausalLMOutputWithPast(logits=y, hidden_states=(y + extra["bias"], y * y))


def test_saved_structure_round_trips_through_load(tmp_path):
    model = _Structured().eval()
    x, extra = torch.randn(2, 8), {"bias": torch.randn(8)}
    compiled = sparsecc.compile(model, (x, extra), sparsity="2:4", check=False)
    compiled.save(tmp_path / "artifact", progress=False)
    loaded = sparsecc.runtime.load(tmp_path / "artifact")
    got, want = loaded(x, extra), compiled(x, extra)
    assert type(got) is modeling_outputs.CausalLMOutputWithPast
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.hidden_states, want.hidden_states, rtol=0, atol=0)
    with pytest.raises(InputMismatchError, match=r"inputs\[0\]\[1\]: expected keys \['bias'\]"):
        loaded(x, {"scale": x})


# ---- the attack: torch's pytree JSON names a module, `payload.py` sits in the artifact, cwd is on sys.path

def _pytree_json_importing_payload() -> str:
    leaf = {"type": None, "context": None, "children_spec": []}
    imports_payload = json.dumps([{"__enum__": True, "fqn": "payload:Evil", "name": "A"}])
    return json.dumps([1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": "builtins.tuple", "context": "null", "children_spec": [leaf]},
        {"type": "builtins.dict", "context": imports_payload, "children_spec": [leaf]}]}])


_LOAD_EACH_IN_ITS_FOLDER = """
import os, sys
import sparsecc.runtime
for folder in sys.argv[1:]:
    os.chdir(folder)     # sys.path[0] is '', the cwd: `import payload` would find the artifact's payload.py
    try:
        sparsecc.runtime.load(".")
        print("LOADED", folder)
    except sparsecc.runtime.ArtifactError as err:
        print("REFUSED", err)
print("payload imported:", "payload" in sys.modules)
"""


def _run_in(folder, code, *args):
    """`python -c` in `folder`: sys.path[0] is the cwd, as for a user who loads from there."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=folder, capture_output=True,
                          text=True, timeout=300)


CRAFTED = [("in_spec", _pytree_json_importing_payload()),
           ("out_spec", json.loads(_pytree_json_importing_payload())),
           ("out_spec", [1, {"type": "payload.Evil", "context": "null", "children_spec": []}]),
           ("out_spec", {"kind": "output", "class": "payload.Evil", "keys": ["logits"], "items": [{"kind": "leaf"}]})]


def test_a_structure_naming_a_module_imports_nothing(tmp_path):
    """One subprocess loads each crafted artifact from inside its folder (one process: imports cost seconds)."""
    marker, folders = tmp_path / "marker", []
    for index, (field, spec) in enumerate(CRAFTED):
        root = copy_artifact(pristine_artifact(), tmp_path / f"artifact{index}")
        plant_payload(root, marker)
        rewrite_program(root, lambda program: program.update({field: spec}))
        folders.append(root)
    result = _run_in(tmp_path, _LOAD_EACH_IN_ITS_FOLDER, *folders)
    refusals = [line for line in result.stdout.splitlines() if line.startswith("REFUSED")]
    assert [f"program {field}" in line for line, (field, _) in zip(refusals, CRAFTED)] == [True] * len(CRAFTED), \
        result.stdout + result.stderr
    assert "payload imported: False" in result.stdout
    assert not marker.exists()


def test_the_crafted_pytree_json_does_import_the_payload_through_torch(tmp_path):
    """The control: the same JSON through torch's own loader runs payload.py, so the test above is live."""
    marker = tmp_path / "marker"
    plant_payload(tmp_path, marker)
    (tmp_path / "spec.json").write_text(_pytree_json_importing_payload())
    _run_in(tmp_path, "import torch.utils._pytree as p; p.treespec_loads(open('spec.json').read())")
    assert marker.exists()
