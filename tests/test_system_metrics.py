"""system/ metrics: the interval follows the epoch, and samples arrive while the run works."""
import time

import pytest
import torch

from pipeline import sysmetrics


@pytest.mark.parametrize("epoch_s, interval", [(50.0, 5.0),      # ten samples an epoch
                                               (2.0, 1.0),       # never under 1 s
                                               (3600.0, 30.0)])  # never over 30 s
def test_sampling_interval_takes_ten_samples_an_epoch_within_bounds(epoch_s, interval):
    assert sysmetrics.sampling_interval(epoch_s) == interval


def test_first_guess_counts_evaluation_at_a_third_of_training():
    assert sysmetrics.guess_epoch_s("cpu", 2000, 600) == pytest.approx((2000 + 200) / 200)
    assert sysmetrics.guess_epoch_s("cuda", 73_257, 26_032) == pytest.approx((73_257 + 26_032 / 3) / 25_000)


def history(store, run_id, key):
    return [m.value for m in sorted(store.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_samples_arrive_during_the_work_and_the_interval_follows_the_epoch(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    run_id = store.client.create_run("0").info.run_id
    metrics = sysmetrics.SystemMetrics(run_id, first_epoch_s=10.0)
    assert metrics.monitor.sampling_interval == 1.0  # the guess: a 10 s epoch
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:  # keep a core busy, as an epoch would
        torch.randn(256, 256) @ torch.randn(256, 256)
    during = history(store, run_id, "system/cpu_utilization_percentage")
    metrics.epoch_took(120.0)  # the measured epoch: 12 s between samples from now on
    assert metrics.monitor.sampling_interval == 12.0
    metrics.stop()
    after = history(store, run_id, "system/cpu_utilization_percentage")
    # several samples were logged while the loop ran (not only the one stop() adds); stop() adds
    # its own (a sample may also have landed between the two reads)
    assert len(during) >= 2 and len(after) >= len(during) + 1
    assert store.steps(run_id, "system/cpu_utilization_percentage") == list(range(len(after)))
    assert max(during) > 0
    assert metrics.monitor is None  # stopped: a second stop() is harmless
    metrics.stop()


@pytest.mark.parametrize("variable,value", [("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "off"),
                                            ("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5s")])
def test_a_setting_mlflow_cannot_parse_turns_the_metrics_off_with_a_warning_never_fails_the_run(monkeypatch,
                                                                                               variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.warns(UserWarning, match=f"^system metrics are off for run r1: .*'?{value}'?.*"):
        metrics = sysmetrics.SystemMetrics("r1", 5.0)
    assert metrics.monitor is None
    metrics.epoch_took(3.0)
    metrics.stop()
