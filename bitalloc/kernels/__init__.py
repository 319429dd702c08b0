"""Packed quantized linears and their compute backends (quant/ decides values, kernels/ computes).

Importing this package registers every backend: reference (backends.py), cpu, int8,
mixed-outlier, approx and triton (its kernels compile only where triton and CUDA are).
"""
import os

# Our Triton kernels are checked against `reference` with FP fusion (fma) on, Triton's default so far; Triton 3.9
# warns that 3.10 turns it off.  Keep what was tested, and keep the warning out of every run.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from . import approx, backends, cpu, int8, outlier, triton_backend  # noqa: F401  (register backends)
