"""sparsecc::nm_conv2d against the pruned dense conv, and prune-nm on convolutions (incl. a transformers ResNet)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecc
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_mask
from sparsecc.runtime.ops import get_op


def _compressed(out: int, c: int, kh: int, kw: int, n: int, m: int, dtype=torch.float32):
    weight = torch.randn(out, c * kh * kw, dtype=dtype)
    values, indices = compress_nm(weight, n, m, mask=nm_mask(weight.abs(), n, m))
    dense = decompress_nm(values, indices, n, m, c * kh * kw).reshape(out, c, kh, kw)
    return values, indices, dense


@pytest.mark.parametrize("x_shape, kernel, stride, padding, dilation, nm, bias", [
    ((2, 4, 10, 9), [3, 3], [1, 1], [1, 1], [1, 1], (2, 4), True),
    ((1, 8, 11, 12), [3, 2], [2, 1], [0, 2], [2, 1], (1, 4), False),
    ((8, 7, 7), [1, 1], [1, 1], [0, 0], [1, 1], (4, 8), True),          # unbatched, 1x1
    ((3, 2, 9, 9), [4, 4], [3, 2], [2, 1], [1, 2], (2, 8), True),
])
def test_kernel_matches_the_pruned_dense_conv(x_shape, kernel, stride, padding, dilation, nm, bias):
    n, m = nm
    values, indices, dense = _compressed(6, x_shape[-3], *kernel, n, m)
    b = torch.randn(6) if bias else None
    x = torch.randn(*x_shape)
    want = F.conv2d(x, dense, b, stride, padding, dilation)
    got = torch.ops.sparsecc.nm_conv2d(x, values, indices, b, n, m, dense[0].numel(), kernel, stride, padding, dilation)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous()


def test_verifier_names_the_problem():
    values, indices, _ = _compressed(6, 4, 3, 3, 2, 4)
    verify = get_op("nm_conv2d").verify
    assert "channels" in verify(torch.randn(1, 5, 8, 8), values, indices, None, 2, 4, 36, [3, 3], [1, 1], [1, 1], [1, 1])
    assert "stride" in verify(torch.randn(1, 4, 8, 8), values, indices, None, 2, 4, 36, [3, 3], [0, 1], [1, 1], [1, 1])
    assert "x [8, 8] must be" in verify(torch.randn(8, 8), values, indices, None, 2, 4, 36, [3, 3], [1, 1], [1, 1], [1, 1])
    assert verify(torch.randn(1, 4, 8, 8), values, indices, None, 2, 4, 36, [3, 3], [1, 1], [1, 1], [1, 1]) is None


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.strided = nn.Conv2d(16, 16, 3, stride=2, dilation=2, padding=2, bias=False)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 16, 1, groups=2)

    def forward(self, x):
        return self.grouped(self.depthwise(torch.relu(self.strided(torch.relu(self.conv(x))))))


def test_prune_nm_rewrites_dense_convs_and_skips_grouped_ones():
    model, x = ConvNet(), torch.randn(2, 8, 12, 12)
    cm = sparsecc.compile(model, (x,), "2:4")
    report = cm.report()
    assert [r.layer for r in cm.records] == ["conv", "strided"]
    assert all(r.op == "sparsecc.nm_conv2d" and r.shape[1] in (72, 144) for r in cm.records)
    reasons = {s["layer"]: s["reason"] for s in report.skipped}
    assert reasons["depthwise"].startswith("depthwise convolution (groups=16)")
    assert reasons["grouped"].startswith("grouped convolution (groups=2)")
    assert report.error_vs_reference < 1e-5 and report.error_vs_dense > 1e-2
    weights = cm.pruned_state_dict()
    assert weights["conv.weight"].shape == (16, 8, 3, 3)
    groups = weights["conv.weight"].reshape(16, -1, 4)
    assert bool(((groups != 0).sum(-1) <= 2).all())
    torch.testing.assert_close(cm(x), torch.func.functional_call(model, weights, (x,), strict=False),
                               rtol=1e-5, atol=1e-5)
    assert "sparsecc.nm_conv2d(" in cm.ir()


def _tiny_resnet():
    from transformers import ResNetConfig, ResNetModel
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    model = ResNetModel(config).eval()
    with torch.no_grad():  # trained-looking batch norms (the defaults are exactly 0 and 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5), module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 1.5)
    return model


def test_transformers_resnet_magnitude_and_sparsegpt():
    model = _tiny_resnet()
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(2)]
    x = torch.randn(2, 3, 16, 16)
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        cm = sparsecc.compile(model, (x,), {"weights": {"method": method}}, calibration=calibration)
        report = cm.report()
        assert len(cm.records) == 5 and report.error_vs_reference < 1e-5
        assert "reduction dim C*kh*kw = 147 is not divisible by M=4" in report.skipped[0]["reason"]
        errors[method] = report.error_vs_dense
    assert errors["sparsegpt"] < errors["magnitude"]


@pytest.mark.gpu
def test_cuda_kernel_matches_the_pruned_dense_conv():
    values, indices, dense = _compressed(32, 16, 3, 3, 2, 4, dtype=torch.float16)
    x = torch.randn(2, 16, 20, 20, dtype=torch.float16)
    want = F.conv2d(x.float(), dense.float(), None, [1, 1], [1, 1], [1, 1])
    got = torch.ops.sparsecc.nm_conv2d(x.cuda(), values.cuda(), indices.cuda(), None, 2, 4, 144,
                                       [3, 3], [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=5e-2)


@pytest.mark.interpreter
def test_triton_backend_kernel_under_the_interpreter():
    values, indices, dense = _compressed(8, 4, 3, 3, 2, 4)
    x = torch.randn(1, 4, 5, 5)
    got = get_op("nm_conv2d").kernel("triton")(x, values, indices, None, 2, 4, 36, [3, 3], [1, 1], [1, 1], [1, 1])
    torch.testing.assert_close(got, F.conv2d(x, dense, None, 1, 1, 1), rtol=1e-4, atol=1e-4)
