"""CPU kernels generated through MLIR (torch-mlir's bindings, LLVM ExecutionEngine JIT)."""
