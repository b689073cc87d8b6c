"""Walk every registered sparse op: fake shapes match the CPU kernel, the verifier accepts its samples."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsecc.runtime.ops import OPS, get_op


@pytest.mark.parametrize("name", sorted(OPS))
def test_fake_impl_matches_cpu_kernel(name):
    opdef = OPS[name]
    assert opdef.samples is not None, f"{name} has no samples for this test"
    for args in opdef.samples():
        real = opdef.kernel("torch")(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = opdef.op(*fake_args)
        reals, fakes = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
        assert len(reals) == len(fakes)
        for r, f in zip(reals, fakes):
            assert f.shape == r.shape and f.dtype == r.dtype
        assert opdef.verify(*fake_args) is None


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_runs_through_torch_ops_like_its_kernel(name):
    opdef = OPS[name]
    for args in opdef.samples():
        torch.testing.assert_close(opdef.op(*args), opdef.kernel("torch")(*args), equal_nan=True)


def test_lookup_by_short_or_qualified_name():
    assert get_op("nm_linear") is get_op("sparsecc::nm_linear")
    with pytest.raises(KeyError, match="unknown sparse op 'nope'"):
        get_op("nope")
