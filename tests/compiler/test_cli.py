import json
import sys

import pytest

from sparsecc.cli import main

FACTORY = "examples.tiny_transformer:build"


def test_compile_prints_the_report(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)   # progress bars are drawn for a terminal only
    assert main(["compile", FACTORY, "--sparsity", "2:4"]) == 0
    out = capsys.readouterr()
    assert "rewritten layers: 11" in out.out and "blocks.0.mlp.down" in out.out
    # progress goes to stderr (the bar clears itself when done: its last frame depends on timing)
    assert "sparsecc compile: 0/4 steps" in out.err and "capture" in out.err and "sparsecc report" not in out.err


def test_compile_json_and_ir(capsys):
    assert main(["compile", FACTORY, "--sparsity", '{"weights": {"pattern": "4:8", "exclude": ["lm_head"]}}',
                 "--json", "--no-check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["layers"]) == 10 and report["skipped"][0]["layer"] == "lm_head"
    assert all(layer["pattern"] == "4:8" for layer in report["layers"])


def test_compile_from_a_file_path(capsys):
    assert main(["compile", "examples/tiny_transformer.py:build", "--ir", "--no-check"]) == 0
    assert "sparsecc.nm_linear" in capsys.readouterr().out


def test_print_ir_after_all_and_dump_dir(tmp_path, capsys):
    assert main(["compile", FACTORY, "--print-ir-after-all", "--dump-dir", str(tmp_path), "--no-check"]) == 0
    assert "IR after prune-nm" in capsys.readouterr().err
    assert any(p.name.endswith("prune-nm.mlir") for p in tmp_path.iterdir())
    assert any(p.suffix == ".dot" for p in tmp_path.iterdir())


def test_opt_prints_rewritten_ir(capsys):
    assert main(["opt", FACTORY, "--pipeline", "prune-nm{n=1,m=4,include=[lm_head]},cleanup"]) == 0
    out = capsys.readouterr().out
    assert out.count("sparsecc.nm_linear(") == 1 and "{n=1, m=4" in out


@pytest.mark.parametrize("factory, words", [
    ("no_such_module:build", "cannot import module 'no_such_module'"),
    ("examples.tiny_transformer:nope", "has no attribute 'nope'"),
    ("examples.tiny_transformer", "expected MODULE:FACTORY"),
    ("examples.tiny_transformer:TinyTransformer", "returned a model alone, but its forward needs tokens"),
    ("missing/file.py:build", "no such file"),
])
def test_bad_factories(factory, words, capsys):
    assert main(["compile", factory]) == 2
    assert words in capsys.readouterr().err


def test_bad_sparsity_and_pipeline(capsys):
    assert main(["compile", FACTORY, "--sparsity", "3:2"]) == 2
    assert "weights.pattern: N:M pattern 3:2: M must be one of" in capsys.readouterr().err
    assert main(["opt", FACTORY, "--pipeline", "prune-nm{n=two}"]) == 2
    assert "n" in capsys.readouterr().err
