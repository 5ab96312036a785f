"""Scheduled retraining: one Prefect deployment per dataset in params.yaml `retrain:`.

    gencls ui                     # Prefect server (127.0.0.1:4200) + MLflow server (127.0.0.1:5000)
    gencls serve-deployments      # registers `retrain/retrain-<dataset>` with its cron and runs them

The deployments appear in the Prefect UI (Deployments), where they can also be run by
hand ("Quick run"); the process serving them must stay up (flow.serve semantics).
"""
from __future__ import annotations

import sys
from typing import Any

from components.config import load_params, set_offline_env


def deployment_specs(params: dict | None = None) -> list[dict[str, Any]]:
    """Name, cron, timezone and parameters of each dataset's retraining deployment."""
    params = load_params() if params is None else params
    cfg = params.get("retrain") or {}
    datasets = cfg.get("datasets") or [(params.get("data") or {}).get("dataset", "trec6")]
    return [{"name": f"retrain-{d}", "cron": cfg.get("cron", "0 3 * * 1"), "timezone": cfg.get("timezone", "UTC"),
             "parameters": {"dataset": d, "profile": cfg.get("profile", params.get("profile", "quick"))}}
            for d in datasets]


def build_deployments(params: dict | None = None) -> list[Any]:
    """RunnerDeployments of the retrain flow with a cron schedule each."""
    from prefect.schedules import Cron

    from flows.retrain import retrain

    return [retrain.to_deployment(name=spec["name"], parameters=spec["parameters"],
                                  schedule=Cron(spec["cron"], timezone=spec["timezone"]),
                                  tags=["gencls", spec["parameters"]["dataset"]],
                                  description=f"Scheduled GenCLS++ retraining of {spec['parameters']['dataset']}")
            for spec in deployment_specs(params)]


def main() -> int:
    """Serve all deployments (blocks; Ctrl-C stops)."""
    set_offline_env()
    from prefect import serve

    deployments = build_deployments()
    for spec in deployment_specs():
        print(f"deployment retrain/{spec['name']}: cron '{spec['cron']}' ({spec['timezone']}), parameters {spec['parameters']}")
    serve(*deployments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
