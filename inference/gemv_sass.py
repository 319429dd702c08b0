"""Instructions per code in a Triton GEMV's inner loop, from SASS compiled here: no GPU needed.

    python inference/gemv_sass.py --bits 4,2,3,8 --configs 64/128/16/4,128/128/16/4
    python inference/gemv_sass.py --bits 4 --configs 128/128/16/4 --dump /tmp/gemv4.sass
    python inference/gemv_sass.py --kernel pairs --bits 4,2,8 --configs 4/4/1/2,8/4/1/4
    python inference/gemv_sass.py --kernel mma --bits 4,3 --configs 4/1/4,2/1/8

Triton compiles `gemv_units` (or, with --kernel pairs, the Gluon `gemv_pairs`)
for sm_90 (H100/H200) with the launch's specializations (pointers and sizes
divisible by 16, as an 8192x8192 layer has), its bundled cuobjdump
disassembles the result, and the loop (the backward branch) is counted per
thread and code, beside the registers per thread.  Keeping up with HBM at 4 bits takes at most ~3.7
instructions per code with every issue slot busy (an H200 SM must consume ~35
codes per clock and issues 128 thread instructions); Nsight Compute measured
57 % of issue slots busy on the H200 (2026-12-02,
`results/ncu_gemv_int4_8192_h200.txt`, 5.2 per code then).  Configurations
are BLOCK_N/BLOCK_K/SPLIT_K/num_warps as in `triton_backend.GEMV_CONFIGS`,
BLOCK_N/VEC/SPLIT_K/num_warps as in `triton_backend.PAIR_CONFIGS`, or
VEC/SPLIT_K/num_warps[/X_LOAD[/PDL[/DEQUANTIZE]]] as in `triton_backend.MMA_CONFIGS`;
without --configs, the kernel's first three there.  The pairs
loop also holds the float16-to-float32 step it takes every 8 // (16 / bits)
steps, so its count is an upper bound.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.errors import CompilationError
from triton.experimental.gluon._runtime import GluonASTSource

from bitalloc import atomic
from bitalloc.help_format import script_parser
from bitalloc.kernels import triton_backend as tb
from bitalloc.kernels import triton_kernels as tk
from bitalloc.kernels import triton_mma as tm
from bitalloc.kernels import triton_pairs as tp

SIGNATURES = {  # kernel -> (pointer and size arguments, constexpr names)
    "units": ({"xt_ptr": "*fp32", "xb_ptr": "*fp32", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
               "out_ptr": "*fp32", "N": "i32", "U": "i32", "KW": "i32", "NG": "i32", "stride_om": "i32"},
              ("BITS", "GROUP", "HAS_ZEROS", "PER_SHIFT", "BLOCK_N", "BLOCK_U", "SPLIT_K", "EVEN")),
    "pairs": ({"xp_ptr": "*i32", "xs_ptr": "*fp32", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
               "out_ptr": "*fp32", "N": "i32", "U": "i32", "NG": "i32", "stride_om": "i32"},
              ("BITS", "GROUP", "HAS_ZEROS", "BLOCK_N", "VEC", "SPLIT_K")),
    "mma": ({"xp_ptr": "*i32", "xs_ptr": "*fp32", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
             "out_ptr": "*fp32", "N": "i32", "U": "i32", "NG": "i32", "stride_om": "i32", "stride_xm": "i32",
             "KX": "i32"},
            ("BITS", "GROUP", "HAS_ZEROS", "VEC", "SPLIT_K", "EVEN", "X_LOAD", "PDL", "DEQUANTIZE", "GATED")),
}
KERNELS = {"units": (tk.gemv_units, ASTSource), "pairs": (tp.gemv_pairs, GluonASTSource),
           "mma": (tm.gemv_mma, GluonASTSource)}
DEFAULT_COUNT = 3  # configurations compiled per bit width when --configs is not given
ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_of(bits: int, config: tuple[int, ...], group: int = 128, kernel: str = "units") -> str:
    if kernel == "mma":  # VEC/SPLIT_K/num_warps[/X_LOAD[/PDL[/DEQUANTIZE]]], else X_LOAD 1, no PDL, unpacked
        config = (tm.ROWS, *config, *(1, 0, 0)[len(config) - 3:])
    block_n, block_k, split, warps = config[:4]
    codes = 32 * (1 if 32 % bits == 0 else bits) // bits
    arguments, names = SIGNATURES[kernel]
    values = dict(BITS=bits, GROUP=group, HAS_ZEROS=True, PER_SHIFT=max(1, 8 // bits), BLOCK_N=block_n,
                  BLOCK_U=max(1, block_k // codes), VEC=block_k, SPLIT_K=split, EVEN=True,
                  X_LOAD=config[4] if kernel == "mma" else 1, PDL=kernel == "mma" and bool(config[5]),
                  DEQUANTIZE=kernel == "mma" and bool(config[6]), GATED=False)
    values = {name: values[name] for name in names}
    signature = {**arguments, **{name: "constexpr" for name in names}}
    divisible = {(i,): [["tt.divisibility", 16]] for i in range(len(arguments))}
    fn, source = KERNELS[kernel]
    compiled = triton.compile(source(fn=fn, signature=signature, constexprs=values, attrs=divisible),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(compiled.asm["cubin"])
    try:
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return subprocess.run([tool, "-res-usage", "-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(handle.name)


def registers(sass: str) -> int:
    """Registers per thread (cuobjdump's resource usage): with the block size, what bounds occupancy."""
    return int(re.search(r"REG:(\d+)", sass).group(1))


def codes_per_thread(kernel: str, bits: int, config: tuple[int, ...]) -> float:
    """Codes one thread handles per loop step: gemv_units spreads a BLOCK_N x BLOCK_K tile over the
    program's threads; gemv_pairs gives each thread VEC words of each of its BLOCK_N rows."""
    if kernel == "units":
        return config[0] * config[1] / (32 * config[3])
    unit = 32 if bits == 3 else 32 // bits
    if kernel == "mma":  # rows g and g + 8, VEC units each
        return 2 * config[0] * unit
    return config[0] * config[1] * unit


def default_configs(kernel: str) -> list[str]:
    """The first launch configurations the backend's tuner tries for `kernel`, written as --configs takes them."""
    offered = {"units": tb.GEMV_CONFIGS, "pairs": tb.PAIR_CONFIGS, "mma": tb.MMA_CONFIGS}[kernel]
    return ["/".join(map(str, config)) for config in offered[:DEFAULT_COUNT]]


def loop_body(sass: str) -> list[str]:
    """The instructions between a backward branch's target and the branch (the K loop)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(ADDRESS.search, sass.splitlines()) if m]
    for address, text in code:
        jump = re.search(r"BRA (?:`\(\.L_x_\d+\) |0x)([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < address:
            start = int(jump.group(1), 16)
            return [t for a, t in code if start <= a <= address]
    raise SystemExit("no loop found in the SASS")


def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--bits", default="4,2,3,8", help="code widths to compile, comma separated")
    parser.add_argument("--configs", default=None,
                        help="launch configurations (see above), comma separated (default: the backend's first "
                             f"{DEFAULT_COUNT} for the kernel)")
    parser.add_argument("--kernel", choices=sorted(SIGNATURES), default="units",
                        help="gemv_units (float32 arithmetic), gemv_pairs (float16 pairs) or gemv_mma (tensor cores)")
    parser.add_argument("--dump", default=None, help="also write the last SASS compiled here")
    args = parser.parse_args(argv)
    configs = args.configs.split(",") if args.configs else default_configs(args.kernel)
    last = None  # the SASS --dump writes
    for bits in (int(b) for b in args.bits.split(",")):
        for text in configs:
            config = tuple(int(v) for v in text.split("/"))
            try:
                sass = sass_of(bits, config, kernel=args.kernel)
            except CompilationError as err:  # e.g. a chunk wider than the group: the backend never offers it
                print(f"{args.kernel} int{bits} {text}: does not compile ({str(err).strip().splitlines()[-1]})")
                continue
            body = loop_body(sass)
            per_thread = codes_per_thread(args.kernel, bits, config)
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            top = ", ".join(f"{name} {count}" for name, count in ops.most_common(6))
            print(f"{args.kernel} int{bits} {text}: {registers(sass)} registers, {len(body)} instructions per loop "
                  f"step, {per_thread:.0f} codes per thread, {len(body) / per_thread:.2f} per code ({top})",
                  flush=True)
            last = sass
    if args.dump and last is not None:
        atomic.write_text(args.dump, last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
