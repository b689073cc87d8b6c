"""`sparsecc sweep tokens` and `sweep_tokens`: error and FLOPs per capacity."""
import torch
from sparsecc.cli import main
from sparsecc.sweep_tokens import sweep_tokens

from ..passes.routing_models import stack


def build():
    """Factory for the CLI test: (model, example inputs)."""
    return stack(layers=3), (torch.randn(1, 16, 32),)


def test_api_rows_follow_the_capacities():
    model, inputs = build()
    sweep = sweep_tokens(model, inputs, [1.0, 0.5, 0.25], layers=["*"])
    assert [r.capacity for r in sweep.rows] == [1.0, 0.5, 0.25]
    assert [r.kept for r in sweep.rows] == [16, 8, 4] and all(r.blocks == 3 for r in sweep.rows)
    assert sweep.rows[0].error_vs_dense == 0.0 and 0 < sweep.rows[1].error_vs_dense
    assert sweep.rows[2].flops_after < sweep.rows[1].flops_after < sweep.rows[0].flops_before


def test_cli_prints_a_row_per_capacity(capsys):
    assert main(["sweep", "tokens", "tests.compiler.test_sweep_tokens:build", "--capacities", "1,0.5"]) == 0
    out = capsys.readouterr().out
    assert "router norm" in out and "16/16" in out and "8/16" in out
    assert "kept dense: layers.0.mlp" in out   # default: first and last blocks dense


def test_cli_refuses_capacities_outside_0_1(capsys):
    try:
        main(["sweep", "tokens", "tests.compiler.test_sweep_tokens:build", "--capacities", "1,2"])
    except SystemExit as err:
        assert err.code == 2
    assert "capacities must be in (0, 1]" in capsys.readouterr().err
