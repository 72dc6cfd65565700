"""MLflow's system/ metrics for a training run, sampled at a pace that follows the epoch."""
from __future__ import annotations

import warnings

import mlflow

from .errors import first_line

# About 10 samples an epoch: a short epoch still shows whether the device was busy, and a long one
# (an hour on a CPU) does not log thousands of rows. Under 1 s sampling would cost more than it
# shows; over 30 s a stall of half a minute would vanish in the mean.
SAMPLES_PER_EPOCH = 10
INTERVAL_RANGE_S = (1.0, 30.0)
# A first guess of an epoch's length, before one is measured (docs/benchmarks.md: about 150-300
# img/s on this project's 2-core CPU, 25-40k on an H100), evaluation counted at a third the cost.
GUESSED_IMAGES_PER_S = {"cpu": 200.0, "cuda": 25_000.0}
STOP_WAIT_S = 5.0


def sampling_interval(epoch_s: float) -> float:
    low, high = INTERVAL_RANGE_S
    return min(max(epoch_s / SAMPLES_PER_EPOCH, low), high)


def guess_epoch_s(device_type: str, train_images: int, eval_images: int) -> float:
    return (train_images + eval_images / 3) / GUESSED_IMAGES_PER_S.get(device_type, 200.0)


class SystemMetrics:
    """MLflow's system/ metrics for one run (CPU, memory, disk, network; GPU utilisation and
    memory where pynvml finds an NVIDIA GPU), sampled in a daemon thread.

    Training runs are made with MlflowClient, never fluent start_run(log_system_metrics=True),
    so the monitor is started here for the run id given (it never reads MLFLOW_RUN_ID). The
    interval follows the epoch (sampling_interval) unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    fixes it; MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns it off. Whatever goes wrong in it
    is a warning: it never fails or holds up a run.
    """

    def __init__(self, run_id: str, first_epoch_s: float):
        from mlflow.environment_variables import (MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING,
                                                  MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL)

        self.monitor, self.fixed_interval = None, False
        try:
            self.fixed_interval = MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() is not None
            if MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.is_set() and not MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.get():
                return
        except ValueError as err:  # a value MLflow cannot parse (`off`, `5s`): off, said once
            warnings.warn(f"system metrics are off for run {run_id}: {first_line(err)}")
            return
        try:
            import psutil
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            psutil.cpu_percent()  # the first call reads 0.0: start the count now, not at sample 1
            # resume_logging: a resumed run's samples continue after its earlier ones
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval(first_epoch_s),
                                                resume_logging=True, tracking_uri=mlflow.get_tracking_uri())
            self.monitor.start()
        except Exception as err:  # noqa: BLE001 - metrics about the run must never stop it
            warnings.warn(f"system metrics are off for run {run_id}: {type(err).__name__}: {first_line(err)}")
            self.monitor = None

    def epoch_took(self, seconds: float) -> None:
        if self.monitor is not None and not self.fixed_interval:
            self.monitor.sampling_interval = sampling_interval(seconds)  # read at every wait

    def stop(self) -> None:
        """Stop sampling and log what the last interval collected (so a run shorter than one
        interval still gets a sample), waiting at most STOP_WAIT_S for the thread."""
        monitor, self.monitor = self.monitor, None
        thread = getattr(monitor, "_process", None)
        if thread is None:
            return
        try:
            monitor._shutdown_event.set()  # finish() would join without a timeout
            thread.join(STOP_WAIT_S)
            if thread.is_alive():  # stuck in a call to the tracking server: leave the daemon
                warnings.warn(f"system metrics thread still busy after {STOP_WAIT_S:g} s; not waiting")
                return
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"system metrics: the last sample was not logged: {type(err).__name__}: {first_line(err)}")
