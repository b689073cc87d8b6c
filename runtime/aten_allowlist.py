"""The exact ATen overloads a Program may run (the data half of `sparsecc.runtime.op_table`).

Built from what the lowering emits for the models the test suite compiles
(plain modules, the transformers models, MoE/routing models, imported ONNX
graphs) plus the core-tagged (`torch.Tag.core`) elementwise, reduction and
shape ops common models need. Each one checks its indices and sizes itself.
Left out on purpose, whatever a graph holds: `_reshape_alias`, `as_strided*`
(raw strides over any storage), `segment_reduce` (its `unsafe` flag),
`_convert_indices_*`, `_sobol_engine*`, `*unsafe*` but `_unsafe_view`,
sparse/nested/quantized/mkldnn constructors and conversions, `set_`,
`resize_`, `from_file`, `save`/`load`, RNG ops with a Generator argument and
anything whose result is not a strided tensor. `tests/security/test_allowlist.py`
checks that every entry exists and takes no Generator.
"""
from __future__ import annotations

ELEMENTWISE = (
    "__and__.Tensor", "abs.default", "acos.default", "acosh.default", "add.Scalar", "add.Tensor", "addcdiv.default",
    "addcmul.default", "asin.default", "asinh.default", "atan.default", "atan2.default", "atanh.default",
    "bitwise_and.Scalar", "bitwise_and.Tensor", "bitwise_not.default", "bitwise_or.Scalar", "bitwise_or.Tensor",
    "bitwise_xor.Scalar", "bitwise_xor.Tensor", "ceil.default", "clamp.Tensor", "clamp.default",
    "clamp_max.default", "clamp_min.default", "cos.default", "cosh.default", "diff.default", "div.Scalar", "div.Scalar_mode",
    "div.Tensor", "div.Tensor_mode", "elu.default", "eq.Scalar", "eq.Tensor", "erf.default", "exp.default",
    "exp2.default", "expm1.default", "floor.default", "floor_divide.default", "fmod.Scalar", "fmod.Tensor",
    "ge.Scalar", "ge.Tensor", "gelu.default", "gt.Scalar", "gt.Tensor", "hardsigmoid.default",
    "hardswish.default", "hardtanh.default", "isfinite.default", "isinf.default", "isnan.default", "le.Scalar",
    "le.Tensor", "leaky_relu.default", "lerp.Scalar", "lerp.Tensor", "log.default", "log10.default",
    "log1p.default", "log2.default", "logical_and.default", "logical_not.default", "logical_or.default",
    "logical_xor.default", "lt.Scalar", "lt.Tensor", "masked_fill.Scalar", "masked_fill.Tensor",
    "maximum.default", "minimum.default", "mish.default", "mul.Scalar", "mul.Tensor", "nan_to_num.default",
    "ne.Scalar", "ne.Tensor", "neg.default", "pow.Scalar", "pow.Tensor_Scalar", "pow.Tensor_Tensor",
    "reciprocal.default", "relu.default", "relu6.default", "remainder.Scalar", "remainder.Tensor",
    "round.decimals", "round.default", "rsqrt.default", "rsub.Scalar", "rsub.Tensor", "sigmoid.default",
    "sign.default", "silu.default", "sin.default", "sinh.default", "softplus.default", "sqrt.default",
    "square.default", "sub.Scalar", "sub.Tensor", "tan.default", "tanh.default", "trunc.default",
    "where.Scalar", "where.ScalarOther", "where.ScalarSelf", "where.self",
)
REDUCTIONS = (
    "_log_softmax.default", "_softmax.default", "all.default", "all.dim", "amax.default", "amin.default",
    "any.default", "any.dim", "any.dims", "argmax.default", "argmin.default", "cumprod.default",
    "cumsum.default", "histc.default", "linalg_vector_norm.default", "log_softmax.int", "logsumexp.default", "max.default", "max.dim", "mean.default",
    "mean.dim", "min.default", "min.dim", "norm.Scalar", "norm.ScalarOpt_dim", "prod.default", "prod.dim_int",
    "softmax.int", "sort.default", "std.correction", "std.dim", "sum.default", "sum.dim_IntList", "topk.default",
    "var.correction", "var.dim", "var_mean.correction",
)
VIEWS_AND_SHAPES = (
    "_unsafe_view.default", "alias.default", "cat.default", "chunk.default", "clone.default",
    "constant_pad_nd.default", "contiguous.default", "detach.default", "diagonal.default", "expand.default",
    "expand_as.default", "flatten.using_ints", "flip.default", "lift_fresh_copy.default", "movedim.int",
    "narrow.default", "pad.default", "permute.default", "repeat.default", "repeat_interleave.self_int",
    "reshape.default", "roll.default", "select.int", "slice.Tensor", "split.Tensor", "split_with_sizes.default",
    "squeeze.default", "squeeze.dim", "squeeze.dims", "stack.default", "sym_numel.default", "sym_size.int",
    "sym_storage_offset.default", "sym_stride.int", "t.default", "transpose.int", "tril.default",
    "triu.default", "unbind.int", "unflatten.int", "unsqueeze.default", "view.default", "view.dtype", "view_as.default",
)
INDEXING = (
    "gather.default", "index.Tensor", "index_add.default", "index_copy.default", "index_fill.int_Scalar",
    "index_put.default", "index_select.default", "masked_scatter.default", "masked_select.default",
    "nonzero.default", "one_hot.default", "scatter.src", "scatter.value", "scatter_add.default", "scatter_reduce.two",
    "searchsorted.Tensor", "select_scatter.default", "slice_scatter.default", "take_along_dim.default",
    "where.default",
)
CREATION_AND_CASTS = (
    "_assert_tensor_metadata.default", "_to_copy.default", "arange.default", "arange.start", "arange.start_step", "empty.memory_format",
    "empty_like.default", "fill.Scalar", "fill.Tensor", "full.default", "full_like.default", "new_empty.default",
    "new_full.default", "new_ones.default", "new_zeros.default", "ones.default", "ones_like.default",
    "scalar_tensor.default", "to.device", "to.dtype", "to.dtype_layout", "type_as.default", "zeros.default",
    "zeros_like.default",
)
NN = (
    "_native_batch_norm_legit_no_training.default", "adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default",
    "avg_pool1d.default", "avg_pool2d.default", "batch_norm.default", "conv1d.default", "conv2d.default",
    "convolution.default", "dropout.default", "embedding.default", "group_norm.default", "layer_norm.default",
    "linear.default", "max_pool1d.default", "max_pool2d.default", "max_pool2d_with_indices.default",
    "native_group_norm.default", "native_layer_norm.default", "rms_norm.default",
    "scaled_dot_product_attention.default", "upsample_bilinear2d.vec", "upsample_nearest2d.vec",
)
LINEAR_ALGEBRA = (
    "addmm.default", "baddbmm.default", "bmm.default", "einsum.default", "matmul.default", "mm.default",
    "mv.default", "outer.default",
)
# In-place updates and functional twins of program state (counters, KV caches); validation lets an
# in-place write reach a constant only when the program lists it in `state_names`.
STATE_UPDATES = (
    "add_.Scalar", "add_.Tensor", "copy.default", "copy_.default", "div_.Tensor", "fill_.Scalar",
    "index_add_.default", "index_copy_.default", "index_put_.default", "masked_fill_.Scalar", "mul_.Tensor", "scatter_.src", "slice_scatter.default",
    "sub_.Tensor", "zero_.default",
)
# A program reads a tensor's value only where a model does (`int(t)`, data-dependent branches).
DATA_READS = ("_assert_scalar.default", "_local_scalar_dense.default", "item.default")

ATEN_OPS: frozenset[str] = frozenset(f"aten::{op}" for group in (
    ELEMENTWISE, REDUCTIONS, VIEWS_AND_SHAPES, INDEXING, CREATION_AND_CASTS, NN, LINEAR_ALGEBRA, STATE_UPDATES,
    DATA_READS) for op in group)
