"""Calibration batches of any batch or sequence size: the dims that differ from the example are captured
dynamic, so the masks equal those of an eager reference that hooks the model's own nn.Linear inputs."""
import copy

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import sparsecc
from sparsecc.errors import ConfigError
from sparsecc.passes.nm.sparsegpt import sparsegpt_prune

N, M = 2, 4
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def single_thread():
    """Tiny layers: on a busy 2-core machine two threads mostly wait on each other (15 ms per 32x64 linear)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def _llama():
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()


def _batch(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0   # a padded row: the masked positions' activations still reach every linear
    return torch.randint(0, 100, (batch, seq), generator=generator), mask


EXAMPLE = _batch(4, 16, 0)
CALIBRATION = [_batch(2, 8, 1), _batch(8, 24, 2)]


def _compile(model, method, calibration=CALIBRATION, example=EXAMPLE, **kwargs):
    return sparsecc.compile(model, example, {"weights": {"pattern": f"{N}:{M}", "method": method}},
                            calibration=calibration, check=False, **kwargs)


def _linear_order(model, batch) -> list[str]:
    """The nn.Linear modules in the order the forward calls them."""
    order, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(lambda mod, args, name=name: order.append(name)))
    with torch.no_grad():
        model(*batch)
    for handle in handles:
        handle.remove()
    return list(dict.fromkeys(order))


class Observed(Exception):
    """Raised by the hook once the layer's input is recorded: the rest of the forward is not needed."""


def _observed(model, name, batches) -> torch.Tensor:
    """Every row the linear `name` reads over `batches`, [tokens, in] in float64."""
    rows = []

    def record(module, args):
        rows.append(args[0].reshape(-1, args[0].shape[-1]).double())
        raise Observed

    handle = model.get_submodule(name).register_forward_pre_hook(record)
    with torch.no_grad():
        for batch in batches:
            with pytest.raises(Observed):
                model(*batch)
    handle.remove()
    return torch.cat(rows)


def _top_n_of_m(scores: torch.Tensor) -> torch.Tensor:
    groups = scores.reshape(scores.shape[0], -1, M)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(N, dim=2).indices, True)
    return keep.reshape(scores.shape)


def _reference(model, batches, method, pruned: set[str]) -> dict[str, torch.Tensor]:
    """Layer by layer on the eager model, each layer's inputs computed with the layers before it pruned."""
    model, weights = copy.deepcopy(model), {}
    for name in _linear_order(model, batches[0]):
        if f"{name}.weight" not in pruned:
            continue
        linear, x = model.get_submodule(name), _observed(model, name, batches)
        w = linear.weight.detach()
        if method == "wanda":
            w = w.masked_fill(~_top_n_of_m(w.abs().double() * x.square().sum(0).sqrt()), 0)
        else:
            w = sparsegpt_prune(w, x.T @ x / x.shape[0], N, M, layer=name)[0]
        linear.weight.data = w
        weights[f"{name}.weight"] = w
    return weights


@pytest.fixture(scope="module")
def calibrated():
    """(family, method) -> (model, compiled on CALIBRATION), each compiled once per module (seconds each)."""
    cache = {}

    def get(family, method: str):
        if (family, method) not in cache:
            model = family()
            cache[family, method] = model, _compile(model, method)
        return cache[family, method]
    return get


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("family", [_bert, _llama])
def test_masks_from_batches_of_other_sizes_equal_the_eager_reference(calibrated, family, method):
    model, compiled = calibrated(family, method)
    got = compiled.pruned_state_dict()
    want = _reference(model, CALIBRATION, method, set(got))
    assert len(want) >= 12 and set(want) == set(got)
    for name in want:
        assert torch.equal(got[name] != 0, want[name] != 0), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
    assert compiled.records[0].details["calibration"] == "calibration: 2 batch(es) of [2, 8], [8, 24]"


def test_the_program_runs_the_calibration_sizes_as_the_pruned_model(calibrated):
    model, compiled = calibrated(_bert, "wanda")
    pruned = torch.func.functional_call(model, compiled.pruned_state_dict(), CALIBRATION[1], strict=False)
    torch.testing.assert_close(compiled(*CALIBRATION[1]).last_hidden_state, pruned.last_hidden_state,
                               rtol=1e-4, atol=1e-4)


def test_batches_of_the_example_sizes_keep_the_static_capture():
    compiled = _compile(_bert(), "wanda", calibration=[_batch(4, 16, 3)])
    sizes = [n.meta["val"].shape for n in compiled.captured.gm.graph.nodes if n.op == "placeholder"]
    assert sizes == [(4, 16), (4, 16)] and compiled.captured.symbol_ranges == {}


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(32, 32)

    def forward(self, x):
        return self.l(x).reshape(2, 4, 32)     # the batch of 8 rows is baked into the model


@pytest.mark.parametrize("model, example, batch, message", [
    (FixedBatch(), (torch.randn(8, 32),), (torch.randn(6, 32),),
     r"batch 1: input 0 has shape \[6, 32\], expected \[8, 32\] \(float32\); x dim 0 is 6, but the model fixes "
     r"it to 8 \(torch.export could not keep it dynamic\)"),
    (_bert(), EXAMPLE, _batch(2, 80, 4),
     r"input 0 has shape \[2, 80\], expected \[s\d+, s\d+\] \(int64\); input_ids dim 1 is 80, but it must "
     r"lie in \[2, 64\] \(s\d+, as torch.export captured it\)"),
    (_bert(), EXAMPLE, (_batch(2, 8, 4)[0], _batch(2, 9, 4)[1]),
     r"input 1 has shape \[2, 9\].*; attention_mask dim 1 is 9, but the model ties it to input_ids dim 1, which is 8"),
    (_bert(), EXAMPLE, _batch(1, 16, 4),
     r"input_ids dim 0 is 1, but it must lie in \[2, inf\]"),
    (_bert(), EXAMPLE, (torch.randint(0, 100, (4, 16, 1)), EXAMPLE[1]),
     r"input 0 has shape \[4, 16, 1\], expected \[4, 16\] \(int64\); it has rank 3, the example input has rank 2"),
    (_bert(), EXAMPLE, (EXAMPLE[0].int(), EXAMPLE[1]), r"input 0 has dtype int32, expected int64"),
])
def test_a_batch_the_graph_cannot_run_is_named_with_its_input_and_dim(model, example, batch, message):
    with pytest.raises(ConfigError, match=message):
        _compile(model, "wanda", calibration=[example, batch], example=example)


class Rows(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_a_graph_with_no_size_baked_in_stays_static():
    """Capturing the differing dims dynamic gives the same code: the static graph runs every batch exactly,
    and passes that need static sizes (token-routing) still see them."""
    torch.manual_seed(0)
    model, x = Rows().eval(), torch.randn(2, 16, 32)
    batches = [(torch.randn(4, 16, 32),), (torch.randn(3, 5, 32),)]
    compiled = sparsecc.compile(model, (x,), {"weights": {"method": "wanda"}}, calibration=batches, check=False)
    assert compiled.captured.symbol_ranges == {}
    rows = torch.cat([b[0].reshape(-1, 32) for b in batches]).double()
    want = _top_n_of_m(model.up.weight.detach().abs().double() * rows.square().sum(0).sqrt())
    assert torch.equal(compiled.pruned_state_dict()["up.weight"] != 0, want)
