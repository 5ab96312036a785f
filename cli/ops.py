"""Ops commands: UIs, retraining, schedules, registry promotion/rollback, serving.

    gencls ui                                   # Prefect :4200 + MLflow :5000 on 127.0.0.1, in the background
    gencls ui --stop                            # stop them
    gencls retrain --dataset trec6 [--set rl.learning_rate=1e-5]
    gencls serve-deployments                    # cron deployments from conf/params.yaml `retrain:`
    gencls registry show --dataset trec6
    gencls promote --dataset trec6 --version 3 --reason "..."
    gencls rollback --dataset trec6
    gencls serve --dataset trec6 [--port 5001]  # mlflow models serve models:/gencls-trec6@champion
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

from components.config import wait_healthy
from pathlib import Path
from cli.args import profile_arg

PREFECT_PORT = 4200
MLFLOW_PORT = 5000
HOST = "127.0.0.1"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the ops subcommands on the `gencls` parser."""
    ui = sub.add_parser("ui", help="start the Prefect and MLflow servers on 127.0.0.1 (background)")
    ui.add_argument("--prefect-port", type=int, default=PREFECT_PORT)
    ui.add_argument("--mlflow-port", type=int, default=MLFLOW_PORT)
    ui.add_argument("--stop", action="store_true", help="stop the servers started by `gencls ui`")
    ui.set_defaults(func=cmd_ui)

    retrain = sub.add_parser("retrain", help="run the Prefect retraining flow once for a dataset")
    retrain.add_argument("--dataset", default="trec6")
    retrain.add_argument("--profile", default="quick", type=profile_arg("sft"))
    retrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="config override, e.g. rl.learning_rate=1e-5 (repeatable)")
    retrain.set_defaults(func=cmd_retrain)

    for name in ("serve-deployments", "schedule"):
        dep = sub.add_parser(name, help="serve the scheduled retraining deployments (blocks)")
        dep.add_argument("--systemd-units", metavar="DIR", default=None,
                         help="write systemd user units (Prefect server + this process, restarted when they "
                              "stop) into DIR instead of serving; see the README's 'Running the schedule'")
        dep.set_defaults(func=cmd_serve_deployments)

    reg = sub.add_parser("registry", help="inspect the MLflow model registry")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    show = reg_sub.add_parser("show", help="versions, figures, gate decisions and the champion")
    show.add_argument("--dataset", required=True)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_registry_show)

    promote = sub.add_parser("promote", help="move the champion alias to a version (manual, recorded)")
    promote.add_argument("--dataset", required=True)
    promote.add_argument("--version", required=True)
    promote.add_argument("--reason", default="", help="why (kept in the champion history)")
    promote.add_argument("--force", action="store_true",
                         help="promote a version whose gate figures are worse than the champion's (needs --reason)")
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser("rollback", help="move the champion alias back to the previous champion")
    rollback.add_argument("--dataset", required=True)
    rollback.add_argument("--reason", default="")
    rollback.set_defaults(func=cmd_rollback)

    serve = sub.add_parser("serve", help="serve the champion over REST (mlflow models serve)")
    serve.add_argument("--dataset", required=True)
    serve.add_argument("--alias", default="champion")
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--workers", type=int, default=1,
                       help="uvicorn workers (default 1); each takes cores // workers torch threads")
    serve.add_argument("--max-rows", type=int, default=None,
                       help="rows per request (default 256); more is refused with HTTP 400")
    serve.add_argument("--timeout", type=int, default=None,
                       help="seconds a request may take (default 120: 256 trec6 rows on 2 cores fit)")
    serve.set_defaults(func=cmd_serve)

    pred = sub.add_parser("predict", help="classify a CSV/JSONL/Parquet file with the champion (or a version)")
    pred.add_argument("--dataset", required=True, help="whose registered model (gencls-<dataset>)")
    pred.add_argument("--input", required=True, type=Path, help="FILE.csv|.jsonl|.parquet with a text column")
    pred.add_argument("--output", required=True, type=Path, help="FILE.csv|.jsonl|.parquet: input + label + prob_<label>")
    which = pred.add_mutually_exclusive_group()
    which.add_argument("--alias", default="champion", help="registry alias (default champion)")
    which.add_argument("--version", default=None, help="a version number instead of the alias")
    pred.add_argument("--text-col", default="text", help="column holding the text (default text)")
    pred.add_argument("--batch-size", type=int, default=64, help="rows per model call (default 64)")
    pred.set_defaults(func=cmd_predict)


# ----------------------------------------------------------------------------- ui
def _state_dir() -> Path:
    from components.config import cache_dir

    path = cache_dir() / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _start(name: str, cmd: list[str], env: dict, health: str) -> tuple[bool, Path]:
    """Start a server in the background (own session, log file); wait for its health URL."""
    state = _state_dir()
    log = state / f"{name}.log"
    if wait_healthy(health, timeout=1):
        return True, log  # already running
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (state / f"{name}.pid").write_text(str(proc.pid))
    return wait_healthy(health, timeout=180, proc=proc), log


def cmd_ui(args: argparse.Namespace) -> int:
    """Start (or stop) the Prefect server and the MLflow tracking server."""
    from components.ops import tracking
    from components.config import project_root

    if args.stop:
        for name in ("prefect", "mlflow"):
            pid_file = _state_dir() / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.killpg(int(pid_file.read_text()), signal.SIGTERM)
                    print(f"stopped {name} (pid {pid_file.read_text()})")
                except (ProcessLookupError, ValueError):
                    pass
                pid_file.unlink()
        subprocess.run([str(Path(sys.executable).parent / "prefect"), "config", "unset", "PREFECT_API_URL", "-y"],
                       capture_output=True)  # flows go back to a temporary local server
        return 0
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    # MLflow 3's job runner (GenAI evaluation jobs: one runner + 7 huey consumers, ~240 MB each) is not used here
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    uri = tracking.tracking_uri(project_root())
    tracking.mlflow_dir(project_root()).mkdir(parents=True, exist_ok=True)
    artifacts = tracking.artifact_root(project_root())
    artifacts.mkdir(parents=True, exist_ok=True)
    prefect_url = f"http://{HOST}:{args.prefect_port}"
    # the UI finds its API from these settings, not from `server start --port` (else it calls :4200)
    env.update({"PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(args.prefect_port),
                "PREFECT_UI_API_URL": f"{prefect_url}/api"})
    mlflow_url = f"http://{HOST}:{args.mlflow_port}"
    ok_p, log_p = _start("prefect", [str(bin_dir / "prefect"), "server", "start", "--host", HOST,
                                     "--port", str(args.prefect_port)], env, f"{prefect_url}/api/health")
    ok_m, log_m = _start("mlflow", [str(bin_dir / "mlflow"), "server", "--backend-store-uri", uri,
                                    "--default-artifact-root", artifacts.as_uri(), "--artifacts-destination",
                                    artifacts.as_uri(), "--host", HOST, "--port", str(args.mlflow_port),
                                    "--workers", "1"],  # MLflow's default 4 workers (~1.8 GB) do not fit 2 cores
                         env, f"{mlflow_url}/health")
    if ok_p:
        subprocess.run([str(bin_dir / "prefect"), "config", "set", f"PREFECT_API_URL={prefect_url}/api"],
                       env=env, capture_output=True)  # flows started afterwards report to this server
    print(f"Prefect UI : {prefect_url}   {'ok' if ok_p else 'NOT healthy, see ' + str(log_p)}")
    print(f"MLflow UI  : {mlflow_url}   {'ok' if ok_m else 'NOT healthy, see ' + str(log_m)}")
    print(f"logs       : {log_p}, {log_m}")
    print(f"Flows started from now on report to Prefect (profile setting PREFECT_API_URL={prefect_url}/api) and "
          f"log to {uri} (what the MLflow UI shows).")
    print(f"prefect CLI: export PREFECT_API_URL={prefect_url}/api   (in another shell, before "
          f".venv/bin/prefect deployment ls / flow-run ls; without it the CLI starts a temporary server)")
    print("stop with   : gencls ui --stop   (also unsets PREFECT_API_URL)")
    return 0 if ok_p and ok_m else 1


# ----------------------------------------------------------------------------- flows
def cmd_retrain(args: argparse.Namespace) -> int:
    """Run the retraining flow once."""
    from components.data.datasets import DataError, dataset_dir
    from components.train.configs import parse_overrides
    from flows import steps

    try:  # bad input is refused here, before Prefect starts and before any model loads
        overrides = parse_overrides(args.overrides)
        steps.resolve_configs(args.profile, overrides)
        if not (dataset_dir(args.dataset) / "labels.yaml").is_file():
            raise DataError(f"dataset {args.dataset!r} is not built in {dataset_dir(args.dataset).parent}; "
                            f"`gencls data build --datasets {args.dataset}` or `gencls data import FILE --name ...`")
    except ValueError as exc:  # DataError is a ValueError
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    from flows.retrain import retrain

    state = retrain(args.dataset, args.profile, overrides, return_state=True)
    if state.is_failed():
        print(f"retrain failed: {state.message}", file=sys.stderr)
        return 1
    return 0


def cmd_serve_deployments(args: argparse.Namespace) -> int:
    """Serve the cron deployments (needs a Prefect server: `gencls ui`), or write systemd units that do."""
    from flows.deploy import main, systemd_units

    if getattr(args, "systemd_units", None):
        from components.config import cache_dir, project_root

        folder = Path(args.systemd_units).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        prefect_home = Path(os.environ.get("PREFECT_HOME") or cache_dir() / "prefect")
        for name, text in systemd_units(project_root(), Path(sys.executable).parent, prefect_home,
                                        HOST, PREFECT_PORT).items():
            (folder / name).write_text(text)
            print(f"wrote {folder / name}")
        print("then: systemctl --user daemon-reload && systemctl --user enable --now gencls-prefect gencls-schedule")
        return 0
    return main()


# ----------------------------------------------------------------------------- registry
def cmd_registry_show(args: argparse.Namespace) -> int:
    """Print versions with figures, decisions, champion and history."""
    from components.ops import registry

    info = registry.show(args.dataset)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['model']}  champion: v{info['champion']}" if info["champion"] else f"{info['model']}  (no champion)")
    print(f"{'version':>7} {'accuracy':>9} {'macro_f1':>9}  decision")
    for row in info["versions"]:
        mark = " *" if row["champion"] else ""
        print(f"{row['version']:>7} {float(row['accuracy'] or 'nan'):9.4f} {float(row['macro_f1'] or 'nan'):9.4f}  "
              f"{row['decision']}{mark}")
    for entry in info["history"][-5:]:
        print(f"  history: v{entry['version']} at {entry['at']} by {entry['by']}: {entry['reason']}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Manual promotion (no gate), recorded with who and why."""
    from components.ops import registry

    try:
        out = registry.promote(args.dataset, args.version, reason=args.reason, force=args.force)
    except registry.RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    forced = " (forced: worse on the gate figures)" if out.get("forced") else ""
    print(f"{out['model']}: champion v{out['previous']} -> v{out['version']} (by {out['by']}){forced}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Back to the previous champion."""
    from components.ops import registry

    try:
        out = registry.rollback(args.dataset, reason=args.reason)
    except registry.RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out['model']}: champion v{out['previous']} -> v{out['version']} (rollback by {out['by']})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Batch prediction of a file with a registered model (the served model's own predict)."""
    from components.ops import registry, tracking
    from components.ops.serving import predict_file

    os.environ["MLFLOW_TRACKING_URI"] = tracking.configure()
    name = registry.model_name(args.dataset)
    uri = f"models:/{name}/{args.version}" if args.version else f"models:/{name}@{args.alias}"
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: expected a positive number")
        if args.version:
            try:
                tracking.client().get_model_version(name, str(args.version))
            except Exception:
                raise ValueError(f"no version {args.version} of {name}; see `gencls registry show --dataset "
                                 f"{args.dataset}`") from None
        else:
            _require_served_model(args.dataset, args.alias)
        out = predict_file(uri, args.input, args.output, text_col=args.text_col, batch_size=args.batch_size)
    except ValueError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in sorted(out["labels"].items()))
    print(f"{out['rows']} rows classified with {uri} in {out['seconds']} s -> {out['output']} ({counts})")
    return 0


def serve_command(dataset: str, port: int, alias: str = "champion", workers: int = 1,
                  timeout: int | None = None) -> list[str]:
    """The `mlflow models serve` command line for a dataset's aliased model."""
    from components.ops.serving import SERVE_TIMEOUT_S

    return [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/gencls-{dataset}@{alias}",
            "--env-manager", "local", "-h", HOST, "-p", str(port), "-w", str(workers),
            "-t", str(timeout or SERVE_TIMEOUT_S)]


def _require_served_model(dataset: str, alias: str) -> None:
    """ValueError (one line) when `gencls-<dataset>@<alias>` is not in the registry."""
    from components.ops import registry, tracking

    try:
        tracking.client().get_model_version_by_alias(registry.model_name(dataset), alias)
    except Exception:
        raise ValueError(f"no model {registry.model_name(dataset)}@{alias} in the registry "
                         f"({tracking.tracking_uri()}); train and register one first: "
                         f"`gencls retrain --dataset {dataset}` (or `make run` for trec6)") from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a registered model over REST (foreground); SIGTERM / Ctrl-C stop the server and its workers."""
    from components.ops import tracking
    from components.ops.serving import MAX_ROWS_ENV, SERVE_WORKERS_ENV
    from components.threads import apply_thread_policy

    os.environ["MLFLOW_TRACKING_URI"] = tracking.configure()
    for name, value in (("--workers", args.workers), ("--max-rows", args.max_rows), ("--timeout", args.timeout)):
        if value is not None and value < 1:
            print(f"error: {name} {value}: expected a positive number", file=sys.stderr)
            return 2
    try:
        _require_served_model(args.dataset, args.alias)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bin_dir = str(Path(sys.executable).parent)  # the scoring server execs `uvicorn` from PATH
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    workers = args.workers or 1
    os.environ[SERVE_WORKERS_ENV] = str(workers)
    if args.max_rows:
        os.environ[MAX_ROWS_ENV] = str(args.max_rows)
    threads = apply_thread_policy(workers=workers)  # exported to the server: no worker takes every core
    print(f"serving models:/gencls-{args.dataset}@{args.alias} on http://{HOST}:{args.port}/invocations "
          f"({workers} worker(s) x {threads} torch thread(s))", flush=True)
    proc = subprocess.Popen(serve_command(args.dataset, args.port, args.alias, workers, args.timeout),
                            start_new_session=True)  # own process group: stopping it stops uvicorn's workers

    def stop(signum, _frame):
        _stop_group(proc)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group of `proc`, SIGKILL what is left after `grace` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
