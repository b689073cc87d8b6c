"""Programs own their state: buffers a forward writes are the program's, never the user's module's.

A counter model (`self.calls += 1`) is the smallest stateful forward: each call's output depends
on how many calls came before, so any shared or skipped state update shows in the outputs.
"""
from __future__ import annotations

import copy

import pytest
import torch

import sparsecc
from sparsecc.build import record_kernels
from sparsecc.errors import CaptureError, SparseccError

from ..untouched import assert_untouched, snapshot


class Counter(torch.nn.Module):
    """Scales a linear layer by the number of calls so far (a buffer updated in place)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * self.calls


class TwoCaches(torch.nn.Module):
    """Two buffers equal at compile time (zeros) that every call updates differently."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keys", torch.zeros(8))
        self.register_buffer("values", torch.zeros(8))

    def forward(self, x):
        self.keys.add_(x)
        self.values.sub_(2 * x)
        return self.keys * self.values


class DecayingWeight(torch.nn.Module):
    """A linear layer whose weight (a buffer) the forward itself updates: state, not a weight to prune."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(8, 8))

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.weight)
        self.weight.mul_(0.5)
        return y


class WritesInput(torch.nn.Module):
    def forward(self, x):
        x.add_(1)
        return x * 2


def inputs(count: int) -> list[torch.Tensor]:
    return [torch.randn(2, 8) for _ in range(count)]


def eager_outputs(model: torch.nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        return [ref(x) for x in xs]


@pytest.fixture
def counter():
    return Counter()


def test_compile_and_calls_leave_the_model_bit_identical(counter):
    before = snapshot(counter)
    cm = sparsecc.compile(counter, (torch.randn(2, 8),), sparsity="2:4")
    assert_untouched(counter, before)
    for x in inputs(3):
        cm(x)
    assert_untouched(counter, before)
    assert cm.program.state_names == ["calls"]


def test_outputs_over_calls_equal_eager():
    model = Counter()
    cm = sparsecc.compile(model, (torch.randn(2, 8),))
    xs = inputs(4)
    for got, want in zip([cm(x) for x in xs], eager_outputs(model, xs)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert cm.state_dict()["calls"].item() == 4


def test_nm_outputs_over_calls_equal_the_pruned_eager_model(counter):
    cm = sparsecc.compile(counter, (torch.randn(2, 8),), sparsity="2:4")
    pruned = copy.deepcopy(counter)
    pruned.load_state_dict(cm.pruned_state_dict(), strict=False)
    xs = inputs(4)
    for got, want in zip([cm(x) for x in xs], eager_outputs(pruned, xs)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_report_error_vs_pruned_dense_is_exact_for_a_stateful_model(counter):
    report = sparsecc.compile(counter, (torch.randn(2, 8),), sparsity="2:4").report()
    assert report.error_vs_reference < 1e-6
    assert report.error_vs_dense > 0.01    # pruning does cost something: the check did run


def test_equal_state_buffers_are_not_merged_into_one():
    model = TwoCaches()
    cm = sparsecc.compile(model, (torch.randn(8),))
    assert sorted(cm.program.state_names) == ["keys", "values"]
    xs = [torch.randn(8) for _ in range(3)]
    for got, want in zip([cm(x) for x in xs], eager_outputs(model, xs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_weight_the_forward_writes_is_not_pruned():
    model = DecayingWeight()
    cm = sparsecc.compile(model, (torch.randn(2, 8),), sparsity="2:4")
    assert cm.records == []
    assert "tied to aten.mul_.Tensor" in cm.report().skipped[0]["reason"]
    xs = inputs(3)
    for got, want in zip([cm(x) for x in xs], eager_outputs(model, xs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_check_run_leaves_the_program_state_at_its_initial_value(counter):
    cm = sparsecc.compile(counter, (torch.randn(2, 8),), sparsity="2:4")
    assert cm.state_dict()["calls"].item() == 0
    assert cm.captured.dense_gm.calls.item() == 0


def test_reset_state_restarts_the_sequence(counter):
    cm = sparsecc.compile(counter, (torch.randn(2, 8),))
    x = torch.randn(2, 8)
    first = cm(x)
    cm(x), cm(x)
    cm.reset_state()
    assert cm.state_dict()["calls"].item() == 0
    torch.testing.assert_close(cm(x), first, rtol=0, atol=0)


def test_state_dict_is_a_copy(counter):
    cm = sparsecc.compile(counter, (torch.randn(2, 8),))
    state = cm.state_dict()
    state["calls"].fill_(100)
    assert cm.state_dict()["calls"].item() == 0


def test_saved_state_continues_after_load_and_loads_are_independent(counter, tmp_path):
    cm = sparsecc.compile(counter, (torch.randn(2, 8),))
    xs = inputs(4)
    want = eager_outputs(counter, xs)
    cm(xs[0]), cm(xs[1])
    cm.save(str(tmp_path), targets=["cpu"], progress=False)   # the state as it is now: calls == 2
    first, second = sparsecc.runtime.load(str(tmp_path)), sparsecc.runtime.load(str(tmp_path))
    torch.testing.assert_close(first(xs[2]), want[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first(xs[3]), want[3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(second(xs[2]), want[2], rtol=1e-6, atol=1e-6)   # its own copy, still at 2
    assert cm.state_dict()["calls"].item() == 2
    assert counter.calls.item() == 0
    assert first.state_dict()["calls"].item() == 4
    first.reset_state()   # back to the state as loaded, not as compiled
    assert first.state_dict()["calls"].item() == 2
    torch.testing.assert_close(first(xs[2]), want[2], rtol=1e-6, atol=1e-6)


def test_recording_kernels_for_a_gpu_build_leaves_the_state_to_save_alone(counter):
    cm = sparsecc.compile(counter, (torch.randn(2, 8),), sparsity="2:4")
    assert record_kernels(cm.program, cm.constants, [torch.randn(2, 8)])   # it ran the nm_linear launcher
    assert cm.state_dict()["calls"].item() == 0


def test_a_forward_that_writes_its_input_is_refused():
    x = torch.randn(3)
    before = x.clone()
    with pytest.raises(CaptureError, match=r"writes its input\(s\) x in place"):
        sparsecc.compile(WritesInput(), (x,))
    assert torch.equal(x, before)


def batchnorm_in_training_mode() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 8))
    model[1].running_mean.uniform_()
    return model.train()


@pytest.mark.parametrize("make", [Counter, batchnorm_in_training_mode])
def test_compile_never_modifies_the_model(make):
    model = make()
    before = snapshot(model)
    cm = sparsecc.compile(model, (torch.randn(4, 8),), sparsity="2:4")
    cm(torch.randn(4, 8))
    assert_untouched(model, before)


def test_a_compile_that_fails_in_the_rewrite_leaves_the_model_untouched(counter):
    before = snapshot(counter)
    wrong_width = [(torch.randn(2, 5),)]   # the Wanda pass fails on it, after capture
    with pytest.raises((SparseccError, RuntimeError)):
        sparsecc.compile(counter, (torch.randn(2, 8),), sparsity={"weights": {"pattern": "2:4", "method": "wanda"}},
                         calibration=wrong_width)
    assert_untouched(counter, before)


def test_a_compile_that_fails_in_the_check_leaves_the_model_untouched(counter, monkeypatch):
    def broken(*_):
        raise ArithmeticError("error measure failed")
    monkeypatch.setattr(sparsecc.api, "relative_error", broken)   # after both check runs wrote their state
    before = snapshot(counter)
    with pytest.raises(ArithmeticError):
        sparsecc.compile(counter, (torch.randn(2, 8),), sparsity="2:4")
    assert_untouched(counter, before)


def test_sweep_reference_runs_each_start_from_the_compile_time_state(counter):
    from sparsecc.sweep_weights import unstructured_error
    cm = sparsecc.compile(counter, (torch.randn(2, 8),), sparsity="2:4", check=False)
    assert unstructured_error(cm, (torch.randn(2, 8),), 0.0) == 0.0   # nothing pruned: same state, same output
    assert unstructured_error(cm, (torch.randn(2, 8),), 0.0) == 0.0


class PlainAttribute(torch.nn.Module):
    """State kept in an unregistered tensor attribute (torch.export lifts it as a constant)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.cache = torch.zeros(8)

    def forward(self, x):
        self.cache.add_(1.0)
        return self.lin(x) + self.cache


def test_state_in_a_plain_tensor_attribute_is_the_programs_own_and_starts_where_eager_does():
    model, x = PlainAttribute(), torch.randn(2, 8)
    eager = copy.deepcopy(model)
    cm = sparsecc.compile(model, (x,))
    assert torch.equal(model.cache, torch.zeros(8))   # compile's own runs left the user's tensor alone
    torch.testing.assert_close(cm(x), eager(x), rtol=1e-6, atol=1e-6)   # the first call sees cache == 1
    torch.testing.assert_close(cm(x), eager(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(model.cache, torch.zeros(8))


@pytest.mark.parametrize("sparsity", ["2:4", {"weights": {"pattern": "2:4", "method": "wanda"}}])
def test_without_the_check_the_program_still_starts_from_the_compile_time_state(counter, sparsity):
    cm = sparsecc.compile(counter, (torch.randn(2, 8),), sparsity=sparsity, check=False)
    assert cm.state_dict()["calls"].item() == 0   # calibration ran the graph; its updates are not kept
