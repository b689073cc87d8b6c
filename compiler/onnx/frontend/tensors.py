"""ONNX data types and arrays as torch dtypes and tensors (bfloat16 and float8 included)."""
from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper

# numpy has no bfloat16 / float8: onnx returns ml_dtypes arrays, viewed as torch dtypes through their bits
_BIT_VIEWS = {"bfloat16": (np.uint16, torch.bfloat16), "float8_e4m3fn": (np.uint8, torch.float8_e4m3fn),
              "float8_e5m2": (np.uint8, torch.float8_e5m2), "float8_e4m3fnuz": (np.uint8, torch.float8_e4m3fnuz),
              "float8_e5m2fnuz": (np.uint8, torch.float8_e5m2fnuz)}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an onnx.TensorProto data type; ValueError when torch has none."""
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))
    if np_dtype.name in _BIT_VIEWS:
        return _BIT_VIEWS[np_dtype.name][1]
    try:
        return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
    except TypeError:
        raise ValueError(f"data type {TensorProto.DataType.Name(onnx_type)} has no torch equivalent") from None


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A numpy (or ml_dtypes) array as a torch tensor that owns its memory."""
    array = np.asarray(array)
    if array.dtype.name in _BIT_VIEWS:
        bits, dtype = _BIT_VIEWS[array.dtype.name]
        return torch.from_numpy(np.array(array.view(bits), copy=True)).view(dtype)
    return torch.from_numpy(np.array(array, copy=True))
