"""Calibration batches are checked against the captured graph's inputs before any pass runs."""
import pytest
import torch
import torch.nn as nn

import sparsecc
from sparsecc.errors import ConfigError


class Block(nn.Module):
    def __init__(self, dim: int = 64):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x, scale):
        return self.down(torch.relu(self.up(x))) * scale


def _compile(calibration, dynamic_shapes=None):
    example = (torch.randn(2, 17, 64), torch.ones(1))
    return sparsecc.compile(Block(), example, {"weights": {"method": "wanda"}}, calibration=calibration,
                            dynamic_shapes=dynamic_shapes, check=False)


def _good():
    return (torch.randn(2, 17, 64), torch.ones(1))


@pytest.mark.parametrize("bad, message", [
    ((torch.randn(2, 17, 32), torch.ones(1)),
     r"calibration batch 3: input 0 has shape \[2, 17, 32\], expected \[2, 17, 64\] \(float32\)"),
    ((torch.randn(17, 64), torch.ones(1)),
     r"calibration batch 3: input 0 has shape \[17, 64\], expected \[2, 17, 64\] \(float32\)"),
    ((torch.randn(2, 17, 64), torch.ones(3)), r"calibration batch 3: input 1 has shape \[3\], expected \[1\]"),
    ((torch.randn(2, 17, 64, dtype=torch.float64), torch.ones(1)),
     r"calibration batch 3: input 0 has dtype float64, expected float32 \(shape \[2, 17, 64\]\)"),
])
def test_a_wrong_batch_is_named_with_the_expected_shape(bad, message):
    with pytest.raises(ConfigError, match=message):
        _compile([_good(), _good(), _good(), bad])


def test_a_bigger_batch_of_the_same_features_is_accepted():
    compiled = _compile([(torch.randn(8, 17, 64), torch.ones(1))])
    assert compiled.report().layers[0].details["calibration"].startswith("calibration")


def test_dims_declared_dynamic_may_differ():
    seq = torch.export.Dim("seq", min=2, max=64)
    compiled = _compile([_good(), (torch.randn(2, 9, 64), torch.ones(1))],
                        dynamic_shapes=({1: seq}, None))
    assert compiled.report().layers[0].details["method"] == "wanda"
    with pytest.raises(ConfigError, match=r"batch 1: input 0 has shape \[2, 9, 32\], expected \[2, s\w*, 64\]"):
        _compile([_good(), (torch.randn(2, 9, 32), torch.ones(1))], dynamic_shapes=({1: seq}, None))
