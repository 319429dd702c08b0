"""Profiling sharded by blocks across torch.distributed ranks.

    torchrun --nproc-per-node 2 -m bitalloc.profile --space rtn-g64 --out runs/profile

The launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
switches the profiler to sharded mode; the process group uses NCCL when the
ranks profile on CUDA (each rank on GPU LOCAL_RANK) and gloo on CPU.

Design:

* Rank r owns one contiguous range of blocks; ranges differ in size by at most
  one block (balanced by block count, the earlier ranks take the extra ones).
* Every rank loads the model and calibration windows itself, captures block
  0's inputs and runs the *unquantized* forward through the blocks before its
  range: one pass per block, cheap next to measuring every candidate of a
  block.  Nothing but the final rows crosses ranks.
* Gradient metrics (fisher, wfisher...) need the gradient at each block's
  output, which comes from the blocks after it: a rank runs the forward sweep
  to the end, samples labels with the shared seed and back-propagates down to
  its first block, measuring candidates only in its own range.  `kl` carries a
  candidate's output through the later blocks (as in a single run).  So every
  metric is supported; the ranks owning early blocks do the most of this
  extra, candidate-free work.
* Ranks write the same per-block cache files as a single run (atomic, one
  file per block) and keep their resume frontiers apart, so they may share a
  cache directory.  A killed run started again reuses every finished block
  whatever the number of ranks; a rank's half-way frontiers only with the same.
* Rank 0 gathers every rank's rows (in rank order, hence block order), checks
  that all ranks profiled the same model and calibration, and returns the same
  table a single process would; the CLI writes outputs on rank 0 only.  A rank
  that fails sends its error line, so rank 0 reports it instead of waiting.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import BitallocError, one_line
from .models import LoadedModel, find_blocks
from .profile import profile
from .table import SensitivityTable


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int
    local_rank: int


def shard_from_env() -> Shard | None:
    """This process's place among the launcher's ranks; None outside torchrun (or with one rank)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise BitallocError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise BitallocError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Shard(rank, world, local)


def block_range(blocks: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `blocks` blocks."""
    if world > blocks:
        raise BitallocError(f"{world} ranks but the model has {blocks} blocks: use at most {blocks} ranks")
    size, extra = divmod(blocks, world)
    start = rank * size + min(rank, extra)
    return range(start, start + size + (rank < extra))


def rank_device(shard: Shard, device: torch.device) -> torch.device:
    """CUDA without an index means this rank's own GPU (LOCAL_RANK)."""
    if device.type == "cuda":
        device = device if device.index is not None else torch.device("cuda", shard.local_rank)
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def process_group(shard: Shard, device: torch.device):
    """The default process group of the launcher's rendezvous (MASTER_ADDR/PORT), torn down afterwards."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=shard.rank, world_size=shard.world,
                                device_id=device if device.type == "cuda" else None)
    except (ValueError, RuntimeError) as err:
        raise BitallocError(f"cannot join the {backend} process group as rank {shard.rank}: {one_line(err)}") from None
    try:
        yield
    finally:
        dist.destroy_process_group()


def profile_sharded(loaded: LoadedModel, calib_ids: torch.Tensor, options, shard: Shard,
                    **settings) -> SensitivityTable | None:
    """`profile` of this rank's blocks; on rank 0 the whole table (as one process makes it), elsewhere None.

    Call inside `process_group`; `settings` are `profile`'s keyword arguments.
    """
    _, blocks = find_blocks(loaded.model)
    mine = block_range(len(blocks), shard.rank, shard.world)
    try:
        table = profile(loaded, calib_ids, options, blocks=mine, **settings)
        payload = {"meta": table.meta, "rows": table.rows}
    except Exception as err:  # sent to rank 0 so it reports instead of waiting; raised here too
        payload, failure = {"error": one_line(err)}, err
    else:
        failure = None
    gathered = [None] * shard.world if shard.rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if failure is not None:
        raise failure
    if shard.rank != 0:
        return None
    for rank, part in enumerate(gathered):
        if "error" in part:
            raise BitallocError(f"rank {rank} failed: {part['error']}")
        if part["meta"] != table.meta:
            raise BitallocError(f"rank {rank} profiled another model, calibration or setting than rank 0 "
                                f"(fingerprint {part['meta']['fingerprint']}, calibration {part['meta']['calibration']})")
    return SensitivityTable(table.meta, [row for part in gathered for row in part["rows"]])
