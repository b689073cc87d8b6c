"""ONNX for sparsecc: `export/` writes compiled (sparse) models as ONNX, `frontend/` imports ONNX
files into sparsecc's FX form, `runner` runs an exported file in onnxruntime."""
