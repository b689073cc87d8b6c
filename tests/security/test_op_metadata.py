"""Sparse-op metadata is checked, not trusted: every bad case is refused by the op's verifier (a reason
string, for real constants at load) and by a direct kernel call (RuntimeProgramError, never numbers)."""
import math
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsecc.runtime.attention_layout import Layout, causal_layout
from sparsecc.runtime.errors import RuntimeProgramError
from sparsecc.runtime.kernels.cpu.block_attention import block_attention_cpu
from sparsecc.runtime.kernels.cpu.moe import moe_cpu
from sparsecc.runtime.kernels.cpu.nm_conv2d import nm_conv2d_cpu
from sparsecc.runtime.kernels.cpu.nm_linear import nm_linear_cpu
from sparsecc.runtime.kernels.cpu.route import route_cpu, route_gather_cpu, unroute_cpu
from sparsecc.runtime.nm_format import compress_nm, decompress_nm, nm_index_problem, nm_mask, unpack_positions
from sparsecc.runtime.ops import OPS, get_op
from sparsecc.runtime.ops.moe import sample_moe_arguments as moe_sample

# ---------------------------------------------------------------- N:M indices


def _nm_weight(rows=8, k=16, n=2, m=4):
    weight = torch.randn(rows, k)
    values, indices = compress_nm(weight, n, m, mask=nm_mask(weight.abs(), n, m))
    return values, indices


def _nm_refused(values, indices, reason, n=2, m=4, k=16):
    x = torch.randn(3, k)
    problem = get_op("nm_linear").verify(x, values, indices, None, n, m, k)
    assert problem is not None and reason in problem, problem
    with pytest.raises(RuntimeProgramError, match="sparsecc::nm_linear: .*" + re.escape(reason)):
        nm_linear_cpu(x, values, indices, None, n, m, k)


def test_well_formed_weight_passes_and_runs():
    values, indices = _nm_weight()
    x = torch.randn(3, 16)
    assert get_op("nm_linear").verify(x, values, indices, None, 2, 4, 16) is None
    torch.testing.assert_close(nm_linear_cpu(x, values, indices, None, 2, 4, 16),
                               x @ decompress_nm(values, indices, 2, 4, 16).T)


@pytest.mark.parametrize("width", [1, 3])  # 16 * 2/4 positions * 2 bits = 2 bytes
def test_index_width_must_be_exact(width):
    values, indices = _nm_weight()
    wrong = torch.zeros(8, width, dtype=torch.uint8)
    wrong[:, : min(width, 2)] = indices[:, : min(width, 2)]
    _nm_refused(values, wrong, "indices [8, %d] must be [8, 2]" % width)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_index_dtype_must_be_uint8(dtype):
    values, indices = _nm_weight()
    _nm_refused(values, indices.to(dtype), "must be torch.uint8")


def test_duplicated_position_in_a_group_is_refused():
    values, indices = _nm_weight()
    indices = indices.clone()
    indices[5, 1] = 0b1110_0101  # group 2 of row 5 stores position 1 twice; group 3 keeps (2, 3)
    _nm_refused(values, indices, "row 5 stores a position twice in group 2")


def test_nonzero_tail_bits_are_refused():
    weight = torch.randn(2, 4)  # 1:4 over 4 columns: one 2-bit position, 6 tail bits
    values, indices = compress_nm(weight, 1, 4, mask=nm_mask(weight.abs(), 1, 4))
    indices = indices.clone()
    indices[1, 0] |= 0b0100_0000
    assert "row 1 has nonzero tail bits" in nm_index_problem(indices, 1, 4, 4)


@pytest.mark.parametrize("m", [4, 8, 16])
def test_no_byte_value_decodes_to_a_position_of_m_or_more(m):
    # BITS = log2(M), so a position >= M cannot be encoded: every possible byte, in every byte slot, decodes < M
    every_byte = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 3 * m // 2).contiguous()
    positions = unpack_positions(every_byte, every_byte.shape[1] * 8 // int(math.log2(m)), m)
    assert int(positions.min()) >= 0 and int(positions.max()) == m - 1


def test_fake_indices_are_checked_by_shape_only_real_ones_by_value():
    values, indices = _nm_weight()
    indices = indices.clone()
    indices[0, 0] = 0b0000_0101
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (torch.randn(3, 16), values, indices)]
    assert get_op("nm_linear").verify(*fake, None, 2, 4, 16) is None          # PassManager: no data to read
    assert "twice" in get_op("nm_linear").verify(fake[0], values, indices, None, 2, 4, 16)  # load: constants real


def test_kernel_rechecks_indices_written_in_place_after_a_good_call():
    values, indices = _nm_weight()
    x = torch.randn(3, 16)
    nm_linear_cpu(x, values, indices, None, 2, 4, 16)
    indices[2, 0] = 0b0000_0101  # bumps the version counter: the remembered check no longer applies
    with pytest.raises(RuntimeProgramError, match="row 2 stores a position twice"):
        nm_linear_cpu(x, values, indices, None, 2, 4, 16)


@pytest.mark.parametrize("n,m,k,reason", [(4, 4, 16, "1 <= N < M"), (2, 5, 16, "M must be one of"),
                                          (2, 4, 18, "multiple of M=4"), (2.0, 4, 16, "must be integers")])
def test_pattern_arguments_are_refused(n, m, k, reason):
    values, indices = _nm_weight()
    problem = get_op("nm_linear").verify(torch.randn(3, k), values, indices, None, n, m, k)
    assert problem is not None and reason in problem, problem


def test_conv_and_decompress_refuse_duplicated_positions():
    weight = torch.randn(6, 36)
    values, indices = compress_nm(weight, 2, 4, mask=nm_mask(weight.abs(), 2, 4))
    indices = indices.clone()
    indices[0, 0] = 0b0000_0101
    conv = (torch.randn(1, 4, 8, 8), values, indices, None, 2, 4, 36, [3, 3], [1, 1], [1, 1], [1, 1])
    assert "twice" in get_op("nm_conv2d").verify(*conv)
    with pytest.raises(RuntimeProgramError, match="sparsecc::nm_conv2d: .*twice"):
        nm_conv2d_cpu(*conv)
    assert "twice" in get_op("nm_decompress").verify(values, indices, 2, 4, 36)
    with pytest.raises(RuntimeProgramError, match="sparsecc::nm_decompress: .*twice"):
        get_op("nm_decompress").kernel("torch")(values, indices, 2, 4, 36)


# ---------------------------------------------------------------- MoE


def _moe_call(num_experts=4, router_columns=4, **attrs):
    hidden, _, w_gate_up, w_down, *shared = moe_sample(6, 16, 8, num_experts, True, False, False)
    call = dict(top_k=2, normalize=True, scoring="softmax", activation="silu", gated=True, capacity_factor=0.0)
    call.update(attrs)
    return (hidden, torch.randn(6, router_columns), w_gate_up, w_down, *shared, *call.values())


def _moe_refused(call, reason):
    problem = get_op("moe").verify(*call)
    assert problem is not None and reason in problem, problem
    with pytest.raises(RuntimeProgramError, match="sparsecc::moe: "):
        moe_cpu(*call)


@pytest.mark.parametrize("num_experts", [2, 6])  # fewer and more expert weights than router columns
def test_moe_expert_count_must_equal_router_columns(num_experts):
    _moe_refused(_moe_call(num_experts=num_experts), f"holds {num_experts} experts, router_logits [6, 4] routes to E=4")


def test_moe_router_logits_may_be_a_fake_register():
    call = list(_moe_call(num_experts=2))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        call[1] = mode.from_tensor(call[1])
    assert "routes to E=4" in get_op("moe").verify(*call)


@pytest.mark.parametrize("attrs,reason", [
    (dict(top_k=0), "top_k=0 must be in 1..E=4"), (dict(top_k=5), "top_k=5 must be in 1..E=4"),
    (dict(capacity_factor=-1.0), "capacity_factor=-1.0"), (dict(capacity_factor=float("nan")), "capacity_factor=nan"),
    (dict(capacity_factor=float("inf")), "capacity_factor=inf"), (dict(scoring="softplus"), "scoring 'softplus'"),
    (dict(activation="swish"), "activation 'swish'"), (dict(normalize=1), "must be booleans"),
])
def test_moe_attributes_are_refused(attrs, reason):
    _moe_refused(_moe_call(**attrs), reason)


def test_moe_triton_launcher_refuses_before_launching():
    triton_moe = pytest.importorskip("sparsecc.runtime.kernels.triton.moe")
    with pytest.raises(RuntimeProgramError, match="routes to E=4"):
        triton_moe.moe_triton(*_moe_call(num_experts=2))


# ---------------------------------------------------------------- token routing


@pytest.mark.parametrize("bad", [9, -1])  # past the sequence of 9, negative
def test_route_gather_indices_stay_in_their_sequence(bad):
    x, indices = torch.randn(2, 9, 4), torch.tensor([[0, 3, 5], [1, 2, 4]])
    indices[0, 2] = bad
    assert "outside their sequence's positions [0, 9)" in get_op("route_gather").verify(x, indices)
    with pytest.raises(RuntimeProgramError, match="sparsecc::route_gather: indices span"):
        route_gather_cpu(x, indices)


@pytest.mark.parametrize("bad", [9, -1])
def test_unroute_indices_stay_in_their_sequence(bad):
    residual, rows, indices = torch.randn(2, 9, 4), torch.randn(2, 3, 4), torch.tensor([[0, 3, 5], [1, 2, 4]])
    indices[1, 0] = bad
    assert "outside their sequence's positions [0, 9)" in get_op("unroute").verify(residual, rows, indices)
    with pytest.raises(RuntimeProgramError, match="sparsecc::unroute: indices span"):
        unroute_cpu(residual, rows, indices)


def test_route_refuses_capacity_and_scores_per_call():
    with pytest.raises(RuntimeProgramError, match="capacity=nan must be in"):
        route_cpu(torch.randn(2, 8), float("nan"))
    with pytest.raises(RuntimeProgramError, match="must be floating point"):
        route_cpu(torch.arange(8)[None], 0.5)
    assert "int64 [B, K]" in get_op("route_gather").verify(torch.randn(2, 9, 4), torch.zeros(2, 3, dtype=torch.int32))


@pytest.mark.interpreter
def test_triton_route_clamps_indices_into_their_own_sequence():
    triton_route = pytest.importorskip("sparsecc.runtime.kernels.triton.route")
    x = torch.arange(2 * 5 * 16, dtype=torch.float32).reshape(2, 5, 16)
    rows = triton_route.route_gather_triton(x, torch.tensor([[0, 7], [-3, 1]]), block_d=16)
    torch.testing.assert_close(rows, torch.stack([x[0, [0, 4]], x[1, [0, 1]]]))  # never a row of the other sequence
    out = triton_route.unroute_triton(x, torch.zeros(2, 2, 16), torch.tensor([[1, 99], [-7, 2]]), block_d=16)
    expected = x.clone()
    expected[0, [1, 4]] = 0
    expected[1, [0, 2]] = 0
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------- block attention


def _attention_call(layout):
    q, k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    return (q, k, v, *layout, None, 0.25, 16, 16)


@pytest.mark.parametrize("field,value,reason", [
    ("kv_indices", 2, "kv_indices holds a key block outside [0, NK=2)"),
    ("kv_indices", -1, "kv_indices holds a key block outside [0, NK=2)"),
    ("full_indices", 5, "full_indices holds a key block outside"),
    ("kv_num_blocks", 3, "kv_num_blocks holds a count outside [0, NK=2]"),
    ("full_num_blocks", -1, "full_num_blocks holds a count outside"),
])
def test_attention_layout_values_are_checked(field, value, reason):
    layout = Layout(*(t.clone() for t in causal_layout(32, 32, 16, 16)))
    getattr(layout, field).view(-1)[-1] = value
    assert reason in get_op("block_attention").verify(*_attention_call(layout))
    with pytest.raises(RuntimeProgramError, match="sparsecc::block_attention: " + re.escape(reason)):
        block_attention_cpu(*_attention_call(layout))


def test_attention_layout_listing_a_block_twice_is_refused():
    layout = Layout(*(t.clone() for t in causal_layout(32, 32, 16, 16)))
    layout.full_num_blocks[0, 0, 1] = 1
    layout.full_indices[0, 0, 1, 0] = 1  # query block 1: key block 1 full and partial
    assert "both full and partial" in get_op("block_attention").verify(*_attention_call(layout))


@pytest.mark.parametrize("scale,threshold,reason", [(float("nan"), 0.0, "scale=nan"), (float("inf"), 0.0, "scale=inf"),
                                                    (0.25, float("nan"), "threshold=nan")])
def test_attention_attributes_are_refused(scale, threshold, reason):
    call = list(_attention_call(causal_layout(32, 32, 16, 16)))
    call[8] = scale
    call.append(threshold)
    assert reason in get_op("block_attention").verify(*call)
    with pytest.raises(RuntimeProgramError, match=reason):
        block_attention_cpu(*call)


@pytest.mark.parametrize("args,reason", [((0, 16), "block_q=0"), ((16, 16, "window", 0), "window=0"),
                                         ((16, 16, "topk", 0, 0, float("nan")), "topk=nan must be a finite")])
def test_block_layout_refuses_per_call(args, reason):
    mask = torch.ones(1, 1, 32, 32, dtype=torch.bool).tril()
    assert reason in get_op("block_layout").verify(mask, *args)
    with pytest.raises(RuntimeProgramError, match="sparsecc::block_layout: " + reason):
        get_op("block_layout").kernel("torch")(mask, *args)


@pytest.mark.interpreter
def test_triton_attention_clamps_the_layout_it_reads():
    triton_attention = pytest.importorskip("sparsecc.runtime.kernels.triton.block_attention")
    good = causal_layout(32, 32, 16, 16)
    bad = Layout(good.kv_num_blocks, good.kv_indices.clone() + 100, good.full_num_blocks, good.full_indices)
    out = triton_attention.block_attention_triton(*_attention_call(bad))  # reads key block 1, never block 101
    assert out.shape == (1, 2, 32, 16) and bool(out.isfinite().all())


# ---------------------------------------------------------------- both callers of every verifier


@pytest.mark.parametrize("name", sorted(OPS))
def test_verifier_takes_real_constants_beside_fake_registers(name):
    """The load-time validator's call: tensors after the first real (constants), the first fake (a register)."""
    for args in OPS[name].samples():
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            first = args[0]   # a tensor, or a list of tensors (rule_layout's rows)
            fake = [mode.from_tensor(t) for t in first] if isinstance(first, list) else mode.from_tensor(first)
            mixed = [fake, *args[1:]]
        assert OPS[name].verify(*mixed) is None
