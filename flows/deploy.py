"""Scheduled retraining: one Prefect deployment per dataset in conf/params.yaml `retrain:`.

    gencls ui                     # Prefect server (127.0.0.1:4200) + MLflow server (127.0.0.1:5000)
    gencls serve-deployments      # registers `retrain/retrain-<dataset>` with its cron and runs them

The deployments appear in the Prefect UI (Deployments), where they can also be run by
hand ("Quick run"); the process serving them must stay up (flow.serve semantics).
"""
from __future__ import annotations

import sys
from pathlib import Path
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


def systemd_units(root: Path, bin_dir: Path, prefect_home: Path, host: str = "127.0.0.1", port: int = 4200) -> dict:
    """systemd user units that keep the schedule running: the Prefect server and the process serving the
    deployments, each restarted by systemd when it stops (a serve process that restarts picks its
    deployments up again; runs due while it was down show as Late in the UI).

    Install: save each under ~/.config/systemd/user/, then
    `systemctl --user daemon-reload && systemctl --user enable --now gencls-prefect gencls-schedule`.
    """
    env = (f"Environment=PREFECT_HOME={prefect_home}\nEnvironment=PREFECT_API_URL=http://{host}:{port}/api\n"
           "Environment=HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=true "
           "PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true\n")
    server = ("[Unit]\nDescription=Prefect server for GenCLS++ (UI and scheduler)\n\n[Service]\n"
              f"WorkingDirectory={root}\n{env}"
              f"ExecStart={bin_dir / 'prefect'} server start --host {host} --port {port}\n"
              "Restart=always\nRestartSec=10\n\n[Install]\nWantedBy=default.target\n")
    schedule = ("[Unit]\nDescription=GenCLS++ scheduled retraining (serves the retrain-<dataset> deployments)\n"
                "After=gencls-prefect.service\nRequires=gencls-prefect.service\n\n[Service]\n"
                f"WorkingDirectory={root}\n{env}"
                f"ExecStart={bin_dir / 'gencls'} serve-deployments\n"
                "Restart=always\nRestartSec=30\n\n[Install]\nWantedBy=default.target\n")
    return {"gencls-prefect.service": server, "gencls-schedule.service": schedule}


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
