"""Option coercion on its own (the pipeline tests cover it through build_pipeline)."""
from __future__ import annotations

from typing import Any, Literal, Optional

import pytest

from sparsecc.passes.options import QuotedStr, coerce_option, type_name


@pytest.mark.parametrize("value, hint, expected", [
    ("3", int, 3), ("-2.5", float, -2.5), ("TRUE", bool, True), ("x", str, "x"),
    (["a", "b"], tuple[str, ...], ("a", "b")), ("a", tuple[str, ...], ("a",)), (["1", "2"], list[int], [1, 2]),
    ("none", Optional[int], None), ("4", Optional[int], 4), (QuotedStr("none"), Optional[str], "none"),
    ("exact", Literal["fast", "exact"], "exact"), (["raw"], Any, ["raw"]), ("5", int | None, 5),
])
def test_coerces(value, hint, expected):
    assert coerce_option(value, hint) == expected


def test_type_names():
    assert type_name(tuple[str, ...]) == "a list of str"
    assert type_name(Optional[float]) == "float or none"
    assert type_name(Literal[1, 2]) == "one of 1, 2"


def test_unsupported_annotation_is_a_programming_error():
    with pytest.raises(TypeError, match="not supported"):
        coerce_option("1", dict)
