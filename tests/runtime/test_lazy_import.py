import subprocess
import sys


def test_runtime_loads_neither_compiler_nor_passes():
    code = ("import sys, sparsecc.runtime; "
            "bad = sorted(m for m in sys.modules if m.startswith('sparsecc.') and "
            "not m.startswith('sparsecc.runtime')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
