"""Pipeline strings: `prune-nm{n=2,m=4,exclude=[lm_head,*.gate]},cleanup`.

Grammar (whitespace allowed between tokens):

    pipeline := [spec (',' spec)*]
    spec     := NAME ['{' [option (',' option)*] '}']
    option   := NAME '=' value
    value    := scalar | '[' [scalar (',' scalar)*] ']'
    scalar   := BARE | QUOTED
    BARE     := one or more of  A-Z a-z 0-9 . * : / - _ +
    QUOTED   := "..." or '...'  (backslash escapes the quote and itself)

`parse_pipeline` returns the raw strings; `build_pipeline` coerces them to
each pass's dataclass field types; `format_pipeline` spells pass objects
back (each pass's `spelling`). A quoted value parses to `QuotedStr`, so
`"none"` stays a string where a bare `none` means None for Optional options.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional, Sequence

from .options import BARE_VALUE, OptionError, QuotedStr, coerce_option
from .registry import PASSES


class PipelineError(ValueError):
    """A pipeline string that does not parse or does not name valid passes and options."""


OptionValue = str | list[str]


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def error(self, message: str, pos: Optional[int] = None) -> PipelineError:
        pos = self.pos if pos is None else pos
        return PipelineError(f"pipeline syntax error at column {pos + 1}: {message}\n  {self.text}\n  {' ' * pos}^")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def accept(self, char: str) -> bool:
        self.skip_space()
        if self.text.startswith(char, self.pos):
            self.pos += 1
            return True
        return False

    def expect(self, char: str, after: str) -> None:
        if not self.accept(char):
            raise self.error(f"expected '{char}' {after}, found {self.found()}")

    def found(self) -> str:
        return repr(self.text[self.pos]) if self.pos < len(self.text) else "end of input"

    def bare(self, what: str) -> str:
        self.skip_space()
        token = BARE_VALUE.match(self.text, self.pos)
        if token is None:
            raise self.error(f"expected {what}, found {self.found()}")
        self.pos = token.end()
        return token.group()

    def quoted(self) -> QuotedStr:
        start, quote = self.pos, self.text[self.pos]
        chars, self.pos = [], self.pos + 1
        while self.pos < len(self.text) and self.text[self.pos] != quote:
            if self.text[self.pos] == "\\":  # the next character is taken literally
                self.pos += 1
            chars.append(self.text[self.pos:self.pos + 1])
            self.pos += 1
        if self.pos >= len(self.text):
            raise self.error("unterminated quoted string", start)
        self.pos += 1
        return QuotedStr("".join(chars))

    def scalar(self) -> str:
        self.skip_space()
        if self.text[self.pos:self.pos + 1] in ("'", '"'):
            return self.quoted()
        return self.bare("a value")

    def value(self) -> OptionValue:
        if not self.accept("["):
            return self.scalar()
        items: list[str] = []
        if self.accept("]"):
            return items
        items.append(self.scalar())
        while self.accept(","):
            items.append(self.scalar())
        self.expect("]", "to close the list")
        return items

    def options(self) -> dict[str, OptionValue]:
        options: dict[str, OptionValue] = {}
        if self.accept("}"):
            return options
        while True:
            self.skip_space()
            start, key = self.pos, self.bare("an option name")
            if key in options:
                raise self.error(f"option '{key}' given twice", start)
            self.expect("=", f"after option name '{key}'")
            options[key] = self.value()
            if self.accept("}"):
                return options
            self.expect(",", "or '}' after an option value")

    def spec(self) -> tuple[str, dict[str, OptionValue]]:
        name = self.bare("a pass name")
        return name, (self.options() if self.accept("{") else {})

    def pipeline(self) -> list[tuple[str, dict[str, OptionValue]]]:
        self.skip_space()
        if self.pos == len(self.text):
            return []
        specs = [self.spec()]
        while self.accept(","):
            specs.append(self.spec())
        self.skip_space()
        if self.pos != len(self.text):
            raise self.error(f"expected ',' between passes, found {self.found()}")
        return specs


def parse_pipeline(text: str) -> list[tuple[str, dict[str, OptionValue]]]:
    """`"a{k=v,l=[x,y]},b"` -> `[("a", {"k": "v", "l": ["x", "y"]}), ("b", {})]`."""
    return _Parser(text).pipeline()


def _unknown_pass(name: str, registry: Mapping[str, Any]) -> PipelineError:
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return PipelineError(f"unknown pass '{name}' (known passes: {', '.join(sorted(registry))}){hint}")


def _build_one(name: str, options: dict[str, OptionValue], registry: Mapping[str, Any]) -> Any:
    if name not in registry:
        raise _unknown_pass(name, registry)
    cls = registry[name]
    types = cls.option_types()
    for key in options:
        if key not in types:
            accepted = ", ".join(types) or "none"
            raise PipelineError(f"pass '{name}' has no option '{key}' (accepted options: {accepted})")
    kwargs = {key: _coerce(name, key, value, types[key]) for key, value in options.items()}
    try:
        return cls(**kwargs)
    except OptionError as err:  # __post_init__ bounds: the message already names the pass
        raise PipelineError(str(err)) from err
    except (TypeError, ValueError) as err:  # missing required options, other __post_init__ checks
        raise PipelineError(f"pass '{name}': {err}") from err


def _coerce(name: str, key: str, value: OptionValue, hint: Any) -> Any:
    try:
        return coerce_option(value, hint)
    except ValueError as err:
        raise PipelineError(f"option '{key}' of pass '{name}': {err}") from err


def build_pipeline(text: str, registry: Mapping[str, Any] = PASSES) -> list:
    """Parse `text` and instantiate each pass from `registry` (default: every pass, `PASSES`)."""
    return [_build_one(name, options, registry) for name, options in parse_pipeline(text)]


def format_pipeline(passes: Sequence[Any]) -> str:
    """The pipeline text of pass objects (what reports print); `build_pipeline` reads it back to equal passes."""
    return ",".join(p.spelling() for p in passes)


__all__ = ["OptionValue", "PipelineError", "QuotedStr", "build_pipeline", "format_pipeline", "parse_pipeline"]
