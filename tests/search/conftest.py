"""Fixtures of the study tests: quiet Optuna, and a real PostgreSQL server on 127.0.0.1."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time

import optuna
import pytest


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server started for the session in a temporary data directory; yields its URL."""
    pytest.importorskip(
        "psycopg", reason="psycopg 3 is needed to talk to PostgreSQL (pip install 'snopt[postgres]')"
    )
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's `postgresql` package")
    prefix: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as the `postgres` system user.
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        if runuser is None:
            pytest.skip("running as root and `runuser` is missing")
        prefix = [runuser, "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="snopt-pg-")
    data, sockets = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sockets)
    if prefix:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()
    log = os.path.join(root, "server.log")

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    try:
        run(f"{bindir}/initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        run(
            f"{bindir}/pg_ctl",
            "-D",
            data,
            "-l",
            log,
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(root, ignore_errors=True)
        stderr = getattr(exc, "stderr", b"") or b""
        pytest.fail(f"could not start PostgreSQL: {exc}: {stderr.decode(errors='replace')[-500:]}")
    try:
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "snopt_test")
        deadline = time.time() + 30
        url = f"postgresql://postgres@127.0.0.1:{port}/snopt_test"  # as documented: no driver named
        import psycopg

        while True:
            try:
                psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="snopt_test").close()
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        subprocess.run(
            [*prefix, f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(root, ignore_errors=True)
