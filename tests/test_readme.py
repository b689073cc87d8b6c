"""Every code block of README.md runs as written, so the README cannot drift.

- python blocks run in README order in one namespace, as a reader pasting them into one session would;
- a python block after `<!-- readme-test: file NAME -->` is written to NAME instead (a factory file that
  the shell blocks load);
- bash blocks: each `sparsecc ...` command runs through the CLI entry (`sparsecc.cli.main`) and must exit 0;
  any other command must be setup this environment already did (installing sparsecc, running the tests);
- text blocks are synopses and are not run;
- `<!-- readme-test: skip (why) -->` before a block skips it, allowed only for a GPU or the network.
Everything runs in a temporary folder with the repository root off sys.path, so the README's factories
resolve the way they do for a user outside the repository.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from sparsecc.cli import main

from .compiler.build_models import kernel_cache

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```$",
                   re.S | re.M)
LANGUAGES = ("python", "bash", "text")
# the README's non-sparsecc commands: what the environment running this test has already done
SETUP_COMMANDS = [shlex.split(c) for c in ("pip install -e .", 'pip install -e ".[dev]"', "python -m pytest -q")]
SKIP_REASONS = ("GPU", "network")


@dataclass(frozen=True)
class Block:
    line: int
    lang: str
    code: str
    marker: Optional[str]

    def file_name(self) -> Optional[str]:
        return self.marker[len("file "):].strip() if self.marker and self.marker.startswith("file ") else None

    def skipped(self) -> bool:
        return bool(self.marker and self.marker.startswith("skip"))


def readme_blocks(text: str) -> list[Block]:
    return [Block(text.count("\n", 0, m.start("lang")) + 1, m["lang"], m["code"], m["marker"])
            for m in BLOCK.finditer(text)]


def commands(block: Block) -> list[list[str]]:
    """The block's commands (a line may chain several with &&), as argv lists; comments dropped."""
    found = []
    for line in block.code.splitlines():
        for part in line.split("&&"):
            argv = shlex.split(part, comments=True)
            if argv:
                found.append(argv)
    return found


def test_every_block_is_one_the_readme_test_knows():
    blocks = readme_blocks(README.read_text())
    assert len(blocks) >= 8
    for block in blocks:
        where = f"README.md:{block.line}"
        assert block.lang in LANGUAGES, f"{where}: a ```{block.lang} block; the test runs {LANGUAGES}"
        assert block.marker is None or block.file_name() or block.skipped(), f"{where}: marker {block.marker!r}"
        if block.skipped():
            assert any(r in block.marker for r in SKIP_REASONS), f"{where}: skipped without needing a GPU or network"
        if block.file_name():
            assert block.lang == "python", f"{where}: only python blocks are written to files"
        for argv in commands(block) if block.lang == "bash" else ():
            assert argv[0] == "sparsecc" or argv in SETUP_COMMANDS, f"{where}: cannot run {argv}"


def test_readme_links_stay_inside_the_repository():
    text = README.read_text()
    assert "../" not in text, "the README must not point outside the repository"
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_readme_runs_as_written(tmp_path, monkeypatch, request):
    blocks = readme_blocks(README.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != ROOT])
    monkeypatch.setenv("SPARSECC_KERNEL_CACHE", str(kernel_cache(request.config)))   # shared with test_build
    written = [b.file_name() for b in blocks if b.file_name()]
    namespace: dict = {"__name__": "__readme__"}
    try:
        for block in blocks:
            _run(block, tmp_path, namespace)
    finally:
        for name in written:   # the factories imported from this folder must not outlive it
            sys.modules.pop(Path(name).stem, None)


def _run(block: Block, folder: Path, namespace: dict) -> None:
    where = f"README.md:{block.line}"
    if block.skipped() or block.lang == "text":
        return
    if block.file_name():
        (folder / block.file_name()).write_text(block.code)
    elif block.lang == "python":
        try:
            exec(compile(block.code, where, "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{where}: the python block failed: {err!r}") from err
    else:
        for argv in commands(block):
            if argv[0] == "sparsecc":
                assert main(argv[1:]) == 0, f"{where}: `{shlex.join(argv)}` failed"
