"""Training speed benchmark: each SFT path and the GRPO step against a raw LoRA forward+backward.

    gencls bench train --dataset trec6 [--strategy naive] [--model smollm2-135m] [--n 64] [--batch-size 8]

On real prompts of the dataset (the first --n training examples after a seeded shuffle,
rendered with --strategy exactly as `gencls train sft` renders them), in one run:

1. reference: a plain LoRA forward+backward (HF causal-LM loss, logits for every position)
   over the same padded batches, no optimizer: tokens/s and examples/s;
2. every SFT path (`sft.engine`: trl = TRL's own SFTTrainer loss, answer-only,
   shared-prefix), as full Trainer optimizer steps over the same examples: examples/s, its
   ratio to the reference and to the `trl` path; the first step of each is a warm-up and
   the figures use the median step (a shared machine has transient slowdowns of +-20%);
3. GRPO (with --grpo-steps > 0): completions/s of a step, TRL's GRPOTrainer vs the
   group-shared one, at each --generations group size; the policy is the SFT adapter in
   --sft-dir when there is one (short answers, like in the pipeline), else a fresh LoRA.

Not a timed test: other work on the machine changes the figures; run it on an idle machine.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

SFT_ENGINES = ("trl", "answer-only", "shared-prefix")


def _sft_rows(dataset: str, strategy: str, n: int, tokenizer: Any, max_prompt_tokens: int, seed: int) -> list[dict]:
    """Prompt/completion rows of `n` training examples, rendered as `train_sft` renders them."""
    from components.model.prompts import Strategy
    from components.train.sft import build_sft_rows, load_data, make_builder

    labels, train, _, pool = load_data(dataset, None, n, 0, seed)
    builder = make_builder(tokenizer, labels, Strategy.parse(strategy), pool, max_prompt_tokens, seed)
    return build_sft_rows(builder, train[:n])


def _tokenize(tokenizer: Any, rows: list[dict]) -> list[dict]:
    """input_ids + labels (-100 on the prompt), as TRL prepares prompt/completion rows."""
    out = []
    for row in rows:
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return out


def reference_rate(model: Any, tokenized: list[dict], batch_size: int, pad_id: int) -> dict:
    """Raw LoRA forward+backward over right-padded batches (no optimizer); the first batch warms up; rates
    from the median batch."""
    import torch

    import statistics

    batches = [tokenized[i:i + batch_size] for i in range(0, len(tokenized), batch_size)]
    real = padded = 0
    seconds: list[float] = []
    for k, batch in enumerate(batches):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in batch])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in batch])
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        if k:
            seconds.append(time.perf_counter() - start)
            real += int(mask.sum())
            padded += ids.numel()
    step = statistics.median(seconds)
    examples_per_batch = sum(len(b) for b in batches[1:]) / len(seconds)
    return {"tokens_per_s": real / len(seconds) / step, "examples_per_s": examples_per_batch / step,
            "padding": 1 - real / padded}


class StepTimer:
    """A TrainerCallback-like timer: seconds of every optimizer step; figures use the median of the steps
    after the first (warm-up), robust to a transient slowdown of a shared machine."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer._start)

        return _Timer()

    @property
    def step(self) -> float:
        """Median seconds per step, the warm-up step excluded."""
        import statistics

        return statistics.median(self.times[1:])


def sft_rate(model_name: str, rows: list[dict], engine: str, batch_size: int, seed: int) -> dict:
    """Examples/s of `gencls train sft`'s Trainer with `engine`, steps 2.. of one epoch over `rows`."""
    from components.model.models import load_model
    from components.train.sft import build_trainer
    from components.train.configs import load_config

    model, tokenizer = load_model(model_name)
    model.train()
    config = load_config("sft", "quick", params={}, overrides={
        "engine": engine, "batch_size": str(batch_size), "max_steps": str(len(rows) // batch_size),
        "save_steps": "100000", "logging_steps": "100000", "seed": str(seed), "warmup_ratio": "0"})
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="gencls-bench-") as tmp:
        trainer = build_trainer(model, tokenizer, rows, config, Path(tmp), [timer.callback()])
        trainer.args.disable_tqdm = True
        trainer.train()
    return {"engine": engine, "steps": len(timer.times) - 1, "examples_per_s": batch_size / timer.step,
            "seconds_per_step": timer.step}


def grpo_rate(model_name: str, dataset: str, strategy: str, n_prompts: int, generations: int, steps: int,
              engine: str, sft_dir: Path | None, seed: int) -> dict:
    """Completions/s of GRPO steps 2..steps+1 with `engine` (2 prompts x `generations` per step)."""
    from components.model.prompts import Strategy
    from components.train.rewards import build_rewards
    from components.train.rl import build_grpo_trainer, fit_completion_budget, load_policy
    from components.train.sft import load_data, make_builder
    from components.train.configs import load_config

    if sft_dir is not None:
        model, tokenizer, _ = load_policy(sft_dir)
    else:
        from peft import get_peft_model

        from components.model.models import load_model
        from components.train.sft import lora_config

        model, tokenizer = load_model(model_name)
        model = get_peft_model(model, lora_config(load_config("sft", "quick", params={})))
        tokenizer.padding_side = "left"
    config = load_config("rl", "quick", params={}, overrides={
        "engine": engine, "num_generations": str(generations), "batch_size": str(2 * generations),
        "max_steps": str(steps + 1), "save_steps": "100000", "seed": str(seed)})
    labels, train, _, pool = load_data(dataset, None, n_prompts, 0, seed)
    builder = make_builder(tokenizer, labels, Strategy.parse(strategy), pool, config.max_prompt_tokens, seed)
    config = fit_completion_budget(config, tokenizer, builder, log=lambda _m: None)
    rows = [{"prompt": builder.prompt(ex), "label": ex["label"]} for ex in train]
    funcs, weights = build_rewards(builder, config.uncertain_reward, config.invalid_penalty, config.wrong_reward,
                                   config.format_reward, num_generations=generations)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="gencls-bench-") as tmp:
        trainer = build_grpo_trainer(model, tokenizer, rows, funcs, weights, config, Path(tmp), [timer.callback()])
        trainer.args.disable_tqdm = True
        trainer.train()
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"engine": engine, "generations": generations, "steps": len(timer.times) - 1,
            "completions_per_s": 2 * generations / timer.step, "seconds_per_step": timer.step,
            "completion_tokens": sum(lengths) / len(lengths) if lengths else float("nan")}


def run_benchmark(dataset: str = "trec6", strategy: str = "naive", model: str = "smollm2-135m", n: int = 96,
                  batch_size: int = 8, engines: tuple[str, ...] = SFT_ENGINES, grpo_steps: int = 5,
                  generations: tuple[int, ...] = (4, 8), sft_dir: Path | None = None, seed: int = 0) -> dict:
    """All figures of one run (see the module docstring)."""
    import torch
    from peft import get_peft_model

    from components.model.scoring import shared_prefix_length
    from components.model.models import load_model
    from components.train.sft import lora_config
    from components.train.configs import load_config

    lm, tokenizer = load_model(model)
    rows = _sft_rows(dataset, strategy, n, tokenizer, load_config("sft", "quick", params={}).max_prompt_tokens, seed)
    tokenized = _tokenize(tokenizer, rows)
    prompts = [r["input_ids"][: next(i for i, t in enumerate(r["labels"]) if t != -100)] for r in tokenized]
    lm = get_peft_model(lm, lora_config(load_config("sft", "quick", params={})))
    lm.train()
    reference = reference_rate(lm, tokenized, batch_size, tokenizer.pad_token_id)
    del lm
    result: dict[str, Any] = {
        "dataset": dataset, "strategy": strategy, "model": model, "n": len(rows), "batch_size": batch_size,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)), "tokens_per_example": sum(map(len, (r["input_ids"] for r in tokenized)))
        / len(tokenized), "shared_prefix_tokens": shared_prefix_length(prompts), "reference": reference, "sft": [],
        "grpo": []}
    for engine in engines:
        rate = sft_rate(model, rows, engine, batch_size, seed)
        rate["ratio_to_reference"] = rate["examples_per_s"] / reference["examples_per_s"]
        result["sft"].append(rate)
    base = next((r for r in result["sft"] if r["engine"] == "trl"), None)
    for rate in result["sft"]:
        rate["ratio_to_trl"] = rate["examples_per_s"] / base["examples_per_s"] if base else None
    if grpo_steps > 0:
        for g in generations:
            pair = [grpo_rate(model, dataset, strategy, max(n, 16), g, grpo_steps, e, sft_dir, seed)
                    for e in ("trl", "group-shared")]
            pair[1]["ratio_to_trl"] = pair[1]["completions_per_s"] / pair[0]["completions_per_s"]
            result["grpo"] += pair
    return result


def format_report(r: dict) -> str:
    """Human-readable lines of a `run_benchmark` result."""
    ref = r["reference"]
    lines = [
        f"{r['model']} on {r['device']} ({r['threads']} torch threads, {r['cores']} cores); {r['dataset']} "
        f"strategy {r['strategy']}: {r['n']} examples, {r['tokens_per_example']:.1f} tokens each "
        f"({r['shared_prefix_tokens']} shared by every prompt), batch {r['batch_size']}",
        f"reference (LoRA forward+backward, logits for every position, no optimizer): "
        f"{ref['tokens_per_s']:.0f} tokens/s = {ref['examples_per_s']:.2f} examples/s ({ref['padding']:.0%} padding)",
        f"{'SFT path':<16}{'examples/s':>12}{'s/step':>9}{'x reference':>13}{'x trl':>8}",
    ]
    for s in r["sft"]:
        vs_trl = f"{s['ratio_to_trl']:.2f}" if s.get("ratio_to_trl") else "-"
        lines.append(f"{s['engine']:<16}{s['examples_per_s']:>12.2f}{s['seconds_per_step']:>9.2f}"
                     f"{s['ratio_to_reference']:>13.2f}{vs_trl:>8}")
    if r["grpo"]:
        lines.append(f"{'GRPO step':<16}{'G':>3}{'completions/s':>15}{'s/step':>9}{'tokens':>8}{'x trl':>8}")
        for g in r["grpo"]:
            vs = f"{g['ratio_to_trl']:.2f}" if "ratio_to_trl" in g else "1.00"
            lines.append(f"{g['engine']:<16}{g['generations']:>3}{g['completions_per_s']:>15.2f}"
                         f"{g['seconds_per_step']:>9.2f}{g['completion_tokens']:>8.1f}{vs:>8}")
    return "\n".join(lines)
