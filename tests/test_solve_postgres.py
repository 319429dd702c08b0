"""Optuna workers sharing one study in a real PostgreSQL server started on loopback for the test."""
import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from bitalloc.solve.optuna_search import solve_optuna
from conftest import free_port
from test_solve_optuna import make_problem, run_workers


def _server_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (PATH first, then Debian's versioned layout)."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((d for d in candidates if all((d / n).is_file() for n in ("initdb", "pg_ctl", "postgres"))), None)


@pytest.fixture
def postgres_url():
    """postgresql://... of a throwaway server in a temp dir; the server is run as `postgres` when we are root."""
    pytest.importorskip("psycopg", reason="no PostgreSQL driver: pip install 'psycopg[binary]' (dev extras)")
    binaries = _server_binaries()
    if binaries is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): .ci/run installs them with apt-get")
    as_server = []
    root = Path(tempfile.mkdtemp(prefix="bitalloc-pg-"))  # not under pytest's tmp_path: the server user must enter
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        runuser = shutil.which("runuser")
        try:
            import pwd

            account = pwd.getpwnam("postgres")
        except KeyError:
            account = None
        if runuser is None or account is None:
            shutil.rmtree(root)
            pytest.skip("running as root without a `postgres` user and runuser to start the server as")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_server = [runuser, "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def server(*command):
        return subprocess.run(as_server + list(command), capture_output=True, text=True, timeout=60)

    init = server(str(binaries / "initdb"), "-D", str(data), "-U", "bitalloc", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
    assert init.returncode == 0, init.stderr
    start = server(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-o",
                   f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start")  # a throwaway server: no fsync
    assert start.returncode == 0, start.stderr + (root / "server.log").read_text()
    try:
        yield f"postgresql://bitalloc@127.0.0.1:{port}/postgres"
    finally:
        server(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study_in_postgresql(postgres_url, tmp_path):
    run_workers(tmp_path, postgres_url, (21, 22))
    problem, starts, measure = make_problem()
    choice, report = solve_optuna(problem, measure, starts, "tpe", n_trials=0, storage=postgres_url)
    assert report["trials"] == 20 and report["workers"] == 2  # both workers' trials are in the one study
    assert report["storage"].startswith("postgresql://bitalloc@127.0.0.1")
    assert problem.feasible(choice) and report["best_measured"] == pytest.approx(measure(choice))
