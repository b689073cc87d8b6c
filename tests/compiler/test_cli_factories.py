"""The command line as a first-time user meets it: factory forms and where MODULE is found, the targets
`sparsecc build` picks, artifact file modes, and what is printed besides the results."""
import json
import logging
import os
import stat
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sparsecc.cli import main
from sparsecc.cli_build import build_targets, host_targets
from sparsecc.cli_output import library_noise_hidden
from sparsecc.errors import FactoryError
from sparsecc.factory import load_factory, unpack_factory_result

ROOT = Path(__file__).resolve().parents[2]

FACTORIES = '''
import torch


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x, scale=None):
        y = self.proj(x)
        return y if scale is None else y * scale


class NeedsScale(Scaled):
    def forward(self, x, *, scale):   # capture fails unless the factory's kwargs reach it
        return self.proj(x) * scale


class Constant(torch.nn.Module):
    def forward(self):
        return torch.ones(2)


def with_kwargs():
    torch.manual_seed(0)
    return NeedsScale().eval(), (torch.randn(4, 16),), {"scale": torch.full((4, 8), 2.0)}


def with_args():
    return Scaled().eval(), torch.randn(4, 16)


def model_alone():
    return Constant()


def needs_inputs():
    return Scaled()


def wrong():
    return "model", 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of factories in a folder that is the current directory and not the repository root."""
    (tmp_path / "user_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and Path(p).resolve() != ROOT])
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        monkeypatch.delitem(sys.modules, name)   # imported from the repository root by earlier tests
    yield "user_factories"
    sys.modules.pop("user_factories", None)


def test_a_factory_returns_a_model_args_or_args_and_kwargs(factories):
    call = load_factory(f"{factories}:with_kwargs")
    assert call.args[0].shape == (4, 16) and set(call.kwargs) == {"scale"}
    assert load_factory(f"{factories}:with_args").kwargs == {}
    assert load_factory(f"{factories}:model_alone").args == ()
    with pytest.raises(FactoryError, match="returned a model alone, but its forward needs x"):
        load_factory(f"{factories}:needs_inputs")
    with pytest.raises(FactoryError, match=r"must return a model, \(model, args\) or \(model, args, kwargs\); "
                                           r"got a tuple of 2 \(str, int\)"):
        load_factory(f"{factories}:wrong")
    with pytest.raises(FactoryError, match="keyword inputs .* must be a dict, got list"):
        unpack_factory_result("f", (torch.nn.Linear(2, 2), (torch.randn(1, 2),), []))


def test_keyword_inputs_reach_the_compiled_model(factories, capsys):
    assert main(["compile", f"{factories}:with_kwargs", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["layer"] for layer in report["layers"]] == ["proj"]
    assert report["error_vs_reference"] == 0.0   # compiled with the scale the factory passed
    assert main(["sweep", "weights", f"{factories}:with_kwargs", "--json"]) == 0   # every compile of it, too
    sweep = json.loads(capsys.readouterr().out)
    assert [g["group"] for g in sweep["groups"]] == ["proj"] and len(sweep["whole_model"]) == 4


def test_module_resolves_from_installed_packages_outside_the_repository(factories):
    call = load_factory("sparsecc.examples.tiny_transformer:build")
    assert type(call.model).__name__ == "TinyTransformer"
    with pytest.raises(FactoryError, match="cannot import module 'examples.tiny_transformer' from the current "
                                           "directory or the installed packages"):
        load_factory("examples.tiny_transformer:build")   # the repository folder is not a package users have


def test_build_takes_the_host_targets_and_weights_follow_the_umask(factories, tmp_path, capsys):
    out = tmp_path / "artifact"
    assert main(["build", f"{factories}:with_args", "-o", str(out), "--no-check", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"] == host_targets() and host_targets()[0] == "cpu"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("weights.safetensors", "manifest.json", "manifest.sha256"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    assert capsys.readouterr().err == ""   # nothing besides the result


def test_build_targets_are_those_asked_for_then_the_host_s():
    assert build_targets(["cuda:90", "cpu"], with_host=True) == ["cuda:90", "cpu"] + host_targets()[1:]
    assert build_targets(["cuda:80"], with_host=False) == ["cuda:80"]
    with pytest.raises(ValueError, match="--no-host-targets needs at least one --target"):
        build_targets([], with_host=False)


def test_library_noise_is_hidden_unless_verbose():
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    for verbose, shown in ((False, ["the model's own"]), (True, ["library", "the model's own"])):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with library_noise_hidden(verbose):
                warnings.warn_explicit("library", UserWarning, "x.py", 1, module="torch.onnx._internal.exporter")
                warnings.warn_explicit("deprecated", DeprecationWarning, "x.py", 1, module="onnxscript.ir")
                warnings.warn_explicit("the model's own", UserWarning, "x.py", 1, module="sparsecc.api")
                assert registration.isEnabledFor(logging.WARNING) is verbose
        assert [str(w.message) for w in seen if w.category is UserWarning] == shown
    assert registration.isEnabledFor(logging.WARNING)   # the levels come back after the command


def test_quiet_and_verbose_are_accepted_by_every_command(capsys):
    for argv in (["compile", "-h"], ["sweep", "weights", "-h"], ["sweep", "tokens", "-h"], ["build", "-h"],
                 ["export", "-h"], ["sparsify", "-h"], ["inspect", "-h"], ["keygen", "-h"], ["opt", "-h"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "--quiet" in text and "--verbose" in text, argv
