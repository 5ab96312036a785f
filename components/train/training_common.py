"""Shared training pieces: configs and profiles, data slices, callbacks, checkpoints, curves.

Configs are dataclasses whose fields carry `help` metadata. `load_config` resolves them in
this order (later wins):

    1. built-in profile defaults (`PROFILES["quick"|"full"][kind]`, below)
    2. params.yaml section `sft:` / `rl:`           (flat `field: value`)
    3. params.yaml `profiles: {<profile>: {sft: {...}, rl: {...}}}`
    4. overrides (`--set sft.learning_rate=1e-4` or `--set learning_rate=1e-4`)

Unknown keys in params.yaml are ignored with a warning (the file is shared with other
stages); unknown override keys are an error that lists the valid ones.

    python -c "from components.training_common import load_config; print(load_config('sft', 'quick'))"
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

LogFn = Callable[[dict[str, float], int], None]
CONFIG_FILE = "gencls_config.json"
METRICS_FILE = "metrics.json"
RUN_FILE = "gencls_run.json"  # fingerprint of the run inside out_dir/trainer, for safe resume
STAGING_DIR = ".saving"  # a checkpoint is written here, then renamed to checkpoint-N (atomic save)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (mutable defaults handled)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# ----------------------------------------------------------------------------- configs
@dataclass
class SFTConfig:
    """Supervised fine-tuning ("policy warm-up") settings."""

    model: str = _f("smollm2-135m", "base model: registry name (components.models.MODELS) or a local folder")
    train_strategy: str = _f("naive", "training prompt strategy spec/slug (components.prompts.Strategy.parse)")
    lora: bool = _f(True, "train a LoRA adapter (PEFT); false = full fine-tuning")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                              "modules LoRA wraps (Llama names; 'all-linear' also accepted)")
    learning_rate: float = _f(2e-4, "peak learning rate (linear decay after warmup)")
    warmup_ratio: float = _f(0.05, "share of steps spent warming up the learning rate")
    epochs: float = _f(1.0, "passes over the training subsample (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: use epochs)")
    batch_size: int = _f(8, "examples per device step")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_prompt_tokens: int = _f(256, "prompt budget; the example text (only) is truncated to fit")
    train_size: int = _f(1000, "stratified, seeded training subsample (0 = all training data)")
    eval_size: int = _f(100, "held-out slice of the training split for generative eval (0 = none)")
    eval_every_steps: int = _f(50, "generative eval on the held-out slice every N steps (and at the end)")
    eval_batch_size: int = _f(16, "batch size of generative eval")
    save_steps: int = _f(25, "trainer checkpoint (for resume) every N steps")
    rebalance: bool = _f(False, "class-weighted resampling of the training subsample (inverse label frequency)")
    uncertain_policy: str = _f("margin", "with an `uncertain` training strategy: 'margin' relabels the reference "
                               "model's thinnest-margin mistakes as `uncertain`; 'none' never does",
                               choices=("margin", "none"))
    uncertain_margin: float = _f(0.0, "margin rule: candidates have logp(gold) - max logp(other) < this value")
    uncertain_max_share: float = _f(0.1, "margin rule: at most this share of training targets become `uncertain`")
    uncertain_max_scored: int = _f(200, "margin rule: score at most this many training examples (cost cap; 0 = all)")
    logging_steps: int = _f(5, "log loss every N steps")
    seed: int = _f(0, "seed for subsampling, LoRA init and data order")
    bf16: bool = _f(False, "bf16 autocast with fp32 master weights (only used on CUDA)")
    gate_size: int = _f(200, "validation slice the champion gate scores on: training-split examples SFT neither "
                        "trains nor chooses checkpoints on (RL excludes them too); saved as gate.json")
    engine: str = _f("shared-prefix", "SFT step: 'shared-prefix' = the batch's common prompt prefix runs once and "
                     "logits are taken at answer positions only; 'answer-only' = answer logits without the shared "
                     "prefix; 'trl' = TRL's own loss (logits, entropy and token accuracy for every position)",
                     choices=("shared-prefix", "answer-only", "trl"))
    token_metrics: bool = _f(False, "log the answer tokens' entropy and top-1 accuracy every step (a full-vocab pass)")
    group_by_length: bool = _f(True, "batches of similar prompt length (less padding; transformers' length sampler)")


@dataclass
class RLConfig:
    """GRPO settings (starts from the SFT checkpoint)."""

    train_strategy: str = _f("", "prompt strategy for RL prompts; empty = the SFT run's strategy")
    num_generations: int = _f(4, "completions sampled per prompt (group size)")
    max_completion_length: int = _f(8, "max new tokens per completion (direct answers need ~3)")
    beta: float = _f(0.04, "KL coefficient against the frozen SFT policy (0 = no reference model)")
    temperature: float = _f(1.0, "sampling temperature for completions")
    learning_rate: float = _f(2e-5, "learning rate of the (continued) LoRA adapter")
    max_steps: int = _f(30, "optimizer steps")
    batch_size: int = _f(16, "completions per step (= prompts per step * num_generations)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_prompt_tokens: int = _f(256, "prompt budget; the example text (only) is truncated to fit")
    train_size: int = _f(400, "stratified, seeded prompt pool from the training split (0 = all)")
    eval_size: int = _f(100, "held-out slice of the training split for generative eval (0 = none)")
    eval_every: int = _f(15, "generative eval every N steps (also at step 0 and at the end)")
    eval_batch_size: int = _f(16, "batch size of generative eval")
    save_steps: int = _f(10, "trainer checkpoint (for resume) every N steps")
    uncertain_reward: float = _f(0.5, "reward for `uncertain` when the strategy offers it (0 < r < 1)")
    invalid_penalty: float = _f(-0.5, "reward for output outside the label set (empty, 'A or B', extra text)")
    wrong_reward: float = _f(0.0, "reward for a wrong but valid label")
    format_reward: float = _f(0.2, "weight of the <think>...</think> format reward (reasoning strategies only)")
    logging_steps: int = _f(1, "log rewards every N steps")
    seed: int = _f(0, "seed for subsampling, the focus's draw of prompts, sampling and data order")
    bf16: bool = _f(False, "bf16 autocast with fp32 master weights (only used on CUDA)")
    focus: str = _f("informative", "RL prompts: 'informative' = those whose groups are least likely to get one "
                    "reward for every completion under the SFT policy (no learning signal); 'all' = a random draw",
                    choices=("informative", "all"))
    engine: str = _f("group-shared", "GRPO passes: 'group-shared' = each prompt's forward runs once for its G "
                     "completions (generation, policy and reference log-probs); 'trl' = one copy per completion",
                     choices=("group-shared", "trl"))
    focus_candidates: int = _f(0, "informative focus scores this many random prompts (0 = 4x the prompts the "
                               "steps use)")


CONFIG_CLASSES: dict[str, type] = {"sft": SFTConfig, "rl": RLConfig}

# Built-in profiles. quick: trec6 on SmolLM2, 2 CPU cores, `make run` <= 10 min. Measured with the
# shared-prefix engine (`gencls bench train`, idle 2-core machine): ~1.9 s per SFT step of 8 trec6
# prompts (TRL's own loss: ~4.7 s), so 1,000 examples = 125 steps ~ 4 min; a group-shared GRPO
# step of 8 completions ~4 s (TRL's: ~9.5 s): 16 steps ~ 1 min.
# full: a GPU, all training data, more RL steps.
PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {"sft": {"train_size": 1000},
              "rl": {"max_steps": 16, "batch_size": 8, "eval_every": 8, "eval_size": 60}},
    "full": {
        "sft": {"train_size": 0, "eval_size": 500, "epochs": 2.0, "batch_size": 32, "eval_every_steps": 200,
                "eval_batch_size": 64, "save_steps": 200, "bf16": True, "uncertain_max_scored": 0,
                "logging_steps": 10},
        "rl": {"train_size": 0, "eval_size": 500, "max_steps": 500, "num_generations": 8, "batch_size": 64,
               "eval_every": 100, "eval_batch_size": 64, "save_steps": 100, "bf16": True, "logging_steps": 5},
    },
}


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Coerce an override/params value to the declared type of `cls.key`; ValueError naming the key otherwise.

    Example:
        >>> _coerce(SFTConfig, "max_steps", "abc")
        Traceback (most recent call last):
        ...
        ValueError: SFTConfig.max_steps='abc': expected a whole number
    """
    import yaml

    kinds = {f.name: f for f in fields(cls)}
    ftype = kinds[key].type if isinstance(kinds[key].type, str) else kinds[key].type.__name__
    if isinstance(value, str) and ftype != "str":
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            pass  # reported below as the wrong kind of value
    where = f"{cls.__name__}.{key}={value!r}"
    if ftype == "float" and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads "3e-4" (no dot) as a string
        except ValueError:
            raise ValueError(f"{where}: expected a number") from None
    if ftype == "float":
        raise ValueError(f"{where}: expected a number")
    if ftype == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{where}: expected a whole number")
    if ftype == "bool" and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false")
    if ftype == "list" and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if ftype == "str" and value is not None and not isinstance(value, str):
        return str(value)
    choices = kinds[key].metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"{where}: expected one of {', '.join(choices)}")
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """Turn `["sft.learning_rate=1e-4", "beta=0"]` into a dict (values stay strings)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value, e.g. sft.learning_rate=1e-4")
        out[key.strip()] = value.strip()
    return out


def load_config(kind: str, profile: str = "quick", params: dict | None = None,
                overrides: dict[str, Any] | None = None) -> Any:
    """Resolve an SFTConfig or RLConfig from profile defaults, params.yaml and overrides.

    Args:
        kind: "sft" or "rl".
        profile: "quick" (2 CPU cores) or "full" (GPU).
        params: params.yaml content; None reads `<root>/params.yaml` if present.
        overrides: `{"learning_rate": "1e-4"}` or `{"sft.learning_rate": ...}`; keys for the
            other kind (e.g. `rl.beta` while resolving sft) are skipped.

    Returns:
        The config dataclass instance.

    Example:
        >>> load_config("rl", "quick", params={}, overrides={"rl.beta": "0"}).beta
        0.0
    """
    if kind not in CONFIG_CLASSES:
        raise ValueError(f"config kind {kind!r}: expected one of {', '.join(CONFIG_CLASSES)}")
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r}: expected one of {', '.join(PROFILES)}")
    from components import config as project_config

    cls = CONFIG_CLASSES[kind]
    names = {f.name for f in fields(cls)}
    params = project_config.load_params() if params is None else params
    values: dict[str, Any] = dict(PROFILES[profile][kind])
    layers = [params.get(kind) or {}, ((params.get("profiles") or {}).get(profile) or {}).get(kind) or {}]
    for layer in layers:
        for key, value in layer.items():
            if key in names:
                values[key] = value
            else:
                warnings.warn(f"params.yaml: {kind}.{key} is not an {cls.__name__} field; ignored", stacklevel=2)
    for key, value in (overrides or {}).items():
        prefix, _, name = key.rpartition(".")
        if prefix and prefix != kind:
            if prefix in CONFIG_CLASSES:
                continue
            raise ValueError(f"override {key!r}: prefix must be one of {', '.join(CONFIG_CLASSES)}")
        if name not in names:
            raise ValueError(f"override {key!r}: unknown {cls.__name__} field; valid: {', '.join(sorted(names))}")
        values[name] = value
    return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def config_help(kind: str) -> str:
    """One line per field: name, default and help (for `--help` epilogs and docs)."""
    cls = CONFIG_CLASSES[kind]
    return "\n".join(f"  {f.name} (default {getattr(cls(), f.name)!r}): {f.metadata.get('help', '')}"
                     for f in fields(cls))


# ----------------------------------------------------------------------------- data slices
def stratified_sample(examples: Sequence[dict], n: int, seed: int, min_per_label: int = 0) -> list[dict]:
    """A seeded sample of `n` examples keeping label proportions (largest-remainder rounding).

    n <= 0 or n >= len(examples) returns all examples (shuffled with the seed). With
    `min_per_label`, every label keeps at least that many (or all it has, or n // labels when
    the floors alone would exceed n), taken from the largest labels' quotas.
    """
    rng = random.Random(seed)
    items = list(examples)
    if n <= 0 or n >= len(items):
        rng.shuffle(items)
        return items
    by_label: dict[str, list[dict]] = defaultdict(list)
    for ex in items:
        by_label[ex["label"]].append(ex)
    quotas = {label: n * len(group) / len(items) for label, group in by_label.items()}
    counts = {label: int(q) for label, q in quotas.items()}
    for label in sorted(quotas, key=lambda lb: (counts[lb] - quotas[lb], lb))[: n - sum(counts.values())]:
        counts[label] += 1
    floor = min(min_per_label, n // len(by_label))
    floors = {label: min(floor, len(group)) for label, group in by_label.items()}
    for label in by_label:
        while counts[label] < floors[label]:
            donor = max(counts, key=lambda lb: (counts[lb] - floors[lb], lb))
            counts[donor] -= 1
            counts[label] += 1
    chosen = []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        chosen += group[: counts[label]]
    rng.shuffle(chosen)
    return chosen


def split_train_eval(examples: Sequence[dict], train_size: int, eval_size: int, seed: int) -> tuple[list, list]:
    """Held-out eval slice (stratified) first, then the training subsample from the rest."""
    held = stratified_sample(examples, eval_size, seed + 1) if eval_size > 0 else []
    held_ids = {ex["id"] for ex in held}
    rest = [ex for ex in examples if ex["id"] not in held_ids]
    return stratified_sample(rest, train_size, seed), held


def rebalance(examples: Sequence[dict], seed: int) -> list[dict]:
    """Class-balanced resampling: same size, every label gets an equal share of the rows.

    Each label's quota (n / K, remainder to the rarest labels) is filled by cycling through a
    seeded shuffle of its examples: minority examples repeat, majority ones are subsampled.
    This is what a WeightedRandomSampler with weights 1 / label frequency does in expectation,
    without its variance, and it keeps the data order deterministic for resume.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for ex in examples:
        by_label[ex["label"]].append(ex)
    labels = sorted(by_label, key=lambda lb: (len(by_label[lb]), lb))
    n, k = len(examples), len(labels)
    out: list[dict] = []
    for i, label in enumerate(labels):
        group = list(by_label[label])
        rng.shuffle(group)
        quota = n // k + (1 if i < n % k else 0)
        out += [group[j % len(group)] for j in range(quota)]
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------- files
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
    """Short sha256 of a JSON-serialisable object (config identity for resume)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    trainer_dir = Path(trainer_dir)
    info = read_json(trainer_dir / RUN_FILE, {})
    checkpoints = sorted(trainer_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: int(p.name.split("-")[-1])) \
        if trainer_dir.exists() else []
    if checkpoints and info.get("run_id") != run_id:
        log(f"{trainer_dir}: checkpoints from a different config; starting over")
        shutil.rmtree(trainer_dir)
        checkpoints = []
    elif trainer_dir.exists() and info.get("run_id") != run_id:
        shutil.rmtree(trainer_dir)
    trainer_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(trainer_dir / STAGING_DIR, ignore_errors=True)  # a save that was killed before its rename
    write_json(trainer_dir / RUN_FILE, {"run_id": run_id})
    for folder in reversed(checkpoints):
        problem = checkpoint_problem(folder)
        if problem is None:
            log(f"resuming from {folder}")
            return str(folder)
        log(f"skipping {folder}: {problem}; removed, falling back to the previous checkpoint")
        shutil.rmtree(folder, ignore_errors=True)
    return None


def with_atomic_checkpoints(trainer_class: type) -> type:
    """`trainer_class` with `AtomicCheckpoints` in front (same name, same behaviour otherwise)."""
    return type(trainer_class.__name__, (AtomicCheckpoints, trainer_class), {})


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is written under `<output>/.saving/` and renamed into place.

    A kill during a save leaves no half-written `checkpoint-N` (only `.saving/`, which
    `resume_checkpoint` clears); old checkpoints are rotated after the rename.
    """

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
            if evaluator.eval_at_start and not evaluator.history:
                evaluator.run(model, int(state.global_step))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = int(state.global_step)
            if evaluator.every > 0 and step % evaluator.every == 0:
                evaluator.run(model, step)

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

    Each run decodes `examples` with `components.decoding.predict` (greedy, strict parse),
    computes `components.evaluation.compute_metrics`, appends to `history` (persisted in
    `state_path`, so a resumed run keeps it), reports through `log_fn`, and saves the model
    to `best_dir` when macro-F1 improves (ties keep the earlier checkpoint).
    """

    def __init__(self, builder: Any, tokenizer: Any, examples: list[dict], labels: Sequence[str],
                 best_dir: Path, state_path: Path, every: int, batch_size: int, log_fn: LogFn | None,
                 prefix: str, eval_at_start: bool = False, log: Callable[[str], None] = print) -> None:
        self.builder, self.tokenizer, self.examples, self.labels = builder, tokenizer, examples, list(labels)
        self.best_dir, self.state_path = Path(best_dir), Path(state_path)
        self.every, self.batch_size, self.log_fn, self.prefix = every, batch_size, log_fn, prefix
        self.eval_at_start, self.log = eval_at_start, log
        self.history: list[dict] = read_json(self.state_path, {}).get("history", [])
        self.resumed_from = 0

    @property
    def best(self) -> dict | None:
        """The best history entry by macro-F1 (earliest on ties)."""
        return max(self.history, key=lambda h: (h["macro_f1"], -h["step"])) if self.history else None

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
            model.save_pretrained(self.best_dir, **_adapter_kwargs(model))
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


def _adapter_kwargs(model: Any) -> dict:
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
        model.save_pretrained(out_dir, **_adapter_kwargs(model))
    tokenizer.save_pretrained(out_dir)


def device_settings(bf16: bool) -> dict[str, Any]:
    """TrainingArguments fields for this machine: fp32 on CPU; bf16 autocast only on CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    return {"bf16": bool(bf16 and cuda), "fp16": False, "use_cpu": not cuda, "gradient_checkpointing": False,
            "report_to": "none", "dataloader_num_workers": 0, "save_strategy": "steps", "save_total_limit": 2,
            "eval_strategy": "no", "disable_tqdm": False}


def trainer_settings(config: Any, trainer_dir: Path) -> dict[str, Any]:
    """TrainingArguments fields SFT and GRPO share: output, budget, logging, seeds, device."""
    return {"output_dir": str(trainer_dir), "max_steps": config.max_steps,
            "per_device_train_batch_size": config.batch_size, "gradient_accumulation_steps": config.grad_accum,
            "learning_rate": config.learning_rate, "logging_steps": config.logging_steps,
            "save_steps": config.save_steps, "seed": config.seed, "data_seed": config.seed,
            **device_settings(config.bf16)}


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


def asdict_config(config: Any) -> dict[str, Any]:
    """The config as a plain dict."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
