"""sparsecc's own JSON schema for the structure of a program's inputs and outputs.

Replaces torch's pytree `treespec_dumps`/`treespec_loads`, whose decoder imports the
module named in the file. Here decoding is plain data checking: no import and no
attribute lookup by a name taken from the file. A node is one of

    {"kind": "leaf"}                                   any value (tensors become program inputs/outputs)
    {"kind": "none"}                                   None, holding no leaf
    {"kind": "tuple", "items": [node, ...]}
    {"kind": "list",  "items": [node, ...]}
    {"kind": "dict",  "keys": [str, ...], "items": [node, ...]}
    {"kind": "output", "class": NAME, "keys": [str, ...], "items": [node, ...]}

where NAME is one of OUTPUT_CLASSES, the transformers output classes sparsecc
supports (rebuilt as the real class when transformers is importable, else as a dict).
The inputs' schema describes `(args, kwargs)`.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .errors import ArtifactError, InputMismatchError, RuntimeProgramError

# transformers.modeling_outputs classes a program may return, by name (a fixed table: nothing else is rebuilt)
OUTPUT_CLASSES = (
    "BaseModelOutput", "BaseModelOutputWithNoAttention", "BaseModelOutputWithPast",
    "BaseModelOutputWithPooling", "BaseModelOutputWithPoolingAndNoAttention",
    "BaseModelOutputWithPoolingAndCrossAttentions", "BaseModelOutputWithPastAndCrossAttentions",
    "CausalLMOutput", "CausalLMOutputWithPast", "CausalLMOutputWithCrossAttentions",
    "MoeModelOutputWithPast", "MoeCausalLMOutputWithPast", "MaskedLMOutput",
    "SequenceClassifierOutput", "SequenceClassifierOutputWithPast", "TokenClassifierOutput",
    "QuestionAnsweringModelOutput", "ImageClassifierOutput", "ImageClassifierOutputWithNoAttention",
)
OUTPUTS_MODULE = "transformers.modeling_outputs"
MAX_DEPTH, MAX_NODES, MAX_KEY_CHARS = 32, 100_000, 256
FIELDS = {"leaf": {"kind"}, "none": {"kind"}, "tuple": {"kind", "items"}, "list": {"kind", "items"},
          "dict": {"kind", "keys", "items"}, "output": {"kind", "class", "keys", "items"}}   # per node kind


@dataclass(frozen=True)
class TreeNode:
    kind: str                          # leaf | none | tuple | list | dict | output
    items: tuple["TreeNode", ...] = ()
    keys: tuple[str, ...] = ()         # dict and output nodes: one key per item
    cls: str = ""                      # output nodes: a name from OUTPUT_CLASSES

    @functools.cached_property
    def num_leaves(self) -> int:
        return sum(1 for node in self.walk() if node.kind == "leaf")

    def walk(self) -> Iterator["TreeNode"]:
        yield self
        for item in self.items:
            yield from item.walk()

    def __str__(self) -> str:
        inner = ", ".join(f"{k}: {v}" for k, v in zip(self.keys, self.items)) if self.keys else \
            ", ".join(str(v) for v in self.items)
        return {"leaf": "*", "none": "None", "tuple": f"({inner})", "list": f"[{inner}]",
                "dict": f"{{{inner}}}"}.get(self.kind, f"{self.cls}({inner})")


# ---- compiler side: a torch pytree TreeSpec -> JSON

def encode(treespec: Any) -> dict[str, Any]:
    """The JSON of a torch pytree TreeSpec; a node type outside the schema is a ValueError naming it."""
    if treespec.is_leaf():
        return {"kind": "leaf"}
    node_type, children = treespec.type, [encode(c) for c in treespec.children()]
    if node_type is type(None):
        return {"kind": "none"}
    if node_type in (tuple, list) or _is_immutable(node_type, "immutable_list"):
        return {"kind": "list" if node_type is not tuple else "tuple", "items": children}
    if node_type is dict or _is_immutable(node_type, "immutable_dict"):
        return {"kind": "dict", "keys": _string_keys(treespec.context, node_type), "items": children}
    if node_type.__module__ == OUTPUTS_MODULE and node_type.__name__ in OUTPUT_CLASSES:
        return {"kind": "output", "class": node_type.__name__, "keys": _string_keys(treespec.context, node_type),
                "items": children}
    raise ValueError(f"cannot store the input/output structure: {_type_name(treespec)} is not supported "
                     f"(tuple, list, dict with string keys, None, tensors, or a {OUTPUTS_MODULE} class listed in "
                     "sparsecc.runtime.tree_schema.OUTPUT_CLASSES)")


def _type_name(treespec: Any) -> str:
    """The node's type; for a namedtuple (one pytree node type for all) the class it stands for."""
    node_type = treespec.context if isinstance(treespec.context, type) else treespec.type
    return f"{node_type.__module__}.{node_type.__qualname__}"


def _is_immutable(node_type: type, name: str) -> bool:
    """torch.fx's immutable_list / immutable_dict, stored as list / dict."""
    return node_type.__module__ == "torch.fx.immutable_collections" and node_type.__name__ == name


def _string_keys(context: Any, node_type: type) -> list[str]:
    keys = list(context)
    if not all(isinstance(k, str) for k in keys):
        raise ValueError(f"cannot store the input/output structure: {node_type.__name__} keys must be strings, "
                         f"got {[type(k).__name__ for k in keys]}")
    return keys


# ---- runtime side: JSON -> TreeNode, checked

def decode(data: Any, what: str = "structure") -> TreeNode:
    """The schema in `data`, checked for shape, kinds, class names and limits; ArtifactError otherwise."""
    budget = [MAX_NODES]
    return _decode(data, what, 0, budget)


def _decode(data: Any, path: str, depth: int, budget: list[int]) -> TreeNode:
    budget[0] -= 1
    if depth > MAX_DEPTH or budget[0] < 0:
        raise ArtifactError(f"{path}: the structure is deeper than {MAX_DEPTH} or has more than {MAX_NODES} nodes")
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise ArtifactError(f"{path}: expected a node {{'kind': ...}}, got {type(data).__name__}")
    kind = data["kind"]
    if kind not in FIELDS:
        raise ArtifactError(f"{path}: unknown node kind {kind!r} (known: {', '.join(FIELDS)})")
    if set(data) != FIELDS[kind]:
        raise ArtifactError(f"{path}: a {kind!r} node has fields {sorted(data)}, expected {sorted(FIELDS[kind])}")
    if kind in ("leaf", "none"):
        return TreeNode(kind)
    keyed = "keys" in FIELDS[kind]
    items = data["items"]
    if not isinstance(items, list):
        raise ArtifactError(f"{path}: 'items' must be a list, got {type(items).__name__}")
    keys = _decode_keys(data["keys"], len(items), path) if keyed else ()
    cls = _decode_class(data["class"], path) if kind == "output" else ""
    children = tuple(_decode(item, f"{path}[{keys[i] if keyed else i}]", depth + 1, budget)
                     for i, item in enumerate(items))
    return TreeNode(kind, children, keys, cls)


def _decode_keys(keys: Any, count: int, path: str) -> tuple[str, ...]:
    if not isinstance(keys, list) or len(keys) != count:
        raise ArtifactError(f"{path}: 'keys' must be a list of {count} strings")
    if not all(isinstance(k, str) and len(k) <= MAX_KEY_CHARS for k in keys) or len(set(keys)) != count:
        raise ArtifactError(f"{path}: keys must be distinct strings of at most {MAX_KEY_CHARS} characters")
    return tuple(keys)


def _decode_class(name: Any, path: str) -> str:
    if name not in OUTPUT_CLASSES:
        raise ArtifactError(f"{path}: output class {name!r} is not one sparsecc rebuilds "
                            f"(known: {', '.join(OUTPUT_CLASSES)})")
    return name


# ---- call time

def flatten(schema: TreeNode, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """The tensor leaves of `(args, kwargs)` in schema order; InputMismatchError where the structure differs."""
    leaves: list[Any] = []
    _flatten(schema, (tuple(args), dict(kwargs)), "inputs", leaves)
    return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def _flatten(node: TreeNode, value: Any, path: str, leaves: list) -> None:
    if node.kind == "leaf":
        if isinstance(value, (tuple, list, dict)):
            raise InputMismatchError(f"{path}: expected a single value, got a {type(value).__name__}")
        leaves.append(value)
    elif node.kind == "none":
        if value is not None:
            raise InputMismatchError(f"{path}: expected None, got {type(value).__name__}")
    elif node.kind in ("tuple", "list"):
        _flatten_sequence(node, value, path, leaves)
    else:
        _flatten_mapping(node, value, path, leaves)


def _flatten_sequence(node: TreeNode, value: Any, path: str, leaves: list) -> None:
    want = tuple if node.kind == "tuple" else list
    if not isinstance(value, want) or len(value) != len(node.items):
        count = f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
        raise InputMismatchError(f"{path}: expected a {node.kind} of {len(node.items)}, got "
                                 f"{type(value).__name__}{count} (the artifact was built for {str(node)[:200]})")
    for index, (item, element) in enumerate(zip(node.items, value)):
        _flatten(item, element, f"{path}[{index}]", leaves)


def _flatten_mapping(node: TreeNode, value: Any, path: str, leaves: list) -> None:
    if not isinstance(value, dict) or set(value) != set(node.keys):
        got = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
        raise InputMismatchError(f"{path}: expected keys {list(node.keys)}, got {got} "
                                 f"(the artifact was built for {str(node)[:200]})")
    for key, item in zip(node.keys, node.items):
        _flatten(item, value[key], f"{path}[{key!r}]", leaves)


def unflatten(schema: TreeNode, leaves: Any) -> Any:
    """The outputs rebuilt in the schema's structure from the program's flat results."""
    leaves = list(leaves)
    if len(leaves) != schema.num_leaves:
        raise RuntimeProgramError(f"the program returned {len(leaves)} values, its output structure holds "
                                  f"{schema.num_leaves}")
    return _unflatten(schema, iter(leaves))


def _unflatten(node: TreeNode, leaves: Iterator[Any]) -> Any:
    if node.kind == "leaf":
        return next(leaves)
    if node.kind == "none":
        return None
    items = [_unflatten(item, leaves) for item in node.items]
    if node.kind == "tuple":
        return tuple(items)
    if node.kind == "list":
        return items
    fields = dict(zip(node.keys, items))
    cls = output_classes().get(node.cls) if node.kind == "output" else None
    return fields if cls is None else _build_output(cls, fields)


def _build_output(cls: type, fields: dict[str, Any]) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError) as err:      # a field the class lacks; ModelOutput's own checks
        raise RuntimeProgramError(f"cannot rebuild {cls.__name__} from fields {sorted(fields)}: {err}") from None


@functools.cache
def output_classes() -> dict[str, type]:
    """OUTPUT_CLASSES name -> class, looked up by the table's own names; empty without transformers."""
    try:
        from transformers import modeling_outputs
    except ImportError:
        return {}
    return {name: getattr(modeling_outputs, name) for name in OUTPUT_CLASSES if hasattr(modeling_outputs, name)}


def check_outputs(schema: Optional[TreeNode], count: int, what: str) -> None:
    """At load: the output structure holds exactly the program's `count` results, and every output
    class it names (where transformers is importable) has the fields it lists."""
    if schema is None:
        return
    if schema.num_leaves != count:
        raise ArtifactError(f"{what}: the output structure holds {schema.num_leaves} values, the program "
                            f"returns {count}")
    for node in schema.walk():
        cls = output_classes().get(node.cls) if node.kind == "output" else None
        unknown = sorted(set(node.keys) - {f.name for f in dataclasses.fields(cls)}) if cls is not None else []
        if unknown:
            raise ArtifactError(f"{what}: {node.cls} has no fields {unknown}")
