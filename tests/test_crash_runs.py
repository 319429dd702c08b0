"""Search and apply killed with SIGKILL at random points on a tiny model: every output present is complete,
a rerun finishes, and it writes the same plan.json byte for byte as a run that was never interrupted.

The failure points are drawn from a seeded generator: a SIGKILL after a random delay (anywhere in
the run), a SIGKILL inside a random atomic write after its temporary file was half written (the
worst moment for a file), or an exception injected at that moment.
BITALLOC_CRASH_SEED picks other points (`for s in 1 2 3; do BITALLOC_CRASH_SEED=$s pytest ...; done`).
"""
import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bitalloc import apply, atomic, pipeline, safe_json
from bitalloc.plan import Plan
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
SPACE = "rtn:int2:g32:asym,rtn:int4:g32:asym,rtn:int8:g32:asym"
QUICK = ["--nsamples", "2", "--calib-seqlen", "16", "--seqlen", "16", "--eval-windows", "4", "--quiet"]
RNG = random.Random(int(os.environ.get("BITALLOC_CRASH_SEED", "20261125")))
SEARCH_KILL_AFTER = round(RNG.uniform(0.1, 1.0), 2)  # seconds into a ~1 s run
SEARCH_FAIL_AT = RNG.randint(1, 13)  # a search makes 13 atomic writes
APPLY_KILL_AT = RNG.randint(1, 3)  # reference log-probs, their result, --json


def failing_writes(at: int, fail):
    """An atomic_path that, inside the at-th atomic write, cuts the temporary file in half and calls fail()."""
    real, count = atomic.atomic_path, [0]

    @contextlib.contextmanager
    def wrapper(path):
        with real(path) as tmp:
            yield tmp
            count[0] += 1
            if count[0] == at:
                os.truncate(tmp, tmp.stat().st_size // 2)
                fail()

    return wrapper


DRIVER = f"""
import importlib, os, signal, sys, threading
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bitalloc import atomic
from test_crash_runs import failing_writes
mode, at, module, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
main = importlib.import_module(module).main
kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
if mode == "write":
    atomic.atomic_path = failing_writes(int(at), kill)
else:
    threading.Timer(at, kill).start()
sys.exit(main(argv))
"""


def search_argv(tiny_dir, out):
    return ["--model", str(tiny_dir), "--space", SPACE, "--budget", "rtn:int3:g32:asym", "--out", str(out), *QUICK]


def apply_argv(plan, out):
    return ["--plan", str(plan), "--quiet", "--json", str(out)]


def temporary(path: Path) -> bool:
    return any(atomic._TEMP.match(part) for part in path.parts)


def event_records_complete(data: bytes) -> bool:
    """TFRecord framing: 8-byte length, 4-byte crc, payload, 4-byte crc, repeated to the very end."""
    at = 0
    while at < len(data):
        if at + 12 > len(data):
            return False
        (length,) = struct.unpack("<Q", data[at:at + 8])
        at += 12 + length + 4
    return at == len(data)


def assert_outputs_complete(root: Path):
    """Every file under its final name is whole; a killed process's temporaries may lie beside them."""
    for path in (p for p in root.rglob("*") if p.is_file() and not temporary(p)):
        if path.suffix == ".json":
            data = safe_json.load_json(path)
            if path.name == "plan.json":
                Plan.from_json(data)
        elif path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".png":
            assert path.read_bytes().endswith(b"IEND\xaeB`\x82"), path
        elif "tfevents" in path.name:
            assert event_records_complete(path.read_bytes()), path
        else:
            assert path.read_text().endswith("\n"), path


def all_under(*roots):
    return [p for root in roots for p in Path(root).rglob("*")]


@pytest.fixture(scope="module")
def env(tmp_path_factory, corpus_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITALLOC_DATA", str(corpus_dir))
        yield tmp_path_factory.mktemp("crash"), patch


def run_in(cache: Path, main, argv, capsys, patch):
    patch.setenv("BITALLOC_CACHE", str(cache))
    return run_cli(main, argv, capsys)


@pytest.fixture(scope="module")
def clean_search(env, tiny_dir):
    root, patch = env
    patch.setenv("BITALLOC_CACHE", str(root / "clean-cache"))
    assert pipeline.main(search_argv(tiny_dir, root / "clean")) == 0
    return root / "clean"


@pytest.fixture(scope="module")
def killed(env, tiny_dir, clean_search):
    """Start the killed runs at once (they are independent), each with its own cache and outputs."""
    root, _ = env
    runs = {}
    for name, module, mode, at, argv in (
        ("search", "bitalloc.pipeline", "time", SEARCH_KILL_AFTER, lambda d: search_argv(tiny_dir, d / "out")),
        ("apply", "bitalloc.apply", "write", APPLY_KILL_AT,
         lambda d: apply_argv(clean_search / "plan.json", d / "applied.json")),
    ):
        work = root / f"killed-{name}"
        work.mkdir()
        process_env = {**os.environ, "PYTHONPATH": str(REPO), "BITALLOC_CACHE": str(work / "cache")}
        runs[name] = (work, subprocess.Popen([sys.executable, "-c", DRIVER, mode, str(at), module, *argv(work)],
                                             cwd=work, env=process_env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True))
    for _, process in runs.values():
        process.communicate(timeout=300)
    return runs


def test_same_inputs_and_seed_give_a_byte_identical_plan(env, tiny_dir, clean_search, capsys):
    root, patch = env
    code, _, err = run_in(root / "second-cache", pipeline.main, search_argv(tiny_dir, root / "second"), capsys, patch)
    assert code == 0, err
    for name in ("plan.json", "sensitivity.json", "sensitivity.csv"):
        assert (root / "second" / name).read_bytes() == (clean_search / name).read_bytes(), name


def assert_resumes_to_the_clean_plan(work, tiny_dir, clean_search, capsys, patch):
    code, _, err = run_in(work / "cache", pipeline.main, search_argv(tiny_dir, work / "out"), capsys, patch)
    assert code == 0, err
    assert not [p for p in all_under(work) if temporary(p)], "the rerun sweeps the killed run's temporaries"
    assert (work / "out" / "plan.json").read_bytes() == (clean_search / "plan.json").read_bytes()


def test_search_killed_at_a_random_time_resumes_to_the_same_plan(env, tiny_dir, killed, clean_search, capsys):
    work, process = killed["search"]
    assert process.returncode in (-signal.SIGKILL, 0), process.stderr.read()
    assert_outputs_complete(work)
    assert_resumes_to_the_clean_plan(work, tiny_dir, clean_search, capsys, env[1])


def test_search_failing_in_a_random_write_resumes_to_the_same_plan(env, tiny_dir, clean_search, capsys, monkeypatch):
    work = env[0] / "failed-search"

    def injected():
        raise OSError("injected: disk full")

    monkeypatch.setattr(atomic, "atomic_path", failing_writes(SEARCH_FAIL_AT, injected))
    with pytest.raises(OSError, match="injected"):
        run_in(work / "cache", pipeline.main, search_argv(tiny_dir, work / "out"), capsys, env[1])
    monkeypatch.undo()
    assert_outputs_complete(work)
    assert not [p for p in all_under(work) if temporary(p)], "an exception leaves no temporary behind"
    assert_resumes_to_the_clean_plan(work, tiny_dir, clean_search, capsys, env[1])


def test_apply_killed_in_a_random_write_reruns_to_the_same_result(env, killed, clean_search, capsys):
    root, patch = env
    work, process = killed["apply"]
    assert process.returncode == -signal.SIGKILL, process.stderr.read()
    assert_outputs_complete(work)
    argv = apply_argv(clean_search / "plan.json", work / "applied.json")
    code, _, err = run_in(work / "cache", apply.main, argv, capsys, patch)
    assert code == 0, err
    assert not [p for p in all_under(work) if temporary(p)]
    applied = json.loads((work / "applied.json").read_text())
    measured = json.loads((clean_search / "plan.json").read_text())["measured"]
    assert applied["quantized"]["ppl"] == pytest.approx(measured["ppl"], rel=1e-6)


def test_interrupt_keeps_finished_outputs_and_discards_partial_ones(env, tiny_dir, capsys, monkeypatch):
    """Ctrl-C during the second plan.json write: one line, exit 130, the first plan.json intact."""
    root, patch = env
    real, count = atomic.write_json, [0]

    def interrupted(path, obj):
        if Path(path).name == "plan.json":
            count[0] += 1
            if count[0] == 2:
                raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(atomic, "write_json", interrupted)
    out = root / "interrupted"
    code, _, err = run_in(root / "clean-cache", pipeline.main, search_argv(tiny_dir, out), capsys, patch)
    assert code == 130 and err.strip().splitlines()[-1].startswith("error: interrupted")
    assert "measured" not in Plan.load(out / "plan.json").to_json()  # the first, complete version
    assert not [p for p in all_under(out) if temporary(p)]
