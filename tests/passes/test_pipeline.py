"""Pipeline strings: parsing, syntax errors with a caret, building with coercion, spelling round trip."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecc.passes import PASSES, Cleanup
from sparsecc.passes.manager import Pass
from sparsecc.passes.pipeline import PipelineError, build_pipeline, format_pipeline, parse_pipeline


@dataclass(frozen=True)
class Toy(Pass):
    name: ClassVar[str] = "toy"
    n: int = 2
    ratio: float = 0.5
    flag: bool = False
    method: str = "magnitude"
    exclude: tuple[str, ...] = ()
    limit: Optional[int] = None
    label: Optional[str] = None
    mode: Literal["fast", "exact"] = "fast"


@dataclass(frozen=True)
class Needs(Pass):
    name: ClassVar[str] = "needs"
    window: int

    def __post_init__(self):
        if self.window <= 0:
            raise ValueError(f"window must be positive, got {self.window}")


REGISTRY = {"toy": Toy, "needs": Needs, "cleanup": Cleanup}


def test_parse_the_documented_example():
    assert parse_pipeline("prune-nm{n=2,m=4,exclude=[lm_head,*.gate]},cleanup") == [
        ("prune-nm", {"n": "2", "m": "4", "exclude": ["lm_head", "*.gate"]}), ("cleanup", {})]


def test_parse_whitespace_quotes_and_empties():
    text = ' a { k = "x, y}" , l = [ \'q\\\'s\' , b/c:d ] , e = [] } , b{} , c '
    assert parse_pipeline(text) == [("a", {"k": "x, y}", "l": ["q's", "b/c:d"], "e": []}), ("b", {}), ("c", {})]
    assert parse_pipeline("") == [] and parse_pipeline("   ") == []


@pytest.mark.parametrize("text, column, message", [
    ("prune-nm{n 2}", 12, "expected '=' after option name 'n'"),
    ("a{k=v", 6, "expected ',' or '}'"),
    ("a,", 3, "expected a pass name"),
    ("a{k=}", 5, "expected a value"),
    ('a{k="open}', 5, "unterminated quoted string"),
    ("a{k=[x,y}", 9, "expected ']' to close the list"),
    ("a b", 3, "expected ',' between passes"),
    ("a{k=1,k=2}", 7, "option 'k' given twice"),
    ("a{k=v w}", 7, "expected ',' or '}' after an option value, found 'w'"),
])
def test_syntax_errors_point_at_the_column(text, column, message):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    first, echo, caret = str(info.value).splitlines()
    assert first.startswith(f"pipeline syntax error at column {column}: {message}")
    assert echo == f"  {text}" and caret == "  " + " " * (column - 1) + "^"


def test_build_coerces_to_field_types():
    [toy] = build_pipeline("toy{n=3,ratio=1e-3,flag=true,exclude=[lm_head,*.gate],limit=7,label=none,mode=exact}",
                           REGISTRY)
    assert toy == Toy(n=3, ratio=0.001, flag=True, exclude=("lm_head", "*.gate"), limit=7, label=None, mode="exact")
    [single] = build_pipeline('toy{exclude=lm_head,label="none",limit=none}', REGISTRY)
    assert single.exclude == ("lm_head",) and single.label == "none" and single.limit is None


def test_default_registry_has_cleanup():
    assert build_pipeline("cleanup") == [Cleanup()] and PASSES["cleanup"] is Cleanup


@pytest.mark.parametrize("text, message", [
    ("tyo", "unknown pass 'tyo' (known passes: cleanup, needs, toy); did you mean 'toy'?"),
    ("toy{q=1}", "pass 'toy' has no option 'q' (accepted options: n, ratio, flag, method, exclude, limit, label, mode)"),
    ("cleanup{q=1}", "pass 'cleanup' has no option 'q' (accepted options: none)"),
    ("toy{n=two}", "option 'n' of pass 'toy': expected int, got 'two'"),
    ("toy{ratio=fast}", "option 'ratio' of pass 'toy': expected float, got 'fast'"),
    ("toy{flag=yes}", "option 'flag' of pass 'toy': expected bool (true or false), got 'yes'"),
    ("toy{mode=slow}", "option 'mode' of pass 'toy': expected one of fast, exact, got 'slow'"),
    ("toy{n=[1,2]}", "option 'n' of pass 'toy': expected int, got '[1,2]'"),
    ("toy{limit=x}", "option 'limit' of pass 'toy': expected int or none, got 'x'"),
    ("needs", "pass 'needs': "),
    ("needs{window=0}", "pass 'needs': window must be positive, got 0"),
])
def test_build_errors_name_the_problem(text, message):
    with pytest.raises(PipelineError) as info:
        build_pipeline(text, REGISTRY)
    assert str(info.value).startswith(message)


def test_spelling_lists_only_non_default_options():
    assert Toy().spelling() == "toy" and Cleanup().spelling() == "cleanup"
    assert Toy(n=4, exclude=("lm_head", "a b"), label="none").spelling() == \
        'toy{n=4,exclude=[lm_head,"a b"],label="none"}'


@dataclass(frozen=True)
class Headline(Pass):
    name: ClassVar[str] = "headline"
    always_spelled: ClassVar[tuple[str, ...]] = ("mode",)
    mode: str = "fast"
    n: int = 2


def test_always_spelled_options_show_at_their_default():
    assert Headline().spelling() == "headline{mode=fast}" and Headline(n=3).spelling() == "headline{mode=fast,n=3}"
    passes = [Headline(), Cleanup()]
    assert format_pipeline(passes) == "headline{mode=fast},cleanup"
    assert build_pipeline(format_pipeline(passes), {"headline": Headline, "cleanup": Cleanup}) == passes


_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_toys = st.builds(
    Toy, n=st.integers(-10**6, 10**6), ratio=st.floats(allow_nan=False), flag=st.booleans(), method=_texts,
    exclude=st.lists(_texts, max_size=4).map(tuple), limit=st.none() | st.integers(),
    label=st.none() | _texts, mode=st.sampled_from(["fast", "exact"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(_toys, max_size=3))
def test_spelling_round_trips(toys):
    text = ",".join(t.spelling() for t in toys)
    assert build_pipeline(text, REGISTRY) == toys  # floats print with repr, which round-trips exactly
