"""What a training run shows while it runs: Trainer callbacks that forward logs (to MLflow through `log_fn`),
the held-out generative evaluation that keeps the best adapter, compact progress lines, training curves.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from components.train.checkpoints import adapter_kwargs, read_json, write_json

LogFn = Callable[[dict[str, float], int], None]


def plot_curves(log_history: list[dict], eval_history: list[dict], keys: Sequence[str], path: Path, title: str) -> None:
    """PNG of training curves (each key in `keys` vs step) and held-out macro-F1/accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in keys:
        points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if points:
            axes[0].plot(*zip(*points), label=key, marker=".")
    axes[0].set_xlabel("step")
    axes[0].set_title(title)
    axes[0].legend(fontsize=8)
    if eval_history:
        steps = [h["step"] for h in eval_history]
        axes[1].plot(steps, [h["macro_f1"] for h in eval_history], marker="o", label="macro-F1")
        axes[1].plot(steps, [h["accuracy"] for h in eval_history], marker="s", label="accuracy")
        axes[1].legend(fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out (generative)")
    from components.evaluate.evaluation import save_figure

    save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------- callbacks
def _numbers(logs: dict) -> dict[str, float]:
    return {k: float(v) for k, v in logs.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def make_callbacks(log_fn: LogFn | None, evaluator: "GenerativeEval | None", prefix: str) -> list:
    """The Trainer callbacks: forward logs to `log_fn`, run generative eval."""
    from transformers import TrainerCallback

    class LogForward(TrainerCallback):
        """Sends every Trainer log (loss, reward, lr, ...) to `log_fn` as `<prefix>/<key>`."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if log_fn and logs:
                metrics = {f"{prefix}/{k}": v for k, v in _numbers(logs).items()}
                if metrics:
                    log_fn(metrics, int(state.global_step))

    class EvalHook(TrainerCallback):
        """Generative eval on the held-out slice at step 0 (optional), every N steps, and at the end."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            evaluator.resumed_from = int(state.global_step)
            evaluator.trim(int(state.global_step))  # evaluations after the checkpoint resumed from are redone
            if evaluator.eval_at_start and not evaluator.history:
                evaluator.run(model, int(state.global_step))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = int(state.global_step)
            if evaluator.every > 0 and step % evaluator.every == 0:
                evaluator.run(model, step)
            if evaluator.should_stop and not control.should_training_stop:  # early stopping
                evaluator.log(f"[{evaluator.prefix} step {step}] stopping early: held-out macro-F1 has not "
                              f"improved for {evaluator.stale} evaluations (patience {evaluator.patience}); "
                              f"best step {evaluator.best['step']}")
                control.should_training_stop = True

        def on_train_end(self, args, state, control, model=None, **kwargs):
            step = int(state.global_step)
            if not evaluator.history or evaluator.history[-1]["step"] != step:
                evaluator.run(model, step)

    callbacks = [LogForward()]
    if evaluator is not None:
        callbacks.append(EvalHook())
    return callbacks


SHOWN_KEYS = (("loss", "loss"), ("reward", "reward"), ("zero_variance_groups", "no-signal"), ("kl", "kl"),
              ("learning_rate", "lr"), ("step_time", "s/step"))  # per-step line: these, in this order


def format_step(prefix: str, step: int, total: int, logs: dict) -> str:
    """One short line for a Trainer log.

    Example:
        >>> format_step("sft", 5, 125, {"loss": 0.71234, "learning_rate": 0.0002, "grad_norm": 3.1})
        '[sft 5/125] loss 0.7123  lr 0.0002'
    """
    parts = [f"{label} {logs[key]:.4g}" for key, label in SHOWN_KEYS
             if isinstance(logs.get(key), (int, float)) and not isinstance(logs.get(key), bool)]
    return f"[{prefix} {step}/{total}] " + "  ".join(parts)


def use_compact_progress(trainer: Any, prefix: str) -> None:
    """Replace the Trainer's progress output: a redrawn bar with one short line per log in a terminal;
    in a file (no TTY) no bar, and a line at about every tenth of the run and at the end."""
    import sys

    from tqdm.auto import tqdm
    from transformers import ProgressCallback, TrainerCallback

    tty = sys.stderr.isatty()

    class CompactProgress(TrainerCallback):
        def __init__(self) -> None:
            self.bar, self.last = None, -1

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and tty:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=prefix, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "train_runtime" in logs:
                return
            step, total = int(state.global_step), int(state.max_steps)
            every = max(1, total // 10)
            line = format_step(prefix, step, total, logs)
            if self.bar is not None:
                self.bar.write(line)
            elif step == total or step // every != self.last // every:
                print(line, flush=True)
            self.last = step

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress())


class GenerativeEval:
    """Held-out generative evaluation that keeps the best adapter by macro-F1.

    Each run decodes `examples` with `components.model.decoding.predict` (greedy, strict parse),
    computes `components.evaluate.evaluation.compute_metrics`, appends to `history` (persisted in
    `state_path`, so a resumed run keeps it), reports through `log_fn`, and saves the model
    to `best_dir` when macro-F1 improves (ties keep the earlier checkpoint). With `patience` > 0 training
    stops once that many evaluations in a row after `min_step` have not improved on the best (`should_stop`).
    """

    def __init__(self, builder: Any, tokenizer: Any, examples: list[dict], labels: Sequence[str],
                 best_dir: Path, state_path: Path, every: int, batch_size: int, log_fn: LogFn | None,
                 prefix: str, eval_at_start: bool = False, log: Callable[[str], None] = print,
                 patience: int = 0, min_step: int = 0) -> None:
        self.builder, self.tokenizer, self.examples, self.labels = builder, tokenizer, examples, list(labels)
        self.best_dir, self.state_path = Path(best_dir), Path(state_path)
        self.every, self.batch_size, self.log_fn, self.prefix = every, batch_size, log_fn, prefix
        self.eval_at_start, self.log, self.patience, self.min_step = eval_at_start, log, int(patience), int(min_step)
        self.history: list[dict] = read_json(self.state_path, {}).get("history", [])
        self.resumed_from = 0

    @property
    def best(self) -> dict | None:
        """The best history entry by macro-F1 (earliest on ties)."""
        return max(self.history, key=lambda h: (h["macro_f1"], -h["step"])) if self.history else None

    @property
    def stale(self) -> int:
        """Evaluations since the best one (0 when the latest is the best)."""
        best = self.best
        return sum(1 for h in self.history if h["step"] > best["step"]) if best else 0

    def trim(self, step: int) -> None:
        """Forget evaluations after `step` (a run resumed from an earlier checkpoint evaluates them again)."""
        self.history = [h for h in self.history if h["step"] <= step]

    @property
    def should_stop(self) -> bool:
        """Early stopping: `patience` evaluations in a row without a new best macro-F1, counted only after
        `min_step` (a run is never stopped before it, and gets `patience` evaluations past it)."""
        best = self.best
        if self.patience <= 0 or best is None:
            return False
        return sum(1 for h in self.history if h["step"] > max(best["step"], self.min_step)) >= self.patience

    def run(self, model: Any, step: int) -> dict:
        """Evaluate now; returns the history entry."""
        from components.model.decoding import predict
        from components.evaluate.evaluation import compute_metrics

        start = time.time()
        with eval_mode(model):
            records = predict(model, self.tokenizer, self.builder, self.examples, batch_size=self.batch_size,
                              progress=False)
        metrics = compute_metrics(records, self.labels)
        entry = {"step": step, "accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"]),
                 "invalid_rate": float(metrics.get("invalid_rate", 0.0)), "seconds": round(time.time() - start, 1),
                 "per_label_f1": {lb: float(v.get("f1", 0.0)) if isinstance(v, dict) else float(v)
                                  for lb, v in (metrics.get("per_label") or {}).items()}}
        previous = self.best
        self.history.append(entry)
        if previous is None or entry["macro_f1"] > previous["macro_f1"]:
            model.save_pretrained(self.best_dir, **adapter_kwargs(model))
            write_json(self.best_dir / "step.json", {"step": step})
        write_json(self.state_path, {"history": self.history})
        flat = {f"{self.prefix}/eval_accuracy": entry["accuracy"], f"{self.prefix}/eval_macro_f1": entry["macro_f1"],
                f"{self.prefix}/eval_invalid_rate": entry["invalid_rate"]}
        flat.update({f"{self.prefix}/eval_f1_{lb}": v for lb, v in entry["per_label_f1"].items()})
        self.log(f"[{self.prefix} step {step}] held-out accuracy {entry['accuracy']:.3f} macro-F1 "
                 f"{entry['macro_f1']:.3f} invalid {entry['invalid_rate']:.3f} ({entry['seconds']}s)")
        if self.log_fn:
            self.log_fn(flat, step)
        return entry


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """The model in eval mode inside the block; its train/eval mode is restored after, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def printer(log_fn: LogFn | None = None) -> Callable[[str], None]:
    """A message logger (stdout, flushed)."""
    def _log(message: str) -> None:
        print(message, flush=True)
    return _log


@contextlib.contextmanager
def python_print() -> Iterator[None]:
    """Python's own `print` inside the block, also inside a Prefect task with log_prints.

    Building a TRL trainer maps the dataset; HF datasets fingerprints the map function with dill,
    which reads the function's globals from `dis.dis` output captured by swapping sys.stdout.
    Prefect's print patch forwards `print(..., file=None)` to the run log whatever sys.stdout is, so
    hundreds of bytecode lines landed in the flow log (and dill saw no globals). Outside Prefect
    this is a no-op.
    """
    import builtins
    import sys
    import types

    patched = builtins.print
    if isinstance(patched, types.BuiltinFunctionType):
        yield
        return
    original = getattr(sys.modules.get("prefect.logging.loggers"), "print", None)
    if not isinstance(original, types.BuiltinFunctionType):
        yield
        return
    builtins.print = original
    try:
        yield
    finally:
        builtins.print = patched
