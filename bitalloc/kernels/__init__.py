"""Packed quantized linears and their compute backends (quant/ decides values, kernels/ computes).

Importing this package registers every backend: reference (backends.py), cpu, int8,
mixed-outlier, approx and triton (its kernels compile only where triton and CUDA are).
"""
from . import approx, backends, cpu, int8, outlier, triton_backend  # noqa: F401  (register backends)
