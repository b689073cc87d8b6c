"""`sparsecc sweep weights` and `sparsecc compile --method`."""
import json

import pytest
import torch
from torch import nn

from sparsecc.cli import main
from sparsecc.sweep_weights import group_of, sweep_weights


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)) for _ in range(2))
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def build():
    torch.manual_seed(0)
    return Stack(), (torch.randn(4, 16),)


def test_sweep_per_layer_and_whole_model():
    model, inputs = build()
    sweep = sweep_weights(model, inputs)
    assert [g["group"] for g in sweep.groups] == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "head"]
    assert all(0 < g["error"] for g in sweep.groups)
    whole = {w["pattern"]: w["error"] for w in sweep.whole_model}
    assert list(whole) == ["1:4 (magnitude)", "2:4 (magnitude)", "4:8 (magnitude)", "unstructured 50% (magnitude)"]
    assert whole["1:4 (magnitude)"] > whole["2:4 (magnitude)"] > 0
    assert whole["1:4 (magnitude)"] > whole["4:8 (magnitude)"] > 0
    assert max(g["error"] for g in sweep.groups) < whole["2:4 (magnitude)"] * 1.5
    text = str(sweep)
    assert "only this group pruned" in text and "unstructured 50% (magnitude)" in text


def test_sweep_groups_by_depth_and_respects_exclude():
    model, inputs = build()
    sweep = sweep_weights(model, inputs, depth=2, exclude=["head"], method="wanda")
    assert [(g["group"], g["layers"]) for g in sweep.groups] == [("blocks.0", 2), ("blocks.1", 2)]
    assert sweep.whole_model[1]["pattern"] == "2:4 (wanda)"
    assert group_of("blocks.0.mlp.up", 2) == "blocks.0" and group_of("head", None) == "head"


def test_cli_sweep_weights_json(capsys):
    assert main(["sweep", "weights", "tests.compiler.test_sweep_weights:build", "--depth", "1", "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    assert [g["group"] for g in sweep["groups"]] == ["blocks", "head"] and len(sweep["whole_model"]) == 4


def test_cli_compile_method_flag(capsys):
    assert main(["compile", "tests.compiler.test_sweep_weights:build", "--method", "sparsegpt", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {layer["details"]["method"] for layer in report["layers"]} == {"sparsegpt"}
    assert "method=sparsegpt" in report["pipeline"]
    assert report["layers"][0]["details"]["calibration"] == "example inputs (no calibration given)"
    assert main(["compile", "tests.compiler.test_sweep_weights:build", "--sparsity",
                 '{"weights": {"pattern": "4:8"}}', "--method", "wanda", "--no-check"]) == 0
    assert "N:M mask method: wanda (5 layers)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compile", "tests.compiler.test_sweep_weights:build", "--method", "obs"])
    assert "invalid choice: 'obs'" in capsys.readouterr().err
