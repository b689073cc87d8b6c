"""ONNX export of compiled (sparse) models and ONNX import into sparsecc's FX form."""
