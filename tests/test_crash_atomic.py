"""Atomic writes under failure: an exception, or a process killed outright, leaves the old file or the new one."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bitalloc import atomic

REPO = Path(__file__).resolve().parents[1]


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_failure_while_writing_keeps_the_old_file(tmp_path):
    target = tmp_path / "plan.json"
    atomic.write_json(target, {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"new": ')
            raise RuntimeError("killed half way")
    assert target.read_text() == atomic.to_json({"old": 1})
    assert names(tmp_path) == {"plan.json"}


def test_leftovers_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    dead, host = dead_pid(), atomic._HOST
    stale = tmp_path / f".plan.json.~{host}~{dead}~abcd1234.tmp"
    stale_dir = tmp_path / f".model.~{host}~{dead}~abcd1234.tmp"
    live = tmp_path / f".plan.json.~{host}~{os.getppid()}~abcd1234.tmp"  # our parent is alive
    foreign = tmp_path / f".plan.json.~otherhost~{dead}~abcd1234.tmp"  # maybe alive on another machine
    for path in (stale, live, foreign):
        path.write_text("partial")
    stale_dir.mkdir()
    (stale_dir / "weights.safetensors").write_text("partial")
    atomic.write_text(tmp_path / "summary.txt", "done\n")
    assert names(tmp_path) == {"summary.txt", live.name, foreign.name}


def test_directory_swap_replaces_the_whole_directory(tmp_path):
    target = tmp_path / "model"
    for version in ("old", "new"):
        with atomic.atomic_dir(target) as tmp:
            (tmp / f"{version}.safetensors").write_text(version)
    assert names(target) == {"new.safetensors"}
    assert names(tmp_path) == {"model"}
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(target) as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError
    assert names(target) == {"new.safetensors"} and names(tmp_path) == {"model"}


def test_a_death_between_the_fallback_renames_is_repaired(tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames; a process dying between them leaves the old copy aside."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "model"
    with atomic.atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
    assert names(target) == {"new"}
    aside = tmp_path / f".model.~{atomic._HOST}~{dead_pid()}~old.tmp"
    os.replace(target, aside)  # the state a kill between the two renames leaves
    atomic.write_text(tmp_path / "other.txt", "x")
    assert names(tmp_path) == {"model", "other.txt"} and names(target) == {"new"}


KILL_WHILE_WRITING = """
import os, signal, sys
from bitalloc import atomic
atomic.write_text(sys.argv[1], "old\\n")
with atomic.atomic_path(sys.argv[1]) as tmp:
    tmp.write_text("new but unfinish")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_mid_write_leaves_the_old_file_and_the_next_write_sweeps(tmp_path):
    target = tmp_path / "results.json"
    process = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, str(target)],
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert process.returncode == -signal.SIGKILL
    assert target.read_text() == "old\n"
    leftovers = names(tmp_path) - {"results.json"}
    assert len(leftovers) == 1 and atomic._TEMP.match(leftovers.pop())
    atomic.write_text(target, "new\n")
    assert names(tmp_path) == {"results.json"} and target.read_text() == "new\n"


def test_files_named_by_their_writer_appear_whole(tmp_path):
    with atomic.atomic_files(tmp_path) as tmp:
        (tmp / "events.out.tfevents.1.host").write_bytes(b"records")
    with pytest.raises(RuntimeError):
        with atomic.atomic_files(tmp_path) as tmp:
            (tmp / "events.out.tfevents.2.host").write_bytes(b"half")
            raise RuntimeError
    assert names(tmp_path) == {"events.out.tfevents.1.host"}


def test_outputs_get_the_umasks_modes_not_private_ones(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic._umask.cache_clear()
        atomic.write_text(tmp_path / "plan.json", "{}")
        with atomic.atomic_dir(tmp_path / "saved") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(mask)
        atomic._umask.cache_clear()
    assert (tmp_path / "plan.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "saved").stat().st_mode & 0o777 == 0o755


def test_processes_merging_rows_into_one_file_keep_each_others_rows(tmp_path):
    """Eight processes each add 20 rows, one merge at a time: the lock makes every row survive."""
    script = ("import sys; from pathlib import Path; from bitalloc.results import merge_rows\n"
              "for i in range(20):\n"
              "    merge_rows(Path(sys.argv[1]), ('run', 'i'), ('run', 'i'), [{'run': sys.argv[2], 'i': i}])\n")
    workers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "rows.tsv"), str(n)], cwd=REPO)
               for n in range(8)]
    assert all(w.wait() == 0 for w in workers)
    lines = (tmp_path / "rows.tsv").read_text().splitlines()
    assert len(lines) == 1 + 8 * 20


def test_an_output_in_the_way_of_a_folder_or_a_folder_in_the_way_of_a_file_is_one_line(tmp_path):
    from bitalloc.errors import BitallocError

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(BitallocError, match="afile is a file, not a folder"):
        atomic.write_json(tmp_path / "afile" / "x.json", {})
    with pytest.raises(BitallocError, match="adir: it is a directory"):
        atomic.write_json(tmp_path / "adir", {})
    assert (tmp_path / "afile").read_text() == "x" and not any((tmp_path / "adir").iterdir())
