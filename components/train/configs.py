"""Training configs: dataclasses whose fields carry `help`, the built-in profiles, and how they resolve.

`load_config` resolves an SFTConfig or RLConfig in this order (later wins):

    1. the dataclass defaults below (each field with its help)
    2. conf/params.yaml section `sft:` / `rl:`           (flat `field: value`)
    3. conf/params.yaml `profiles: {<profile>: {sft: {...}, rl: {...}}}` (the only place profiles are defined;
       `components.config.profile_section`)
    4. overrides (`--set sft.learning_rate=1e-4` or `--set learning_rate=1e-4`)

Unknown keys in conf/params.yaml are ignored with a warning (the file is shared with other
stages); unknown override keys are an error that lists the valid ones. `trainer_settings`
turns a config into the TrainingArguments fields SFT and GRPO share.

    python -c "from components.train.configs import load_config; print(load_config('sft', 'quick'))"
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (mutable defaults handled)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SFTConfig:
    """Supervised fine-tuning ("policy warm-up") settings."""

    model: str = _f("smollm2-135m", "base model: registry name (components.model.models.MODELS) or a local folder")
    train_strategy: str = _f("naive", "training prompt strategy spec/slug (components.model.prompts.Strategy.parse)")
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
    patience: int = _f(0, "early stopping: end SFT once held-out macro-F1 has not improved for this many evaluations "
                       "in a row (0 = train the whole budget); the best checkpoint is kept either way")
    min_epochs: float = _f(0.0, "early stopping counts evaluations only after this many epochs: a run never stops "
                           "before min_epochs + patience evaluations (robust to a plateau early in training)")
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
    """Resolve an SFTConfig or RLConfig from profile defaults, conf/params.yaml and overrides.

    Args:
        kind: "sft" or "rl".
        profile: a conf/params.yaml profile with a `kind` section: "quick" (2 CPU cores) or "full" (GPU).
        params: conf/params.yaml content; None reads `<root>/params.yaml` if present.
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
    from components import config as project_config

    cls = CONFIG_CLASSES[kind]
    names = {f.name for f in fields(cls)}
    params = project_config.load_params() if params is None else params
    values: dict[str, Any] = {}
    layers = [params.get(kind) or {}, project_config.profile_section(profile, kind, params)]
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


# Fields added after results were keyed by their config (study cells, trainer run ids, dvc stage keys): at these
# values they train exactly as before the field existed, so the plain dict leaves them out and those keys stay valid.
INERT_DEFAULTS = {"patience": 0, "min_epochs": 0.0}


def asdict_config(config: Any) -> dict[str, Any]:
    """The config as a plain dict (INERT_DEFAULTS fields left out at their inert value)."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {k: v for k, v in data.items() if k not in INERT_DEFAULTS or v != INERT_DEFAULTS[k]}
