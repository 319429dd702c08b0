"""Which int8/FP8 product is fast on this GPU: torch._int_mm layouts against fp16 and FP8 _scaled_mm.

    python inference/int8_layouts.py --out results/int8_layouts_h100.txt

For each shape and batch: fp16 x @ W^T (cuBLAS); `_int_mm` with B = the
row-major [N, K] int8 codes transposed (column-major B, the layout the int8
backend uses) and with B materialised row-major [K, N]; FP8 E4M3 `_scaled_mm`
with row/column scales; and the int8 backend's whole layer with its parts
(per-token quantization, the integer product, the rescaling epilogue).
Timings are medians with a cold L2 cache.
"""
import sys

import torch

from bitalloc import atomic
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.kernels import int8 as int8_backend
from bitalloc.kernels.timing import time_cuda

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672), (4096, 4096)]
BATCHES = (256, 512, 1024)


@cli_entry
def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--out", default="results/int8_layouts.txt", help="where the table is written")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("int8_layouts.py needs a CUDA GPU")
    dev = "cuda"
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; microseconds (speed-up vs fp16)",
             f"{'N x K':>12} {'M':>5} {'fp16':>8} {'int_mm B^T':>15} {'int_mm B row':>15} {'fp8 scaled':>15} "
             f"{'int8 layer':>15} {'quant':>7} {'product':>8} {'rescale':>8}"]
    for n, k in SHAPES:
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02
        q8 = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
        q8_rows = q8.t().contiguous()  # [K, N] row-major
        w8 = (w16 * 1000).to(torch.float8_e4m3fn)
        weight = {"q": q8, "scales": torch.rand(n, device=dev), "correction": None}
        for m in BATCHES:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            xq = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
            x8 = x.to(torch.float8_e4m3fn)
            sx, sw = torch.rand(m, 1, device=dev), torch.rand(1, n, device=dev)
            t = {
                "fp16": time_cuda(lambda: x @ w16.T),
                "colB": time_cuda(lambda: torch._int_mm(xq, q8.t())),
                "rowB": time_cuda(lambda: torch._int_mm(xq, q8_rows)),
                "fp8": time_cuda(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw,
                                                          out_dtype=torch.float16)),
            }
            q, scale, rowsum = int8_backend.quantize_tokens(x, 8)
            acc = int8_backend.int_product(q, weight)
            t["quant"] = time_cuda(lambda: int8_backend.quantize_tokens(x, 8))
            t["product"] = time_cuda(lambda: int8_backend.int_product(q, weight))
            t["rescale"] = time_cuda(lambda: int8_backend.rescale(acc, scale, rowsum, weight, None, x.dtype))
            t["layer"] = time_cuda(lambda: int8_backend.rescale(int8_backend.int_product(
                int8_backend.quantize_tokens(x, 8)[0], weight), scale, rowsum, weight, None, x.dtype))
            cell = lambda name: f"{t[name] * 1e6:7.1f} ({t['fp16'] / t[name]:4.2f}x)"  # noqa: E731
            lines.append(f"{n:>5} x {k:<5} {m:>5} {t['fp16'] * 1e6:8.1f} {cell('colB'):>15} {cell('rowB'):>15} "
                         f"{cell('fp8'):>15} {cell('layer'):>15} {t['quant'] * 1e6:7.1f} {t['product'] * 1e6:8.1f} "
                         f"{t['rescale'] * 1e6:8.1f}")
            print(lines[-1], flush=True)
    atomic.write_text(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
