"""Option coercion on its own (the pipeline tests cover it through build_pipeline)."""
from __future__ import annotations

import typing
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


# --- numeric option bounds: checked when a pass is made, NaN and inf never pass ---

import math  # noqa: E402

from sparsecc.passes import PASSES, build_pipeline  # noqa: E402
from sparsecc.passes.moe import MoEDispatch  # noqa: E402
from sparsecc.passes.options import Bounds, OptionError, bounds_problem  # noqa: E402
from sparsecc.passes.pipeline import PipelineError  # noqa: E402


@pytest.mark.parametrize("bounds, text", [
    (Bounds(0), "a finite number >= 0"), (Bounds(0, 1, low_open=True), "a number in (0, 1]"),
    (Bounds(1, whole=True), "an integer >= 1"), (Bounds(0, low_open=True), "a finite number > 0"),
])
def test_bounds_describe_the_accepted_range(bounds, text):
    assert bounds.describe() == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1"])
def test_bounds_refuse_non_finite_and_non_numbers(value):
    assert bounds_problem(value, Bounds()) == f"expected a finite number, got {value!r}"


def test_bounds_union_and_whole_numbers():
    topk = (Bounds(0, 1, low_open=True, high_open=True), Bounds(1, whole=True))
    assert bounds_problem(0.5, topk) is None and bounds_problem(3.0, topk) is None
    assert bounds_problem(2.5, topk) == "expected a number in (0, 1) or an integer >= 1, got 2.5"


def _numeric(hint) -> bool:
    return hint in (int, float) or any(a in (int, float) for a in typing.get_args(hint))


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_numeric_pass_option_has_bounds(name):
    cls = PASSES[name]
    numeric = {key for key, hint in cls.option_types().items() if _numeric(hint)}
    assert numeric == set(cls.option_bounds), f"{name}: bounds {sorted(cls.option_bounds)}, numbers {sorted(numeric)}"
    cls()   # the defaults lie within the bounds


@pytest.mark.parametrize("pipeline, message", [
    ("moe-dispatch{capacity_factor=nan}", "option 'capacity_factor': expected a finite number >= 0, got nan"),
    ("moe-dispatch{capacity_factor=-inf}", "option 'capacity_factor': expected a finite number >= 0, got -inf"),
    ("moe-dispatch{tolerance=inf}", "option 'tolerance': expected a finite number >= 0, got inf"),
    ("prune-nm{percdamp=nan}", "option 'percdamp': expected a finite number >= 0, got nan"),
    ("prune-nm{percdamp=1e999}", "option 'percdamp': expected a finite number >= 0, got inf"),
    ("prune-nm{blocksize=0}", "option 'blocksize': expected an integer >= 1, got 0"),
    ("prune-nm{blocksize=6}", "blocksize must be a positive multiple of M=4, got 6"),
    ("prune-nm{method=obs}", "unknown method 'obs' (available: magnitude, wanda, sparsegpt)"),
    ("token-routing{capacity=nan}", "option 'capacity': expected a number in (0, 1], got nan"),
    ("token-routing{capacity=0}", "option 'capacity': expected a number in (0, 1], got 0.0"),
    ("token-routing{tolerance=-1}", "option 'tolerance': expected a finite number >= 0, got -1.0"),
    ("sparse-attention{sinks=-1}", "option 'sinks': expected an integer >= 0, got -1"),
    ("sparse-attention{policy=window,window=0}", "option 'window': expected an integer >= 1, got 0"),
    ("sparse-attention{window=0}", "option 'window': expected an integer >= 1, got 0"),
    ("sparse-attention{policy=topk,topk=inf}", "option 'topk': expected a fraction in (0, 1) or a whole count"),
    ("sparse-attention{policy=threshold,threshold=nan}", "option 'threshold': expected a number in (0, 1), got nan"),
    ("sparse-attention{tolerance=nan}", "option 'tolerance': expected a finite number >= 0, got nan"),
])
def test_pipeline_options_out_of_bounds_name_pass_key_and_range(pipeline, message):
    with pytest.raises(PipelineError) as err:
        build_pipeline(pipeline)
    assert str(err.value).startswith(f"pass '{pipeline.split('{')[0]}': {message}")


def test_passes_made_directly_are_checked_too():
    with pytest.raises(OptionError, match=r"pass 'moe-dispatch': option 'capacity_factor': .* got nan"):
        MoEDispatch(capacity_factor=math.nan)


# --- value types: checked from the annotation, before the pass's own checks and the bounds ---

from sparsecc.passes import PruneNM, SparseAttention, TokenRouting  # noqa: E402
from sparsecc.passes.options import OneOf, value_problem  # noqa: E402


@pytest.mark.parametrize("value, hint, problem", [
    (4.0, int, "expected an integer, got 4.0"), (True, int, "expected an integer, got True"),
    ("x", float, "expected a number, got 'x'"), ("lm_head", tuple[str, ...], "expected a list of str, got 'lm_head'"),
    ((1.5,), Optional[tuple[str, ...]], "expected a list of str or none, got (1.5,)"),
    ("slow", Literal["fast", "exact"], "expected one of fast, exact, got 'slow'"),
    (1, Literal[True], "expected one of True, got 1"),
])
def test_value_problems_name_the_expected_type(value, hint, problem):
    assert value_problem(value, hint) == problem


@pytest.mark.parametrize("value, hint", [
    (4, int), (4, float), (0.5, float), (["a"], tuple[str, ...]), (None, Optional[int]),
    ("exact", Literal["fast", "exact"]), (object(), Any),
])
def test_values_of_the_annotated_type_pass(value, hint):
    assert value_problem(value, hint) is None


@pytest.mark.parametrize("make, option, problem", [
    (lambda: PruneNM(n=2.0), "n", "expected an integer, got 2.0"),
    (lambda: PruneNM(exclude="lm_head"), "exclude", "expected a list of str, got 'lm_head'"),
    (lambda: TokenRouting(where="attention"), "where", "expected one of mlp, layer, got 'attention'"),
    (lambda: SparseAttention(block=96), "block", "expected 64 or 128, got 96"),
    (lambda: PruneNM(method="obs"), "method", "unknown method 'obs' (available: magnitude, wanda, sparsegpt)"),
])
def test_option_errors_name_the_option_apart_from_the_pass(make, option, problem):
    with pytest.raises(OptionError) as err:
        make()
    assert (err.value.option, err.value.problem) == (option, problem)
    assert str(err.value).startswith("pass '") and str(err.value).endswith(problem)


def test_one_of_accepts_only_its_choices():
    assert OneOf(64, 128).describe() == "64 or 128"
    assert bounds_problem(64, OneOf(64, 128)) is None and bounds_problem(True, OneOf(1, 2)) is not None
