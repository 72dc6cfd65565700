"""Seconds per top-level run (each stage of `main`, and main itself) in a tracking store, from
MLflow's start and end times: `make demo`'s per-stage figures.

    python benchmarks/stage_seconds.py [TRACKING_URI (default sqlite:///mlflow.db)] [EXPERIMENT (svhn-demo)]
"""
from __future__ import annotations

import sys


def main() -> int:
    import mlflow

    uri = sys.argv[1] if len(sys.argv) > 1 else "sqlite:///mlflow.db"
    name = sys.argv[2] if len(sys.argv) > 2 else "svhn-demo"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        sys.exit(f"no experiment {name} in {uri}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=1000)
    print("| run | seconds |\n|---|---|")
    for run in runs:
        if "mlflow.parentRunId" not in run.data.tags and run.info.end_time:
            print(f"| {run.data.tags.get('stage', run.info.run_name)} | "
                  f"{(run.info.end_time - run.info.start_time) / 1000:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
