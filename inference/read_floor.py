"""How fast a kernel that only reads N bytes can be, in the harness that times the GEMVs.

    python inference/read_floor.py --mb 35.6,8.9,124.3
    python inference/read_floor.py --mb 33.6 --row-words 1024

A GEMV's time is at best the time to read its codes and scales once.  At the
sizes of one layer (tens of MB) that is not bytes / bandwidth: programs ramp up,
the first loads wait a full memory latency and the last programs finish alone.
This times a plain streaming read (16-byte loads, a few tiles per program, all
issued before any is used, one xor per word) over several launch shapes, replayed
from a CUDA graph over copies beyond the L2 cache like `inference/kernel_bench.py`, and
prints each shape's time and bandwidth: the floor a GEMV of that many bytes can
be compared with.  With --row-words it also reads the bytes as rows of that many
words the way the tensor-core GEMV does (16 rows per program, a tile of CHUNK words
of each row per step, a program walking its rows): whether that access pattern,
and not the GEMV's arithmetic, is what costs (an int4 8192x8192 layer's codes are
8192 rows of 1024 words, 33.6 MB).
"""
import math
import sys

import torch
import triton
import triton.language as tl

from bitalloc.benchmarks import MAX_COPIES, roofline_bandwidth
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser
from bitalloc.kernels.timing import time_cuda_graph

# (BLOCK words per tile, TILES per program, num_warps)
LAUNCHES = [(1024, 4, 4), (1024, 8, 4), (512, 8, 4), (2048, 8, 8), (4096, 4, 8), (1024, 16, 4)]
# row tiles: (ROWS per program, CHUNK words of each row per tile, TILES per program, num_warps)
ROW_LAUNCHES = [(16, 128, 8, 4), (16, 128, 8, 8), (16, 128, 4, 4), (16, 256, 4, 8), (16, 64, 16, 4), (32, 128, 8, 8)]


@triton.jit
def stream_read(src_ptr, out_ptr, words, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """xor of TILES tiles of BLOCK int32 words per program (one store per program, so no load is dead)."""
    base = tl.program_id(0).to(tl.int64) * BLOCK * TILES
    acc = tl.zeros([BLOCK], tl.int32)
    for tile in tl.static_range(TILES):
        offsets = base + tile * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(src_ptr + offsets, mask=offsets < words, other=0, cache_modifier=".cg")
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(acc, axis=0))


@triton.jit
def row_tiles_read(src_ptr, out_ptr, row_words, ROWS: tl.constexpr, CHUNK: tl.constexpr, TILES: tl.constexpr):
    """xor of TILES tiles of [ROWS, CHUNK] words of a row-major matrix per program: programs (i, j) take rows
    [ROWS i, ROWS (i + 1)) and tiles [TILES j, TILES (j + 1)) along them, all loads issued first."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    acc = tl.zeros([ROWS, CHUNK], tl.int32)
    for tile in tl.static_range(TILES):
        columns = (tl.program_id(1) * TILES + tile) * CHUNK + tl.arange(0, CHUNK)
        pointers = src_ptr + rows[:, None] * row_words + columns[None, :]
        acc ^= tl.load(pointers, mask=columns[None, :] < row_words, other=0, cache_modifier=".cg")
    tl.store(out_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.xor_sum(tl.xor_sum(acc, 1), 0))


def _copies(*shape: int) -> list[torch.Tensor]:
    """int32 tensors of `shape`, enough that reading them in turn comes from memory, not the L2 cache."""
    cache = torch.cuda.get_device_properties(0).L2_cache_size
    moved = 4 * math.prod(shape)
    return [torch.ones(*shape, device="cuda", dtype=torch.int32)
            for _ in range(min(MAX_COPIES, max(2, -(-4 * cache // moved))))]


def row_tiles_seconds(rows: int, row_words: int) -> dict[tuple, float]:
    """Seconds per read of a [rows, row_words] int32 matrix in row tiles, for each of ROW_LAUNCHES."""
    copies = _copies(rows, row_words)
    seconds = {}
    for rows_per, chunk, tiles, warps in ROW_LAUNCHES:
        grid = (triton.cdiv(rows, rows_per), triton.cdiv(row_words, chunk * tiles))
        out = torch.empty(grid[0] * grid[1], device="cuda", dtype=torch.int32)
        calls = [lambda src=src: row_tiles_read[grid](src, out, row_words, ROWS=rows_per, CHUNK=chunk, TILES=tiles,
                                                      num_warps=warps) for src in copies]
        seconds[(rows_per, chunk, tiles, warps)] = time_cuda_graph(calls)
    del copies
    return seconds


def read_floor_seconds(moved: int) -> dict[tuple, float]:
    """Seconds per read of `moved` bytes (rounded up to 256) for each of LAUNCHES.  The round size lets
    Triton see that the word count divides by 16, without which it cannot prove a tile's mask uniform and
    falls back to 4-byte loads (on the H200: 58 us for 124.3 MB that way, 29 us for the 124.7 MB of an int4
    28672x8192 layer, a multiple of 64 bytes)."""
    words = -(-moved // 256) * 64
    copies = _copies(words)
    seconds = {}
    for block, tiles, warps in LAUNCHES:
        programs = triton.cdiv(words, block * tiles)
        out = torch.empty(programs, device="cuda", dtype=torch.int32)
        calls = [lambda src=src: stream_read[(programs,)](src, out, words, BLOCK=block, TILES=tiles, num_warps=warps)
                 for src in copies]
        seconds[(block, tiles, warps)] = time_cuda_graph(calls)
    del copies
    return seconds


@cli_entry
def main(argv=None):
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--mb", default="35.6,8.9,124.3", help="sizes to read in MB (1e6 bytes), comma separated")
    parser.add_argument("--row-words", type=int, default=None,
                        help="also read each size as rows of this many int32 words, in row tiles")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise BitallocError("read_floor needs a CUDA GPU")
    bandwidth, note = roofline_bandwidth(torch.device("cuda"))
    print(note, flush=True)
    for size in (float(v) for v in args.mb.split(",")):
        moved = int(size * 1e6)
        timings = sorted((t, c) for c, t in read_floor_seconds(moved).items())
        cells = "  ".join(f"{'/'.join(map(str, c))}: {t * 1e6:.1f}" for t, c in timings)
        best = timings[0][0]
        print(f"{size:.1f} MB: {cells} | best {best * 1e6:.1f} us = {moved / best / 1e12:.2f} TB/s, "
              f"{100 * moved / best / bandwidth:.0f} % roofline", flush=True)
        if args.row_words:
            rows = -(-moved // (4 * args.row_words))
            timings = sorted((t, c) for c, t in row_tiles_seconds(rows, args.row_words).items())
            cells = "  ".join(f"{'/'.join(map(str, c))}: {t * 1e6:.1f}" for t, c in timings)
            print(f"  as {rows} rows of {args.row_words} words, ROWS/CHUNK/TILES/warps: {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
