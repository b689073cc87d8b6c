"""The HTML report: escaped, self-contained, and drawn by a real browser (headless Chromium, when installed)."""
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from examples.tiny_moe import TinyMoE
from sparsecc.cli import main
from sparsecc.passes.attention.layout_picture import block_picture
from sparsecc.passes.records import RewriteRecord
from sparsecc.report import Report
from sparsecc.report_html import render_html
from sparsecc.runtime.attention_layout import layout_from_mask
from sparsecc.sweep_tokens import SweepRow, TokenSweep
from sparsecc.sweep_weights import WeightSweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXAMPLE_SPARSITY = {"moe": "dispatch", "attention": {"policy": "mask", "block": 64},
                    "weights": {"pattern": "2:4", "exclude": ["*.moe.*"]}}
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "dl", "dt", "dd", "code", "span",
             "br", "div", "ul", "li", "table", "thead", "tbody", "tr", "th", "td", "figure", "figcaption", "svg", "g",
             "rect", "text", "line", "polyline", "circle"}
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def small_moe():
    """The bundled MoE example at a size a test compiles in seconds (one layer, two experts)."""
    torch.manual_seed(0)
    return TinyMoE(vocab=64, dim=32, heads=2, hidden=64, layers=1, experts=2).eval(), (torch.randint(0, 64, (1, 256)),)


def _causal(size: int) -> torch.Tensor:
    return torch.ones(size, size, dtype=torch.bool).tril()[None, None]


def test_block_picture_marks_absent_partial_and_full_blocks():
    assert block_picture(layout_from_mask(_causal(256), 64, 64)) == ["1000", "2100", "2210", "2221"]


def test_block_picture_pools_large_layouts_to_the_limit():
    picture = block_picture(layout_from_mask(_causal(200 * 8), 8, 8), limit=64)   # 200 x 200 blocks
    assert len(picture) == 50 and {len(row) for row in picture} == {50}   # pooled 4 x 4
    assert picture[0] == "1" + "0" * 49 and picture[-1] == "2" * 49 + "1"


class _Tags(HTMLParser):
    """Every element name and attribute name on a page."""

    def __init__(self):
        super().__init__()
        self.names, self.attributes = set(), set()

    def handle_starttag(self, tag, attrs):
        self.names.add(tag)
        self.attributes |= {name for name, _ in attrs}


def _report(layer: str) -> Report:
    attention = RewriteRecord(layer, "sparsecc.block_attention", "sdpa", "mask/b64", [1, 2, 256, 256], 0, 0, 0, 0,
                              1000, 625, {"policy": "mask", "block": 64, "density": 0.625, "error_vs_dense": 1e-7,
                                          "layout_blocks": ["1000", "2100", "2210", "2221"]})
    linear = RewriteRecord("lm_head", "sparsecc.nm_linear", "aten.linear", "2:4", [64, 32], 2048, 1024, 8192, 4352,
                           4096, 2048, {})
    return Report("Model" + layer, "prune-nm", "torch", [attention, linear],
                  [{"layer": layer, "rule": "nm-linear", "reason": layer}], {}, 8192, 4352, error_vs_dense=0.25)


def _sweeps() -> list:
    weights = WeightSweep("Model", "magnitude", "2:4", groups=[{"group": "a", "layers": 2, "error": 0.1}],
                          whole_model=[{"pattern": "2:4 (magnitude)", "error": 0.3}])
    rows = [SweepRow(c, 2, int(16 * c), 16, 100, int(100 * c), e) for c, e in ((1.0, 0.0), (0.5, 0.1), (0.25, 0.4))]
    return [weights, TokenSweep("norm", "mlp", rows)]


def test_model_strings_are_escaped_and_the_page_loads_nothing(tmp_path):
    page = _report(HOSTILE).save_html(tmp_path / "r.html", sweeps=_sweeps()).read_text()
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "default-src 'none'" in page   # CSP: no script, no request, even if a string slipped through
    tags = _Tags()
    tags.feed(page)
    assert tags.names <= PAGE_TAGS and not tags.attributes & {"src", "href"} and "url(" not in page
    assert not any(name.startswith("on") for name in tags.attributes)   # no event handler anywhere
    assert set(re.findall(r"https?://[^\s\"']+", page)) == {"http://www.w3.org/2000/svg"}   # the SVG namespace


def test_page_has_table_bars_layouts_and_sweep_curves():
    page = render_html(_report("layers.0.attn").to_dict(), [s.to_dict() for s in _sweeps()])
    assert page.count("<tbody><tr>") == 1 and page.count("<tr>") == 3   # header + 2 layers
    assert page.count("<svg") == 3 + 1 + 2 + 2   # bytes, FLOPs, error; a layout; 2 per sweep
    assert "Attention block layouts" in page and 'class="cell-2"' in page
    assert "prefers-color-scheme: dark" in page


def test_a_sweep_without_rows_or_groups_is_refused():
    with pytest.raises(ValueError, match="report html: a sweep has"):
        render_html(None, [{"model": "m"}])


def test_cli_sweep_tokens_writes_the_curves(tmp_path, capsys):
    path = tmp_path / "sweep.html"
    assert main(["sweep", "tokens", "tests.compiler.test_sweep_tokens:build", "--capacities", "0.5,0.25",
                 "--html", str(path)]) == 0
    page = path.read_text()
    assert "error vs capacity" in page and page.count("<polyline") == 2


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_chromium_renders_the_moe_example_report(tmp_path, capsys):
    path = tmp_path / "report.html"
    assert main(["compile", "tests.compiler.test_report_html:small_moe", "--sparsity", json.dumps(EXAMPLE_SPARSITY),
                 "--html", str(path)]) == 0
    png = tmp_path / "report.png"
    dom = _chromium("--dump-dom", f"--screenshot={png}", "--window-size=1100,2200", "--hide-scrollbars", path.as_uri())
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert dom.returncode == 0 and not console, console
    # rewritten layers: attention, MoE, qkv, out, lm_head; figures: bytes, FLOPs, error, one layout
    assert dom.stdout.count("<tr>") == 1 + 5 and dom.stdout.count("<svg") == 4
    assert "layers.0.attn" in dom.stdout and "Attention block layouts" in dom.stdout and "cell-1" in dom.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
