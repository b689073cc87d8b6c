"""ONNX import: an ONNX file as a torch module whose forward runs the graph with ATen ops, which
`sparsecc.compile("model.onnx")` captures and rewrites; the entry point is `import_model.import_for_compile`."""
