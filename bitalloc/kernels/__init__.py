"""Packed quantized linears and their compute backends (quant/ decides values, kernels/ computes)."""
