"""Kill a profile half way, run it again, and check it resumed: no finished block measured again,
and the final table equal to an uninterrupted run's.

    python scripts/kill_resume_profile.py --data-dir ../shared/data

For each pass, `python -m bitalloc.profile` runs three times on fresh caches:
uninterrupted; killed when half the blocks are cached (the block pass, --metrics
rel, with SIGTERM; the linear pass, --metrics fisher, with SIGKILL); and again
to completion.  A block file whose modification time did not change was not
measured again.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bitalloc import atomic
from bitalloc.errors import BitallocError, cli_entry
from bitalloc.help_format import script_parser


def block_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("profile/*/block_*.json"))


def finished(cache: Path, metric: str) -> list[Path]:
    done = []
    for path in block_files(cache):
        try:
            rows = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            continue
        if rows and all(metric in r["values"] for r in rows):
            done.append(path)
    return done


def run(argv: list[str], cache: Path, out: Path, kill_when=None, sig=None) -> dict:
    command = [sys.executable, "-m", "bitalloc.profile", *argv, "--cache-dir", str(cache), "--out", str(out),
               "--quiet"]
    start = time.perf_counter()
    log_path = out.with_name(f"{out.name}.log")  # a file, not a pipe: nobody reads a pipe while polling
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        killed = False
        while process.poll() is None:
            if kill_when is not None and kill_when():
                process.send_signal(sig)
                killed = True
                break
            time.sleep(0.2)
        process.wait()
    output = log_path.read_text()
    return {"seconds": round(time.perf_counter() - start, 1), "returncode": process.returncode, "killed": killed,
            "log": [line for line in output.splitlines() if "resumes" in line or "error" in line]}


@cli_entry
def main(argv=None) -> int:
    parser = script_parser(__file__, __doc__)
    parser.add_argument("--data-dir", default=None, help="local data directory (default: $BITALLOC_DATA, else the hub)")
    parser.add_argument("--model", default="smollm2-135m", help="model spec (see bitalloc.models)")
    parser.add_argument("--space", default="rtn-g64", help="option space (a smaller one makes the demo quicker)")
    parser.add_argument("--nsamples", type=int, default=None,
                        help="calibration windows per profile (default: the profiler's; fewer is quicker)")
    parser.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default: the profiler's)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    common = ["--model", args.model, "--space", args.space]
    for flag, value in (("--data-dir", args.data_dir), ("--nsamples", args.nsamples),
                        ("--calib-seqlen", args.calib_seqlen)):
        common += [flag, str(value)] if value is not None else []
    root = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    report = {}
    for name, sig, metric in (("SIGTERM", signal.SIGTERM, "rel"), ("SIGKILL", signal.SIGKILL, "fisher")):
        profile_args = [*common, "--metrics", metric]
        plain = run(profile_args, root / f"{name}-plain", root / f"{name}-plain-out")
        if plain["returncode"] != 0:
            raise BitallocError(f"the uninterrupted profile failed (exit {plain['returncode']}): "
                                f"{(plain['log'] or ['see ' + str(root / f'{name}-plain-out.log')])[-1]}")
        expected = json.loads((root / f"{name}-plain-out/sensitivity.json").read_text())["rows"]
        blocks = len(block_files(root / f"{name}-plain"))
        cache = root / name
        first = run(profile_args, cache, root / f"{name}-first",
                    kill_when=lambda: len(finished(cache, metric)) >= blocks // 2, sig=sig)
        done = {p: p.stat().st_mtime_ns for p in finished(cache, metric)}
        second = run(profile_args, cache, root / f"{name}-second")
        rewritten = [p.name for p, t in done.items() if p.stat().st_mtime_ns != t]
        rows = json.loads((root / f"{name}-second/sensitivity.json").read_text())["rows"]
        report[name] = {
            "metric": metric, "uninterrupted_run": plain, "killed_run": first, "resumed_run": second,
            "blocks": blocks, "blocks_finished_at_kill": len(done), "finished_blocks_rewritten": rewritten,
            "table_equal_to_uninterrupted": rows == expected,
        }
        print(json.dumps({name: report[name]}, indent=1), flush=True)
    print(json.dumps(report, indent=1))
    if args.json:
        atomic.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
