"""sparsecc::route / route_gather / unroute: CPU kernels and Triton kernels against the ops' reference semantics."""
import pytest
import torch
from sparsecc.runtime.kernels.cpu.route import route_cpu
from sparsecc.runtime.token_routing import kept_tokens
from sparsecc.runtime.ops.route import route_reference

ops = torch.ops.sparsecc
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gather_reference(x, indices):
    source = x.expand(indices.shape[0], *x.shape[1:]) if x.shape[0] == 1 else x
    return torch.stack([source[b, indices[b]] for b in range(indices.shape[0])])


def unroute_reference(residual, rows, indices):
    out = residual.clone()
    for b in range(indices.shape[0]):
        out[b, indices[b]] = rows[b].to(out.dtype)
    return out


def picks(batch, seq, kept):
    return torch.rand(batch, seq).argsort(-1)[:, :kept].sort(-1).values


@pytest.mark.parametrize("seq, capacity, kept", [(2048, 0.5, 1024), (2048, 0.75, 1536), (10, 0.7, 7),
                                                 (10, 0.25, 3), (5, 0.01, 1), (7, 1.0, 7), (1, 0.5, 1)])
def test_kept_count_is_ceil_and_at_least_one(seq, capacity, kept):
    assert kept_tokens(seq, capacity) == kept


@pytest.mark.parametrize("capacity", [0.0, -0.5, 1.5])
def test_capacity_outside_0_1_is_refused(capacity):
    with pytest.raises(ValueError, match="capacity must be in"):
        kept_tokens(8, capacity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_route_keeps_the_largest_scores_in_position_order(dtype):
    scores = torch.randn(3, 33).to(dtype)
    indices = ops.route(scores, 0.3)
    assert indices.dtype == torch.int64 and indices.shape == (3, 10)
    assert torch.equal(indices, route_reference(scores, 0.3))
    assert (indices.diff(dim=-1) > 0).all()


def test_route_at_capacity_one_is_every_token_and_nan_never_wins():
    assert torch.equal(ops.route(torch.randn(2, 6), 1.0), torch.arange(6).expand(2, 6))
    scores = torch.tensor([[float("nan"), 1.0, 0.5, -3.0]])
    assert ops.route(scores, 0.5).tolist() == [[1, 2]]


@pytest.mark.parametrize("shape", [(2, 9, 16), (3, 7, 2, 5), (1, 4, 8)])
def test_cpu_gather_and_unroute_match_reference(shape):
    x = torch.randn(*shape)
    indices = picks(shape[0], shape[1], 3)
    rows = ops.route_gather(x, indices)
    torch.testing.assert_close(rows, gather_reference(x, indices), rtol=0, atol=0)
    update = torch.randn_like(rows)
    torch.testing.assert_close(ops.unroute(x, update, indices), unroute_reference(x, update, indices), rtol=0, atol=0)


def test_gather_of_a_batch_one_table_serves_every_sequence():
    table, indices = torch.randn(1, 10, 4), picks(3, 10, 4)
    torch.testing.assert_close(ops.route_gather(table, indices), gather_reference(table, indices), rtol=0, atol=0)


def test_gather_then_unroute_every_token_is_identity():
    x = torch.randn(2, 5, 8)
    indices = route_cpu(torch.randn(2, 5), 1.0)
    assert torch.equal(ops.unroute(torch.zeros_like(x), ops.route_gather(x, indices), indices), x)


triton_route = pytest.importorskip("sparsecc.runtime.kernels.triton.route")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, kept", [((2, 9, 40), 4), ((1, 6, 3, 5), 6), ((3, 5, 8), 1)])
def test_triton_gather_and_unroute_match_reference(shape, kept, dtype):
    x = torch.randn(*shape).to(dtype)
    indices = picks(shape[0], shape[1], kept)
    xd, idx = x.to(DEVICE), indices.to(DEVICE)
    rows = triton_route.route_gather_triton(xd, idx, block_d=16)
    torch.testing.assert_close(rows.cpu(), gather_reference(x, indices), rtol=0, atol=0)
    update = torch.randn(shape[0], kept, *shape[2:]).to(dtype)
    out = triton_route.unroute_triton(xd, update.to(DEVICE), idx, block_d=16)
    torch.testing.assert_close(out.cpu(), unroute_reference(x, update, indices), rtol=0, atol=0)


def test_triton_gather_of_a_batch_one_table():
    table, indices = torch.randn(1, 7, 24), picks(2, 7, 3)
    rows = triton_route.route_gather_triton(table.to(DEVICE), indices.to(DEVICE), block_d=16)
    torch.testing.assert_close(rows.cpu(), gather_reference(table, indices), rtol=0, atol=0)


@pytest.mark.gpu
def test_ops_dispatch_to_triton_on_cuda():
    x, scores = torch.randn(2, 64, 128, device="cuda", dtype=torch.float16), torch.randn(2, 64, device="cuda")
    indices = ops.route(scores, 0.5)
    rows = ops.route_gather(x, indices)
    torch.testing.assert_close(rows.cpu(), gather_reference(x.cpu(), indices.cpu()), rtol=0, atol=0)
    out = ops.unroute(x, rows * 2, indices)
    torch.testing.assert_close(out.cpu(), unroute_reference(x.cpu(), (rows * 2).cpu(), indices.cpu()), rtol=0, atol=0)
