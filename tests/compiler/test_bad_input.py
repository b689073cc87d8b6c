"""Every kind of bad input gets a clear error and leaves the model untouched."""
import numpy as np
import pytest
import torch

import sparsecc
from sparsecc.errors import CaptureError, ConfigError
from sparsecc.runtime.errors import InputMismatchError

from .models import Projections
from ..untouched import assert_untouched, snapshot


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:          # control flow on data: torch.export cannot capture it
            return self.fc(x)
        return x


@pytest.mark.parametrize("pattern", ["3:2", "2:3:4", "0:4", "2:6"])
def test_invalid_pattern(pattern):
    model = Projections()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="weights.pattern"):
        sparsecc.compile(model, (torch.randn(2, 32),), sparsity=pattern)
    assert_untouched(model, before)


def test_unknown_config_key():
    with pytest.raises(ConfigError, match="unknown key 'wieghts'"):
        sparsecc.compile(Projections(), (torch.randn(2, 32),), sparsity={"wieghts": "2:4"})


def test_uncapturable_model_shows_exporter_reason():
    model = DataDependent()
    before = snapshot(model)
    with pytest.raises(CaptureError) as err:
        sparsecc.compile(model, (torch.randn(2, 8),), sparsity="2:4")
    message = str(err.value)
    assert "torch.export could not capture DataDependent" in message
    assert "data-dependent" in message.lower() or "guard" in message.lower()
    assert_untouched(model, before)


@pytest.mark.parametrize("inputs, words", [
    ("tokens", "expected a tuple of positional arguments"),
    ((np.zeros((2, 32), dtype=np.float32),), "leaf 0 is a ndarray"),
    (42, "got int"),
])
def test_example_inputs_of_the_wrong_type(inputs, words):
    with pytest.raises(ConfigError, match=words):
        sparsecc.compile(Projections(), inputs, sparsity="2:4")


def test_not_a_module():
    with pytest.raises(ConfigError, match="expected a torch.nn.Module"):
        sparsecc.compile(lambda x: x, (torch.randn(2),), sparsity="2:4")


def test_unknown_backend():
    with pytest.raises(ConfigError, match=r"unknown backend 'cuda' \(accepted: torch, triton\)"):
        sparsecc.compile(Projections(), (torch.randn(2, 32),), backend="cuda")


def test_bad_pipeline_string():
    with pytest.raises(ValueError, match="prune-mn"):
        sparsecc.compile(Projections(), (torch.randn(2, 32),), pipeline="prune-mn{n=2},cleanup")


def test_calls_with_other_shapes_or_dtypes():
    compiled = sparsecc.compile(Projections(), (torch.randn(2, 32),), sparsity="2:4")
    with pytest.raises(InputMismatchError, match=r"input 'x' dim 0: expected size 2, got 3 \(compiled for float32\[2, 32\]"):
        compiled(torch.randn(3, 32))
    with pytest.raises(InputMismatchError, match="expected dtype float32, got float16"):
        compiled(torch.randn(2, 32, dtype=torch.float16))
    with pytest.raises(InputMismatchError, match="structure"):
        compiled(torch.randn(2, 32), torch.randn(2, 32))


class MetaBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.register_buffer("meta", torch.ones(8))   # clashes with GraphModule.meta

    def forward(self, x):
        return self.fc(x) * self.meta


def test_tensor_named_like_a_graph_module_attribute_is_named_in_the_error():
    with pytest.raises(CaptureError, match=r"\['meta'\].*rename"):
        sparsecc.compile(MetaBuffer(), (torch.randn(2, 8),), sparsity="2:4")
