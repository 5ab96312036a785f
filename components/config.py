"""Project paths, offline switches and conf/params.yaml loading (no side effects at import)."""
from __future__ import annotations

import contextlib
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


FILE_OUTPUT_ENV = {  # when stderr is a file: no \r progress bars from libraries (ours print summary lines)
    "TQDM_DISABLE": "1",  # datasets' map, transformers' weight loading, sentence-transformers (all tqdm)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "NO_COLOR": "1",
}


def set_offline_env() -> None:
    """Set the offline/no-telemetry switches unless the user already set them; in a log file (stderr not a
    terminal) also switch off third-party progress bars and colours."""
    import sys

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(cache_dir() / "prefect"))
    # Prefect creates its home without parents: on a fresh machine (no ~/.cache/gencls yet) its sqlite database
    # cannot be opened and the temporary API server times out, so make the whole path here.
    with contextlib.suppress(OSError):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        for key, value in FILE_OUTPUT_ENV.items():
            os.environ.setdefault(key, value)


def project_root() -> Path:
    """Directory holding data/, checkpoints/, conf/params.yaml (GENCLS_ROOT or the current directory)."""
    return Path(os.environ.get("GENCLS_ROOT", os.getcwd())).resolve()


def data_dir() -> Path:
    """Where datasets live: <root>/data."""
    return project_root() / "data"


def checkpoints_dir() -> Path:
    """Where trained adapters live: <root>/checkpoints."""
    return project_root() / "checkpoints"


def reports_dir() -> Path:
    """Where predictions, metrics and plots go: <root>/reports."""
    return project_root() / "reports"


def cache_dir() -> Path:
    """Cache outside the repo for downloaded packages, converted models, embeddings."""
    return Path(os.environ.get("GENCLS_CACHE", Path.home() / ".cache" / "gencls")).expanduser()


PARAMS_FILE = Path("conf") / "params.yaml"  # the one config file, relative to a project root


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read the config file (default: <root>/conf/params.yaml); empty dict when absent."""
    path = Path(path) if path else project_root() / PARAMS_FILE
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


RUN_KEYS = frozenset({"seconds", "examples_per_s", "focus_seconds", "run_id"})  # differ between identical runs
RUN_INFO_FILE = "run.json"  # beside an output: its RUN_KEYS (.dvcignore'd, so dvc.lock never depends on a clock)


def stable(data: Any) -> Any:
    """`data` without RUN_KEYS at any depth: what two runs of the same inputs write identically."""
    if isinstance(data, dict):
        return {k: stable(v) for k, v in data.items() if k not in RUN_KEYS}
    if isinstance(data, list):
        return [stable(v) for v in data]
    return data


def run_info(data: dict) -> dict:
    """The top-level RUN_KEYS of `data` (timings, run ids) that `stable` leaves out."""
    return {k: v for k, v in data.items() if k in RUN_KEYS}


def portable(path: str | Path | None) -> str | None:
    """`path` relative to the project root when inside it (outputs must not name the clone's folder)."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(project_root()))
    except ValueError:
        return str(path)


def default_params() -> dict[str, Any]:
    """The project's own conf/params.yaml (beside components/): the profiles when a root has no conf/params.yaml."""
    return load_params(REPO_ROOT / PARAMS_FILE)


def profile_section(profile: str, section: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """`profiles.<profile>.<section>` of conf/params.yaml: the one place profiles are defined.

    Args:
        profile: quick | full (training) or cpu | gpu (study).
        section: sft | rl | evaluate | study.
        params: conf/params.yaml content; None reads the root's. Without a `profiles:` table (an empty
            dict, a root without conf/params.yaml) the project's own conf/params.yaml supplies it.

    Raises:
        ValueError: unknown profile, or one that does not define `section`.
    """
    params = load_params() if params is None else params
    table = params.get("profiles") or default_params().get("profiles") or {}
    if profile not in table:
        raise ValueError(f"profile {profile!r}: expected one of {', '.join(table)} (conf/params.yaml profiles)")
    if section not in (table[profile] or {}):
        having = [name for name, spec in table.items() if section in (spec or {})]
        raise ValueError(f"profile {profile!r} defines no {section} settings; profiles that do: {', '.join(having)}")
    return dict(table[profile][section] or {})


def wait_healthy(url: str, timeout: float = 120.0, proc: Any = None) -> bool:
    """Poll `url` until it answers 200 (False on timeout or when `proc` exits)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1.0)
    return False
