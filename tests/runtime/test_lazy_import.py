import subprocess
import sys

import pytest


def test_runtime_loads_neither_compiler_nor_passes():
    code = ("import sys, sparsecc.runtime; "
            "bad = sorted(m for m in sys.modules if m.startswith('sparsecc.') and "
            "not m.startswith('sparsecc.runtime')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_subpackages_are_attributes_of_sparsecc_loaded_on_first_use():
    code = ("import sys, sparsecc; before = sorted(m for m in sys.modules if m.startswith('sparsecc.')); "
            "load = sparsecc.runtime.load; "
            "after = sorted(m for m in sys.modules if m.startswith('sparsecc.') and not m.startswith('sparsecc.runtime')); "
            "print(before, after, callable(load), sparsecc.passes.__name__, sparsecc.onnx.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]", "True", "sparsecc.passes", "sparsecc.onnx"]


def test_unknown_attribute_is_an_attribute_error():
    import sparsecc
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sparsecc.nope


LOAD_AND_RUN = """
import sys, torch, sparsecc.runtime
from safetensors.torch import load_file
io = load_file(sys.argv[2])
torch.testing.assert_close(sparsecc.runtime.load(sys.argv[1])(io["x"]), io["y"], rtol=0, atol=0)
print(sorted(m for m in sys.modules if m.startswith('sparsecc.') and not m.startswith('sparsecc.runtime')))
"""


def test_loading_an_artifact_needs_only_the_runtime(tmp_path):
    import torch
    import sparsecc

    model, x = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU()).eval(), torch.randn(4, 32)
    compiled = sparsecc.compile(model, (x,), sparsity="2:4")
    compiled.save(tmp_path / "artifact", targets=["cpu"], progress=False)
    from safetensors.torch import save_file
    save_file({"x": x, "y": compiled(x)}, str(tmp_path / "io.safetensors"))
    args = [str(tmp_path / "artifact"), str(tmp_path / "io.safetensors")]
    out = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
