"""The one place that talks to MLflow: tracking store, runs, params, metrics, artifacts.

    from components.ops import tracking
    with tracking.start_run("trec6", run_name="retrain", tags={"strategy": "naive"}) as run:
        tracking.log_config(run.info.run_id, {"sft": {...}, "rl": {...}})
        train_sft(..., log_fn=tracking.make_log_fn(run.info.run_id, prefix="sft/"))

The store is a sqlite database under ``<root>/mlflow/mlflow.db`` with artifacts under
``<root>/mlflow/artifacts`` (both git-ignored; `mlflow/` must never get an ``__init__.py``).
``MLFLOW_TRACKING_URI`` overrides the store (e.g. the server started by ``gencls ui``).
Everything here takes explicit run ids and uses an ``MlflowClient``, so logging works the
same from Prefect task threads, dvc stage processes and tests.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from components.config import project_root

EXPERIMENT_KIND = "mlflow.experimentKind"  # the MLflow UI's choice between its runs view and the GenAI overview
PARENT_ENV = "GENCLS_PARENT_RUN_ID"  # a run every run of this process and its children nests under
PIPELINE_TAG = "gencls.pipeline"  # on the parent run of one `dvc repro`: the dvc process that ran the stages
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
PARAM_BATCH = 100  # log_batch takes at most 100 params per call


def mlflow_dir(root: str | Path | None = None) -> Path:
    """The local store folder: ``<root>/mlflow``."""
    return Path(root or project_root()) / "mlflow"


def tracking_uri(root: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<root>/mlflow/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI") and root is None:
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{mlflow_dir(root) / 'mlflow.db'}"


def artifact_root(root: str | Path | None = None) -> Path:
    """Where run artifacts are written: ``<root>/mlflow/artifacts``."""
    return mlflow_dir(root) / "artifacts"


def configure(root: str | Path | None = None) -> str:
    """Point MLflow (fluent API, registry and env of child processes) at the project store.

    Returns:
        The tracking URI in use.
    """
    import mlflow

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        mlflow_dir(root).mkdir(parents=True, exist_ok=True)
        artifact_root(root).mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # so `mlflow models serve` and subprocesses agree
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client():
    """An MlflowClient on the configured store (configures it first)."""
    from mlflow.tracking import MlflowClient

    uri = configure() if not os.environ.get("MLFLOW_TRACKING_URI") else os.environ["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(dataset: str) -> str:
    """Experiment ``gencls-<dataset>``, created with its artifacts under the project store."""
    c = client()
    name = f"gencls-{dataset}"
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND not in exp.tags:  # made by an older version
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return exp.experiment_id
    location = None
    if c.tracking_uri.startswith("sqlite:///"):
        location = artifact_root(Path(c.tracking_uri[len("sqlite:///"):]).parent.parent).as_uri()
    try:  # a model-training experiment: the UI opens on its runs, not on the GenAI overview
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND: "custom_model_development"})
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def start_run(dataset: str, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
              run_id: str | None = None) -> Iterator[Any]:
    """Open (or resume) an MLflow run; FAILED with the error as a tag when the body raises.

    Args:
        dataset: Dataset name (experiment ``gencls-<dataset>``, tag ``dataset``).
        run_name: Display name of a new run.
        tags: Extra tags (``strategy``, ``stage``, ``prefect.flow_run_id`` ...).
        run_id: Resume this run instead of creating one.

    Yields:
        The ``mlflow.entities.Run`` (use ``run.info.run_id``).
    """
    c = client()
    all_tags = {"dataset": dataset, **{k: str(v) for k, v in (tags or {}).items()}}
    if run_id:
        c.update_run(run_id, status="RUNNING")
        for key, value in all_tags.items():
            c.set_tag(run_id, key, value)
        run = c.get_run(run_id)
    else:
        parent = parent_run(dataset)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = c.create_run(experiment_id(dataset), run_name=run_name, tags=all_tags)
    try:
        yield run
    except BaseException as exc:
        with contextlib.suppress(Exception):
            c.set_tag(run.info.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
        c.set_terminated(run.info.run_id, status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    c.set_terminated(run.info.run_id, status="FINISHED")


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of a process from /proc (None when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[19]
    except (OSError, IndexError, ValueError):
        return None


def dvc_ancestor(pid: int | None = None, depth: int = 8) -> str | None:
    """``<pid>:<start time>`` of the `dvc repro` / `dvc exp run` process this one runs under, if any."""
    pid = os.getppid() if pid is None else pid
    for _ in range(depth):
        stat = _proc_stat(pid)
        if stat is None or pid <= 1:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        words = [Path(a.decode(errors="replace")).name for a in argv if a]
        if "dvc" in words and ("repro" in words or "exp" in words):
            return f"{pid}:{stat[1]}"
        pid = stat[0]
    return None


def parent_run(dataset: str) -> str | None:
    """The run this process's runs nest under: ``GENCLS_PARENT_RUN_ID``, else one parent per `dvc repro`.

    The stages of one `dvc repro` are separate processes; the first to log creates a parent run
    tagged with the dvc process (pid and start time) and the later ones find it, so the MLflow UI
    shows one run per pipeline with the stages under it.
    """
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = dvc_ancestor()
    if key is None:
        return None
    c = client()
    exp = experiment_id(dataset)
    found = c.search_runs([exp], filter_string=f"tags.`{PIPELINE_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = c.create_run(exp, run_name=f"dvc repro {dataset}", tags={"dataset": dataset, PIPELINE_TAG: key,
                                                                   "stage": "pipeline"})
    c.set_terminated(run.info.run_id, status="FINISHED")  # a folder for the stage runs; they carry the status
    return run.info.run_id


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts to ``a.b.c`` keys with string values (lists become JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value), default=str)
        else:
            out[name] = str(value)
    return out


def log_config(run_id: str, config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Log a (nested) resolved config as flattened params; returns what was logged.

    A key already logged with the same value is skipped (MLflow params are immutable), so
    a resumed run can log its config again.
    """
    from mlflow.entities import Param

    c = client()
    existing = c.get_run(run_id).data.params
    params = {k: v[:MAX_PARAM_CHARS] for k, v in flatten(config, prefix).items()}
    fresh = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), PARAM_BATCH):
        c.log_batch(run_id, params=fresh[start:start + PARAM_BATCH])
    return params


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers in a (nested) metrics dict, flattened to ``prefix + a.b``."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, f"{name}."))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def _clean_key(key: str) -> str:
    """MLflow metric names allow alphanumerics, _ - . space / ; replace anything else."""
    return "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in key)


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> dict[str, float]:
    """Log the numeric part of a metrics dict (nested dicts flattened, confusion lists skipped)."""
    import time

    from mlflow.entities import Metric

    values = {_clean_key(k): v for k, v in numeric_metrics(metrics, prefix).items()}
    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step or 0) for k, v in values.items()]
    for start in range(0, len(batch), 1000):
        client().log_batch(run_id, metrics=batch[start:start + 1000])
    return values


def make_log_fn(run_id: str, prefix: str = "") -> Callable[[Mapping[str, float], int], None]:
    """A ``log_fn(metrics, step)`` for train_sft / train_rl that logs to this run."""

    def log_fn(metrics: Mapping[str, float], step: int) -> None:
        try:
            log_metrics(run_id, metrics, step=step, prefix=prefix)
        except Exception as exc:  # tracking must never kill training
            print(f"[tracking] could not log step {step}: {exc}")

    return log_fn


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    """Set several run tags at once."""
    c = client()
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a folder (if it exists) under ``artifact_path``."""
    path = Path(path)
    if not path.exists():
        return
    c = client()
    if path.is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def log_dict(run_id: str, data: Any, artifact_file: str) -> None:
    """Log a JSON/YAML-able object as an artifact file."""
    client().log_dict(run_id, data, artifact_file)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    """Log a text artifact (e.g. rendered prompt samples)."""
    client().log_text(run_id, text, artifact_file)
