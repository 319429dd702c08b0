"""The shared quantizers: pure functions used alike by the profiler, apply and tests."""
from . import awq, gptq, hqq, omniquant, rtn, smoothquant  # noqa: F401  (each module registers its method)
from .calib import LayerCalib
from .option import FP16, Option, parse
from .qweight import QuantizedWeight
from .registry import QUANTIZERS, check_option, get_quantizer, quantize, register_quantizer, versions

__all__ = [
    "FP16", "LayerCalib", "Option", "QUANTIZERS", "QuantizedWeight", "check_option",
    "get_quantizer", "parse", "quantize", "register_quantizer", "versions",
]
