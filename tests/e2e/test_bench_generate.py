"""bench/generate.py --quick: the short-context rows run and the table prints (a smoke run, not a speed check;
torch.compile and the long-context rows are left out: each compiles for tens of seconds)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root: bench/
from bench import generate  # noqa: E402


def test_quick_run_prints_every_row(capsys):
    tables = generate.main(["--quick", "--dtypes", "fp32", "--new-tokens", "4", "--no-torch-compile",
                             "--no-long"])
    printed = capsys.readouterr().out
    rows = {r.name: r for r in tables["fp32"]}
    assert set(rows) == {"transformers", "torch.compile", "sparsecc dense", "sparsecc 2:4"}
    assert rows["torch.compile"].note == "skipped"
    for name in ("transformers", "sparsecc dense", "sparsecc 2:4"):
        assert rows[name].tok_s > 0 and rows[name].kv_bytes > 0 and rows[name].peak_rss > 0, rows[name]
    cache, layer_counters = rows["transformers"].kv_bytes, 8 * 2   # the same keys and values, plus write positions
    assert cache <= rows["sparsecc dense"].kv_bytes <= cache + layer_counters
    assert "vs torch.compile" in printed and "long" not in tables
