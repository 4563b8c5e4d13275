"""A real ``mlflow server`` for the tracking tests.

One server per test session (starting one takes seconds): SQLite backend and a local
artifact store in a temporary folder, bound to 127.0.0.1 on a free port, started as a
subprocess in its own process group, waited for through ``/health`` and stopped at the end.
Tests that kill it (``server.kill()``) start it again on the same backend and port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn

from snopt._ode import ODEBlock

# No usage telemetry from MLflow during tests, in this process or in the servers.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Poll ``url/health`` until it answers OK; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"the MLflow server exited with code {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the MLflow server at {url} did not answer /health within {timeout} s")


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """Stop a process started with start_new_session=True and everything it spawned."""
    if proc.poll() is None or _group_alive(proc.pid):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    # uvicorn's worker may outlive the `mlflow server` parent for a moment.
    deadline = time.monotonic() + timeout
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with an SQLite backend and a local artifact store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{root / 'server.db'}"
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        env = dict(os.environ)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner: faster start
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend,
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_healthy(self.uri, self.proc, timeout, self.log)

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL to its process group), as a crash would."""
        assert self.proc is not None
        stop_group(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def processes():
    """Helpers to start and stop server processes: free_port, wait_healthy, stop_group."""
    import types

    return types.SimpleNamespace(free_port=free_port, wait_healthy=wait_healthy, stop_group=stop_group)


@pytest.fixture
def unused_port() -> int:
    """A port nothing listens on (for an unreachable tracking server)."""
    return free_port()


@pytest.fixture(scope="session")
def _server_process(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(_server_process, monkeypatch):
    """The session's MLflow server, restarted first if a previous test left it dead."""
    if not _server_process.alive():
        if _server_process.proc is not None:
            stop_group(_server_process.proc, signal.SIGKILL)
        _server_process.start()
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return _server_process


class _Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))

    def forward(self, t, x):
        return self.net(x)


class Toy:
    """A one-block ODE classifier on eight 2-d points: training takes milliseconds."""

    @staticmethod
    def model(seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(ODEBlock(_Field(), method="euler", options={"step_size": 0.5}), nn.Linear(2, 2))

    @staticmethod
    def loader() -> list[tuple[torch.Tensor, torch.Tensor]]:
        x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
        y = (x[:, 0] > 0).long()
        return [(x[:4], y[:4]), (x[4:], y[4:])]

    @classmethod
    def fit(
        cls,
        callbacks,
        *,
        lr: float = 0.1,
        max_steps: int = 4,
        eval_every: int | None = 2,
        loss_fn=None,
        **kwargs,
    ):
        from snopt import fit

        model = cls.model()
        return fit(
            model,
            cls.loader(),
            cls.loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=lr),
            loss_fn=loss_fn or nn.functional.cross_entropy,
            max_steps=max_steps,
            eval_every=eval_every,
            callbacks=callbacks,
            progress=False,
            **kwargs,
        )


@pytest.fixture(scope="session")
def toy() -> type[Toy]:
    """Builders of a tiny ODE model, its data and a training run."""
    return Toy
