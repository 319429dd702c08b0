"""Profiling sharded by blocks: each rank's range, and 2 gloo ranks under torchrun against one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitalloc.distributed import block_range
from bitalloc.errors import BitallocError
from bitalloc.models import from_module
from bitalloc.profile import main as profile_main, profile
from bitalloc.quant import parse
from conftest import free_port, run_cli, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SPACE = "rtn:int2:g32:asym,rtn:int4:g32:asym"


def test_block_ranges_are_contiguous_balanced_and_cover_every_block():
    for blocks, world in ((12, 2), (7, 3), (5, 5), (40, 8)):
        ranges = [block_range(blocks, rank, world) for rank in range(world)]
        assert [i for r in ranges for i in r] == list(range(blocks))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    with pytest.raises(BitallocError, match="3 ranks but the model has 2 blocks"):
        block_range(2, 0, 3)


def test_ranges_of_blocks_give_the_rows_of_a_whole_run(tmp_path):
    loaded = from_module(tiny_llama(layers=3, seed=5))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    options = [parse(o) for o in SPACE.split(",")]
    settings = dict(batch_size=2, progress=False, metrics=["rel", "kl", "fisher"])
    whole = profile(loaded, ids, options, **settings)
    parts = [profile(loaded, ids, options, cache_dir=tmp_path, blocks=r, **settings) for r in (range(2), range(2, 3))]
    assert all(part.meta == whole.meta for part in parts)
    assert [row for part in parts for row in part.rows] == whole.rows  # the earlier blocks are recomputed exactly
    assert sorted(p.name for p in next(tmp_path.iterdir()).iterdir()) == ["block_0000.json", "block_0001.json",
                                                                          "block_0002.json"]
    with pytest.raises(BitallocError, match="blocks must be a non-empty contiguous range"):
        profile(loaded, ids, options, blocks=range(2, 4), **settings)


def test_two_gloo_ranks_merge_into_the_single_process_table(tiny_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    args = ["--model", str(tiny_dir), "--space", SPACE, "--metrics", "rel,fisher", "--nsamples", "4",
            "--calib-seqlen", "32", "--batch-size", "2", "--device", "cpu", "--quiet"]
    env = {**os.environ, "BITALLOC_DATA": str(corpus_dir), "BITALLOC_CACHE": str(tmp_path / "shared-cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "bitalloc.profile"]
    done = subprocess.run(launcher + args + ["--out", str(tmp_path / "sharded")], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("rows (") == 1  # only rank 0 reports and writes

    monkeypatch.setenv("BITALLOC_DATA", str(corpus_dir))
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "own-cache"))  # measured again, not read from the ranks
    code, _, err = run_cli(profile_main, args + ["--out", str(tmp_path / "single")], capsys)
    assert code == 0, err

    sharded, single = (json.loads((tmp_path / d / "sensitivity.json").read_text()) for d in ("sharded", "single"))
    assert sharded["meta"] == single["meta"]
    assert [(r["layer"], r["option"]) for r in sharded["rows"]] == [(r["layer"], r["option"]) for r in single["rows"]]
    for mine, theirs in zip(sharded["rows"], single["rows"]):
        assert mine.keys() == theirs.keys() and mine["bytes"] == theirs["bytes"]
        for metric in ("error", "rel", "fisher"):
            assert mine[metric] == pytest.approx(theirs[metric], rel=1e-5, abs=1e-9), (mine["layer"], metric)
    shared = next((tmp_path / "shared-cache" / "profile").iterdir())
    assert sorted(p.name for p in shared.iterdir()) == ["block_0000.json", "block_0001.json"]  # no frontier left
    assert {p.suffix for p in (tmp_path / "sharded").iterdir()} == {p.suffix for p in (tmp_path / "single").iterdir()}
