"""ONNX export of compiled models: each sparse op as one `sparsecc` node with a local function
(standard ops only) or an onnxruntime contrib op; the entry point is `exporter.export_compiled`."""
