"""System metrics (CPU, memory, disk, network, GPU) sampled in a thread with MLflow's monitors."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


# ------------------------------------------------------------------ system metrics
class _SystemSampler:
    """Samples MLflow's system-metric monitors in a thread and hands the values to ``emit``.

    The monitor classes (``mlflow.system_metrics.metrics.*``) are not public API; MLflow 3.17
    has none that fits.  Its public switch, ``mlflow.start_run(log_system_metrics=True)`` (or
    ``mlflow.enable_system_metrics_logging()``), starts a ``SystemMetricsMonitor`` only for
    fluent runs and logs straight to the tracking store with its own client, sampled at an
    interval set process-wide (``set_system_metrics_sampling_interval`` writes an environment
    variable).  snopt's runs are created through ``MlflowClient`` and their metrics go through
    the run's sink, so that they reach the fallback journal when the server is down; MLflow
    offers no public way to read the monitors' values or to set an interval per run.
    """

    def __init__(self, emit: Callable[[dict[str, float], int], None], interval: float) -> None:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            import torch

            if torch.cuda.is_available():
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

                self.monitors.append(GPUMonitor())
        except Exception:  # noqa: BLE001 - no pynvml: no GPU metrics
            pass
        self.emit = emit
        self.interval = interval
        self.step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="snopt-system-metrics")

    def start(self) -> None:
        self._thread.start()

    def _sample(self) -> None:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            except Exception:  # noqa: BLE001 - one failing monitor must not stop the others
                continue
        if values:
            self.emit({f"system/{k}": float(v) for k, v in values.items()}, self.step)
            self.step += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def _psutil_available() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True
