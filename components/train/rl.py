"""RL with TRL's GRPOTrainer, starting from the SFT checkpoint ("policy warm-up").

    gencls train rl --dataset trec6 --profile quick [--from-sft checkpoints/trec6/sft] [--set rl.beta=0]

Choice: the SFT LoRA adapter is loaded trainable and GRPO continues training that same
adapter. With beta > 0, TRL copies it into a frozen "ref" adapter, so the KL term is taken
against the SFT policy (not the raw base model), and the result is again one adapter on
the base model: `gencls evaluate --adapter checkpoints/<d>/rl` works like for SFT. (A
full-fine-tuned SFT folder is trained in full, with a reference copy when beta > 0.)

Rewards (components.train.rewards): 1 gold label, `uncertain_reward` for `uncertain` when the
strategy offers it, `wrong_reward` for another label, `invalid_penalty` otherwise; in
reasoning mode a weighted format reward for `<think>...</think>` then the answer. The share
of prompt groups with zero reward variance (no learning signal) is logged as
`rl/zero_variance_groups` (and TRL's own `frac_reward_zero_std`).

Prompt focus (`focus: informative`, the default): a group whose completions all get the same
reward has zero advantage and teaches nothing, and after SFT most prompts are such groups (the
policy is sure and right). Before training, the SFT policy scores the label candidates of a
random draw of prompts (4x what the steps use); with P(r) the policy's probability of an answer
whose reward is r (gold, `uncertain`, a wrong label; the rest of the mass is invalid text), the
chance a group of G gets no contrast is the sum of P(r)^G. The prompts with the lowest chance are
kept (like DAPO's dynamic sampling, decided once up front) and saved in focus.json for a resume.
`focus: all` is a random draw. max_completion_length is raised to fit the longest answer.

The held-out slice is decoded at step 0 (the SFT policy), every eval_every steps and at the
end; the kept adapter is the best by macro-F1, so RL never hands back a policy that is worse
on held-out data than the one it started from.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from components.config import RUN_INFO_FILE, portable, run_info, stable
from components.train.checkpoints import (
    CONFIG_FILE,
    METRICS_FILE,
    fingerprint,
    library_versions,
    read_json,
    resume_checkpoint,
    run_loss,
    seconds_spent,
    save_final,
    with_atomic_checkpoints,
    write_json,
)
from components.train.callbacks import (
    GenerativeEval,
    LogFn,
    eval_mode,
    use_compact_progress,
    make_callbacks,
    plot_curves,
    printer,
    python_print,
)
from components.train.configs import (
    RLConfig,
    asdict_config,
    trainer_settings,
    load_config,
)

FOCUS_FILE = "focus.json"  # the prompts the focus kept (reused when a run resumes)

__all__ = ["RLConfig", "load_config", "train_rl", "load_policy", "focus_examples", "no_signal_chance"]


def load_policy(sft_dir: Path) -> tuple[Any, Any, dict]:
    """(trainable policy, tokenizer, SFT gencls_config) from an SFT output folder."""
    from components.model.models import load_model

    sft_dir = Path(sft_dir)
    sft_info = read_json(sft_dir / CONFIG_FILE, {})
    if (sft_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base = sft_info.get("base_model") or json.loads((sft_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        model, tokenizer = load_model(base)
        if (sft_dir / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(sft_dir)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        model = PeftModel.from_pretrained(model, str(sft_dir), is_trainable=True)
    elif (sft_dir / "config.json").exists():
        model, tokenizer = load_model(str(sft_dir))
    else:
        raise FileNotFoundError(f"{sft_dir}: no SFT adapter or model here; run `gencls train sft` first")
    tokenizer.padding_side = "left"
    model.train()
    return model, tokenizer, sft_info


def prompts_per_run(config: RLConfig) -> int:
    """Distinct prompts GRPO draws over the run (one process, one iteration per generation):
    steps x completions per step / group size, as TRL's RepeatSampler draws them."""
    return max(1, config.max_steps * config.batch_size * config.grad_accum // max(config.num_generations, 1))


def no_signal_chance(probs: np.ndarray, rewards: np.ndarray, invalid_reward: float, num_generations: int) -> np.ndarray:
    """Chance that a group of `num_generations` sampled answers all get the same reward (zero advantage).

    Args:
        probs: [n, K] probability of sampling each candidate answer (rows sum to <= 1; the rest is
            text outside the label set).
        rewards: [n, K] reward of each candidate answer for that row's gold label.
        invalid_reward: reward of text outside the label set.
        num_generations: group size G.

    Returns:
        [n]: sum over distinct rewards r of P(reward = r)^G.

    Example:
        >>> no_signal_chance(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.0]]), -0.5, 2)
        array([0.5, 1. ])
    """
    out = np.zeros(len(probs))
    for i, (row, reward_row) in enumerate(zip(np.asarray(probs, dtype=np.float64), np.asarray(rewards))):
        mass: dict[float, float] = {float(invalid_reward): max(0.0, 1.0 - float(row.sum()))}
        for p, r in zip(row, reward_row):
            mass[float(r)] = mass.get(float(r), 0.0) + float(p)
        out[i] = sum(m**num_generations for m in mass.values())
    return out


def pick_informative(chances: np.ndarray, keep: int) -> list[int]:
    """Indices of the `keep` lowest no-signal chances, in their original order (stable on ties).

    Example:
        >>> pick_informative(np.array([0.9, 0.1, 0.5, 0.1]), 2)
        [1, 3]
    """
    chosen = np.argsort(np.asarray(chances), kind="stable")[:keep]
    return sorted(int(i) for i in chosen)


def focus_examples(model: Any, tokenizer: Any, builder: Any, examples: list[dict], config: RLConfig,
                   log: Any = print) -> tuple[list[dict], dict[str, float]]:
    """The RL examples `config.focus` keeps, and what the selection measured (`focus_*` stats).

    'informative': a seeded random draw of max(`focus_candidates` or 4x, 1x) `prompts_per_run`
    examples is scored by the policy (`score_gold`: each answer's probability at temperature 1,
    the rest of the mass = invalid text); the `prompts_per_run` with the lowest
    `no_signal_chance` under the label reward are kept. Nothing is scored when the pool is no
    larger than the run needs, or for reasoning strategies (the policy thinks before answering,
    so a bare answer's probability says little).
    """
    from components.model.scoring import score_gold
    from components.train.rewards import make_label_reward

    need = prompts_per_run(config)
    if config.focus == "all" or len(examples) <= need or builder.strategy.reasoning:
        return examples, {}
    started = time.time()
    n = min(len(examples), max(need, config.focus_candidates or 4 * need))
    candidates = random.Random(config.seed).sample(examples, n)
    answers = builder.space.answers
    with eval_mode(model):
        scores, gold = score_gold(model, tokenizer, builder, candidates, answers, config.eval_batch_size)
    reward = make_label_reward(builder, config.uncertain_reward, config.invalid_penalty, config.wrong_reward)
    rewards = np.array([reward(answers, label=[ex["label"]] * len(answers)) for ex in candidates])
    chances = no_signal_chance(np.exp(scores), rewards, config.invalid_penalty, config.num_generations)
    kept = pick_informative(chances, need)
    stats = {"focus_scored": float(n), "focus_kept": float(len(kept)),
             "focus_policy_accuracy": float((scores.argmax(axis=1) == gold).mean()),
             "focus_no_signal_scored": float(chances.mean()), "focus_no_signal_kept": float(chances[kept].mean()),
             "focus_seconds": round(time.time() - started, 1)}
    log(f"RL focus: kept {len(kept)} of {n} scored prompts; expected share of groups with no learning signal "
        f"{stats['focus_no_signal_scored']:.2f} -> {stats['focus_no_signal_kept']:.2f} ({stats['focus_seconds']} s)")
    return [candidates[i] for i in kept], stats


def cached_focus(model: Any, tokenizer: Any, builder: Any, examples: list[dict], config: RLConfig, path: Path,
                 key_data: dict, log: Any = print) -> tuple[list[dict], dict[str, float]]:
    """`focus_examples`, remembered in `path` so a resumed run trains on the same prompts without
    scoring again (the key: config, pool ids and `key_data`, e.g. the SFT adapter)."""
    key = fingerprint({"config": asdict_config(config), "pool": [ex["id"] for ex in examples], **key_data})
    saved = read_json(path, {})
    if saved.get("key") == key:
        by_id = {ex["id"]: ex for ex in examples}
        log(f"RL focus: the {len(saved['ids'])} prompts chosen before ({path})")
        return [by_id[i] for i in saved["ids"]], saved["stats"]
    kept, stats = focus_examples(model, tokenizer, builder, examples, config, log)
    write_json(path, {"key": key, "ids": [ex["id"] for ex in kept], "stats": stable(stats)})
    return kept, stats


def fit_completion_budget(config: RLConfig, tokenizer: Any, builder: Any, log: Any = print) -> RLConfig:
    """The config with max_completion_length raised to the longest answer (+ end of turn) when a
    direct-answer budget is too short to write it (20newsgroups' comp.sys.ibm.pc.hardware is 10 tokens)."""
    from components.model.scoring import candidate_ids

    longest = max(len(ids) for ids in candidate_ids(tokenizer, builder.space.answers))
    if builder.strategy.reasoning or config.max_completion_length >= longest:
        return config
    log(f"RL: max_completion_length {config.max_completion_length} cannot hold the longest answer "
        f"({longest} tokens with the end of turn); raised to {longest}")
    return dataclasses.replace(config, max_completion_length=longest)


def build_grpo_trainer(model: Any, tokenizer: Any, rows: list[dict], reward_funcs: list, weights: list[float],
                       config: RLConfig, trainer_dir: Path, callbacks: list = ()):
    """A GRPOTrainer over prompt rows (`prompt`, `label`); `config.engine='group-shared'` (default) runs each
    prompt once for its group (`components.train.engine`), 'trl' is TRL's own trainer."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        **trainer_settings(config, trainer_dir),
        lr_scheduler_type="constant",
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        temperature=config.temperature,
        beta=config.beta,
        reward_weights=weights,
        log_completions=False,
        disable_dropout=True,  # sampling, reference and policy must be one function (LoRA dropout adds noise and time)
    )
    trainer_class = GRPOTrainer
    if config.engine == "group-shared":
        from components.train.grpo_engine import make_grpo_trainer_class

        trainer_class = make_grpo_trainer_class()
    trainer_class = with_atomic_checkpoints(trainer_class)
    with python_print():  # TRL maps the dataset: no bytecode in a Prefect run's log
        return trainer_class(model=model, reward_funcs=reward_funcs, args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=list(callbacks))


def train_rl(dataset: str, config: RLConfig | None = None, sft_dir: str | Path | None = None,
             out_dir: str | Path | None = None, log_fn: LogFn | None = None,
             data_dir: str | Path | None = None, select_strategy: str | None = None) -> Path:
    """GRPO from the SFT checkpoint; returns the folder of the kept (best) adapter.

    Args:
        dataset: dataset name.
        config: RLConfig; default: the quick profile (with conf/params.yaml).
        sft_dir: SFT output folder; default checkpoints/<dataset>/sft.
        out_dir: output folder; default checkpoints/<dataset>/rl.
        log_fn: `log_fn(metrics, step)` receives rewards, KL, zero-variance share, held-out metrics.
        data_dir: folder holding the datasets; default data/.
        select_strategy: the inference strategy the kept adapter will be used with (its decoding,
            demonstrations, ...): the held-out slice is decoded that way to pick the checkpoint.
            Default: the training strategy (generative).

    Returns:
        out_dir (adapter safetensors + tokenizer + gencls_config.json + metrics.json).
    """
    from components import config as project_config
    from components.model.prompts import Strategy
    from components.train.rewards import build_rewards
    from components.train.sft import load_data, make_builder, read_gate, require_valid_data

    config = config or load_config("rl", "quick")
    log = printer()
    require_valid_data(dataset, data_dir)
    root = project_config.checkpoints_dir() / dataset
    sft_dir = Path(sft_dir) if sft_dir else root / "sft"
    out_dir = Path(out_dir) if out_dir else root / "rl"
    started = time.time()

    model, tokenizer, sft_info = load_policy(sft_dir)
    strategy = Strategy.parse(config.train_strategy or sft_info.get("train_strategy") or "naive")
    labels, train, held, pool = load_data(dataset, data_dir, config.train_size, config.eval_size, config.seed)
    gate_ids, gate_is_selection = read_gate(sft_dir)  # the champion gate's slice (sft.gate_slice): never trained on
    train = [ex for ex in train if ex["id"] not in gate_ids]
    if not gate_is_selection:  # a separate gate slice is never selected on either; when SFT had to use its own
        held = [ex for ex in held if ex["id"] not in gate_ids]  # selection slice as the gate, RL selects on it too
    if not held:
        log("RL: no held-out examples to choose a checkpoint on: the last step is kept")
    builder = make_builder(tokenizer, labels, strategy, pool, config.max_prompt_tokens, config.seed)
    config = fit_completion_budget(config, tokenizer, builder, log)
    train, focus_stats = cached_focus(model, tokenizer, builder, train, config, out_dir / FOCUS_FILE,
                                      {"sft": portable(sft_dir), "sft_config": sft_info}, log)
    builder.truncated = 0
    rows = [{"prompt": builder.prompt(ex), "label": ex["label"]} for ex in train]
    log(f"RL {dataset}: {len(rows)} prompts ({builder.truncated} truncated), {len(held)} held out, "
        f"strategy {strategy.slug()}, from {sft_dir}")
    if log_fn and focus_stats:
        log_fn({f"rl/{k}": v for k, v in focus_stats.items()}, 0)
    funcs, weights = build_rewards(builder, config.uncertain_reward, config.invalid_penalty, config.wrong_reward,
                                   config.format_reward, num_generations=config.num_generations)

    select = Strategy.parse(select_strategy) if select_strategy else strategy
    run_id = fingerprint({"kind": "rl", "dataset": dataset, "config": asdict_config(config), "sft": portable(sft_dir),
                          "sft_config": sft_info, "rows": fingerprint(rows), "held": [ex["id"] for ex in held],
                          **({"select": select.slug()} if select != strategy else {})})
    trainer_dir, best_dir = out_dir / "trainer", out_dir / "best"
    resume = resume_checkpoint(trainer_dir, run_id, log)
    started -= seconds_spent(resume)  # a resumed run's seconds include what its earlier attempts spent
    evaluator = None
    if held:
        eval_builder = make_builder(tokenizer, labels, select, pool, config.max_prompt_tokens, config.seed)
        log(f"RL checkpoint selection: {len(held)} held-out examples decoded as {select.slug()}")
        evaluator = GenerativeEval(eval_builder, tokenizer, held, list(labels), best_dir,
                                   trainer_dir / "eval_history.json", config.eval_every, config.eval_batch_size,
                                   log_fn, "rl", eval_at_start=True, log=log)
    trainer = build_grpo_trainer(model, tokenizer, rows, funcs, weights, config, trainer_dir,
                                 make_callbacks(log_fn, evaluator, "rl"))
    trainer.gencls_started = started  # each checkpoint records the seconds spent so far
    use_compact_progress(trainer, "rl")
    result = trainer.train(resume_from_checkpoint=resume)

    save_final(trainer.model, tokenizer, out_dir, best_dir, evaluator)
    history = evaluator.history if evaluator else []
    reward_keys = [k for k in ("reward", "rewards/label_reward/mean", "zero_variance_groups", "frac_reward_zero_std",
                               "kl") if any(k in h for h in trainer.state.log_history)]
    metrics = {
        "kind": "rl", "dataset": dataset, "train_loss": run_loss(trainer, result, resumed=bool(resume)),
        "global_step": int(trainer.state.global_step),
        "resumed_from_step": evaluator.resumed_from if evaluator else (int(resume.rsplit("-", 1)[-1]) if resume else 0),
        "eval_history": history, "best": evaluator.best if evaluator else None, "select_strategy": select.slug(),
        "seconds": round(time.time() - started, 1), "truncated_rows": builder.truncated, **focus_stats,
        "train_history": [{k: h[k] for k in ["step", *reward_keys] if k in h}
                          for h in trainer.state.log_history if "reward" in h],
    }
    write_json(out_dir / METRICS_FILE, stable(metrics))  # timings go to run.json (not part of the output)
    write_json(out_dir / RUN_INFO_FILE, run_info(metrics))
    write_json(out_dir / CONFIG_FILE, {
        "kind": "rl", "dataset": dataset, "base_model": sft_info.get("base_model"), "strategy": strategy.slug(),
        "train_strategy": strategy.slug(), "select_strategy": select.slug(), "sft_dir": portable(sft_dir),
        "sft_config": sft_info.get("config"),
        "config": asdict_config(config), "libraries": library_versions(),
        "best_step": (evaluator.best or {}).get("step") if evaluator else None,
    })
    plot_curves(trainer.state.log_history, history, reward_keys, out_dir / "reward_curve.png",
                f"GRPO rewards ({dataset})")
    best = metrics["best"]
    if best:
        log(f"RL done in {metrics['seconds']}s: best held-out step {best['step']} accuracy {best['accuracy']:.3f} "
            f"macro-F1 {best['macro_f1']:.3f} -> {out_dir}")
    return out_dir
