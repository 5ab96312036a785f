"""What a training run writes and resumes from: JSON files, run fingerprints, checkpoints saved atomically,
the newest readable checkpoint to resume, and the final adapter.

A Trainer checkpoint is written under `<trainer_dir>/.saving/` and renamed into place
(`with_atomic_checkpoints`); `resume_checkpoint` takes the newest `checkpoint-N`
(transformers' `get_last_checkpoint`) that `checkpoint_problem` can read back, removing
unreadable ones (a kill mid-save, a truncated file) and falling back to the previous one.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from components.train.callbacks import GenerativeEval

CONFIG_FILE = "gencls_config.json"
METRICS_FILE = "metrics.json"
RUN_FILE = "gencls_run.json"  # fingerprint of the run inside out_dir/trainer, for safe resume
STAGING_DIR = ".saving"  # a checkpoint is written here, then renamed to checkpoint-N (atomic save)
CLOCK_FILE = "gencls_clock.json"  # in each checkpoint: the wall seconds the run had spent when it was saved


def seconds_spent(checkpoint: str | Path | None) -> float:
    """Wall seconds a run had spent when `checkpoint` was saved (0 without one, or for a checkpoint saved before
    checkpoints carried the clock): a resumed run adds it, so its `seconds` count every attempt's training."""
    if not checkpoint:
        return 0.0
    return float(read_json(Path(checkpoint) / CLOCK_FILE, {}).get("seconds", 0.0))


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (tmp file + rename), sorted keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    """Read JSON or return `default` when the file is missing."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else default


def fingerprint(data: Any) -> str:
    """Short sha256 of a JSON-serialisable object (config identity for resume): components.fingerprint's, 16 digits."""
    from components.fingerprint import fingerprint as full

    return full(data, 16)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed (None when it can).

    Checks what a resume reads: trainer_state.json parses, the weights' safetensors header
    reads, and optimizer.pt / scheduler.pt load (a kill during a save or a truncated file fails
    here instead of deep inside `Trainer.train`).
    """
    import torch

    folder = Path(folder)
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"trainer_state.json unreadable ({type(exc).__name__})"
    weights = [p for p in folder.glob("*.safetensors")] + [p for p in folder.glob("pytorch_model*.bin")]
    if not weights:
        return "no model or adapter weights"
    for path in folder.glob("*.safetensors"):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for a truncated header
            return f"{path.name} unreadable ({type(exc).__name__})"
    for name in ("optimizer.pt", "scheduler.pt"):
        try:
            torch.load(folder / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises several unrelated types on a truncated file
            return f"{name} unreadable ({type(exc).__name__})"
    return None


def resume_checkpoint(trainer_dir: Path, run_id: str, log: Callable[[str], None] = print) -> str | None:
    """The newest resumable `checkpoint-N` under `trainer_dir` when it belongs to the same run, else None.

    A folder from a run with another config is removed (so it cannot be resumed by mistake).
    A checkpoint that cannot be read back (`checkpoint_problem`: killed mid-save, truncated
    file) is removed with a message and the previous good one is used. The run's fingerprint
    is (re)written either way.
    """
    from transformers.trainer_utils import get_last_checkpoint

    trainer_dir = Path(trainer_dir)
    info = read_json(trainer_dir / RUN_FILE, {})
    if trainer_dir.exists() and info.get("run_id") != run_id:
        if get_last_checkpoint(trainer_dir):
            log(f"{trainer_dir}: checkpoints from a different config; starting over")
        shutil.rmtree(trainer_dir)
    trainer_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(trainer_dir / STAGING_DIR, ignore_errors=True)  # a save that was killed before its rename
    write_json(trainer_dir / RUN_FILE, {"run_id": run_id})
    while (folder := get_last_checkpoint(trainer_dir)) is not None:
        problem = checkpoint_problem(Path(folder))
        if problem is None:
            log(f"resuming from {folder}")
            return folder
        log(f"skipping {folder}: {problem}; removed, falling back to the previous checkpoint")
        shutil.rmtree(folder)  # raises rather than finding the same folder again
    return None


def with_atomic_checkpoints(trainer_class: type) -> type:
    """`trainer_class` with `AtomicCheckpoints` in front (same name, same behaviour otherwise)."""
    return type(trainer_class.__name__, (AtomicCheckpoints, trainer_class), {})


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is written under `<output>/.saving/` and renamed into place.

    A kill during a save leaves no half-written `checkpoint-N` (only `.saving/`, which
    `resume_checkpoint` clears); old checkpoints are rotated after the rename. With `gencls_started`
    set (a time.time() value), each checkpoint also records the seconds spent since then (CLOCK_FILE).
    """

    gencls_started: float | None = None

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        staging = run_dir / STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self._get_output_dir = lambda trial=None: str(staging)  # where super() writes this one save
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.gencls_started is not None:
            write_json(staging / name / CLOCK_FILE, {"seconds": round(time.time() - self.gencls_started, 1)})
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
        os.replace(staging / name, run_dir / name)
        shutil.rmtree(staging, ignore_errors=True)
        if self.args.should_save:
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)


def copy_adapter(src: Path, dst: Path) -> None:
    """Copy the model/adapter weight and config files of `src` into `dst` (overwriting)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if item.is_file() and (item.suffix in (".safetensors", ".bin") or item.name.endswith("config.json")):
            shutil.copy2(item, dst / item.name)


def adapter_kwargs(model: Any) -> dict:
    """Save only the trained adapter of a PEFT model (GRPO adds a frozen 'ref' copy)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and len(peft_config) > 1 and "default" in peft_config:
        return {"selected_adapters": ["default"]}
    return {}


def save_final(model: Any, tokenizer: Any, out_dir: Path, best_dir: Path, evaluator: GenerativeEval | None) -> None:
    """Final checkpoint = best held-out checkpoint (or the last weights when there was no eval)."""
    if evaluator is not None and evaluator.best is not None and best_dir.exists():
        copy_adapter(best_dir, out_dir)
    else:
        model.save_pretrained(out_dir, **adapter_kwargs(model))
    tokenizer.save_pretrained(out_dir)
    for folder in (out_dir, best_dir):
        canonical_adapter_config(folder)


def canonical_adapter_config(folder: Path) -> None:
    """Sort the list fields PEFT writes from a set (target_modules): the same adapter writes the same file
    in every process (set order follows PYTHONHASHSEED), so dvc.lock does not change between runs."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(data.get(key), list):
            data[key] = sorted(data[key])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def run_loss(trainer: Any, result: Any = None, resumed: bool = False) -> float:
    """The mean training loss of the whole run: the Trainer's own figure averages only the steps of its last
    `train()` call (0.0 when it resumed at the last step), so a resumed run averages its logged losses instead."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if (resumed or result is None) and losses:
        return float(sum(losses) / len(losses))
    return float(result.training_loss) if result is not None else 0.0
