"""N:M weight sparsity: the `prune-nm` pass (nm/prune.py), its rules for linear, conv2d and MoE expert
weights, and the mask methods (magnitude, Wanda, SparseGPT) that run layer by layer on calibration data."""
