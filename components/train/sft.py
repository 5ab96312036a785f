"""Supervised fine-tuning ("policy warm-up") with TRL's SFTTrainer.

    gencls train sft --dataset trec6 --profile quick [--strategy definitions] [--set sft.lora_r=8]

What it does, in order:
    1. validates the dataset (components.data.validation.require_valid, when present);
    2. takes a stratified held-out slice of the training split (eval_size) and a stratified,
       seeded training subsample from the rest (train_size); optional class-weighted resampling;
    3. renders prompt/completion pairs with the training strategy (PromptBuilder truncates the
       example text only; the number of truncated rows is logged); completions end with
       `<|im_end|>` so the model learns to stop; the loss covers the completion tokens only;
    4. with an `uncertain` strategy and uncertain_policy=margin, relabels some targets as
       `uncertain` (rule in `select_uncertain`);
    5. trains LoRA (PEFT) or all weights, fp32 on CPU, with generative held-out eval every
       eval_every_steps; the kept adapter is the best by held-out macro-F1;
    6. resumes from out_dir/trainer/checkpoint-N when the same run was interrupted.

Output (out_dir, default checkpoints/<dataset>/sft): adapter safetensors + tokenizer +
gencls_config.json + metrics.json + loss_curve.png; best/ and trainer/ inside.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from components.config import RUN_INFO_FILE, run_info, stable
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
    SFTConfig,
    asdict_config,
    trainer_settings,
    load_config,
)
from components.train.sampling import (
    rebalance,
    split_train_eval,
    stratified_sample,
)

__all__ = ["SFTConfig", "load_config", "train_sft", "select_uncertain", "build_sft_rows", "require_valid_data"]

IM_END = "<|im_end|>"
GATE_FILE = "gate.json"  # ids of the champion gate's validation slice (read by RL and the register step)


def require_valid_data(dataset: str, data_dir: Any = None) -> None:
    """Run components.data.validation.require_valid(dataset) when the data area provides it.

    Raises:
        DataValidationError: when the dataset fails validation (nothing gets trained).
    """
    try:
        from components.data import validation
    except ImportError:
        return
    check = getattr(validation, "require_valid", None)
    if check is None:
        return
    try:
        check(dataset, data_dir=data_dir) if data_dir is not None else check(dataset)
    except TypeError:
        check(dataset)


def load_data(dataset: str, data_dir: Any, train_size: int, eval_size: int, seed: int):
    """(labels, training subsample, held-out slice, demo pool) for a dataset."""
    from components.data.datasets import load_labels, load_split

    labels = load_labels(dataset, data_dir)
    train_all = load_split(dataset, "train", data_dir)
    train, held = split_train_eval(train_all, train_size, eval_size, seed)
    held_ids = {ex["id"] for ex in held}
    pool = [ex for ex in train_all if ex["id"] not in held_ids]  # demos never come from the held-out slice
    return labels, train, held, pool


def gate_slice(dataset: str, data_dir: Any, used: list[dict], size: int, seed: int) -> tuple[list[dict], bool]:
    """(the champion gate's validation slice, whether it had to be the held-out selection slice).

    A stratified, seeded sample of the training-split examples that are not in `used` (the SFT
    training subsample and its held-out slice), at most half of them (the rest stays for RL's
    prompts). When nothing is left (train_size 0 = all data), the caller's held-out slice is used
    instead and the flag says so (checkpoints were chosen on it).
    """
    from components.data.datasets import load_split

    used_ids = {ex["id"] for ex in used}
    rest = [ex for ex in load_split(dataset, "train", data_dir) if ex["id"] not in used_ids]
    size = min(size, len(rest) // 2)
    return (stratified_sample(rest, size, seed + 2), False) if size > 0 else ([], True)


def read_gate(sft_dir: Any) -> tuple[set[str], bool]:
    """(the gate slice's ids written by an SFT run (empty when it wrote none), whether that slice is SFT's own
    held-out selection slice because no training example was left outside SFT's sample)."""
    gate = read_json(Path(sft_dir) / GATE_FILE, {})
    return set(gate.get("ids", [])), bool(gate.get("selection_slice"))


def read_gate_ids(sft_dir: Any) -> set[str]:
    """The gate slice's ids written by an SFT run (empty when it wrote none)."""
    return read_gate(sft_dir)[0]


def make_builder(tokenizer: Any, labels: dict, strategy: Any, pool: list[dict], max_prompt_tokens: int, seed: int):
    """PromptBuilder for `strategy` (with a retriever over `pool` for semantic ICL)."""
    from components.model.prompts import PromptBuilder

    retriever = None
    if strategy.icl == "semantic":
        from components.model.retrieval import Retriever

        retriever = Retriever(pool)
    return PromptBuilder(tokenizer, labels, strategy, train_examples=pool, retriever=retriever,
                         max_prompt_tokens=max_prompt_tokens, seed=seed)


def select_uncertain(model: Any, tokenizer: Any, builder: Any, examples: list[dict], config: SFTConfig,
                     batch_size: int = 16) -> tuple[set[str], dict[str, float]]:
    """Which training examples get `uncertain` as their SFT target (the "margin" rule).

    Rule: the reference model (the base model before SFT) scores every real label by
    likelihood after the prompt (perplexity decoding, shared KV cache). For each example,
    margin = logp(gold) - max logp(other label). Examples with margin < uncertain_margin
    (default 0: the reference gets them wrong) are candidates; the lowest margins, at most
    uncertain_max_share of the training set, take `uncertain`. Only the first
    uncertain_max_scored examples (a seeded random subset) are scored, to bound the cost.

    Returns:
        (ids relabelled, stats: scored, reference_accuracy, share, seconds).
    """
    import numpy as np

    from components.model.scoring import score_gold

    start = time.time()
    scored = examples[: config.uncertain_max_scored] if config.uncertain_max_scored > 0 else list(examples)
    space = builder.space
    real = [space.answer(label) for label in space.labels]
    scores, gold = score_gold(model, tokenizer, builder, scored, real, batch_size)
    gold_scores = scores[np.arange(len(scored)), gold]
    others = scores.copy()
    others[np.arange(len(scored)), gold] = -np.inf
    margins = gold_scores - others.max(axis=1)
    cap = int(math.floor(config.uncertain_max_share * len(examples)))
    order = [i for i in np.argsort(margins, kind="stable") if margins[i] < config.uncertain_margin][:cap]
    ids = {scored[i]["id"] for i in order}
    stats = {"uncertain_scored": float(len(scored)), "uncertain_reference_accuracy": float((margins > 0).mean()),
             "uncertain_share": len(ids) / max(len(examples), 1), "uncertain_seconds": round(time.time() - start, 1)}
    return ids, stats


def build_sft_rows(builder: Any, examples: list[dict], uncertain_ids: set[str] = frozenset()) -> list[dict]:
    """Prompt/completion rows; completions end with `<|im_end|>` (the end-of-turn token)."""
    from components.model.prompts import UNCERTAIN

    rows = []
    for ex in examples:
        label = UNCERTAIN if ex["id"] in uncertain_ids else ex["label"]
        rows.append({"prompt": builder.prompt(ex), "completion": builder.target(ex, label=label) + IM_END})
    return rows


def lora_config(config: Any):
    """The PEFT LoraConfig for a config with lora_r/lora_alpha/lora_dropout/target_modules."""
    from peft import LoraConfig

    targets = config.target_modules
    if isinstance(targets, (list, tuple)) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM", bias="none")


def build_trainer(model: Any, tokenizer: Any, rows: list[dict], config: SFTConfig, trainer_dir: Path,
                  callbacks: list = ()):
    """An SFTTrainer on prompt/completion rows with completion-only loss.

    `config.engine` picks the step: 'shared-prefix' (default) and 'answer-only' use
    `components.train.engine` (exact; logits at answer positions only, the first also runs the batch's
    common prompt prefix once); 'trl' is TRL's own SFTTrainer loss.
    """
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    eos = IM_END if IM_END in tokenizer.get_vocab() else None
    fast = config.engine != "trl"
    args = TRLSFTConfig(
        **trainer_settings(config, trainer_dir),
        num_train_epochs=config.epochs,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,
        completion_only_loss=True,
        max_length=None,  # truncation happens in the text (PromptBuilder), never in the label
        eos_token=eos,
        dataset_num_proc=None,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
    )
    kwargs: dict[str, Any] = {}
    trainer_class = SFTTrainer
    if fast:
        from components.train.engine import SharedPrefixCollator, make_sft_trainer_class

        trainer_class = make_sft_trainer_class()
        trainer_class.token_metrics = config.token_metrics
        kwargs["data_collator"] = SharedPrefixCollator(pad_id=tokenizer.pad_token_id,
                                                       share=config.engine == "shared-prefix",
                                                       pack=config.engine == "shared-prefix")
    trainer_class = with_atomic_checkpoints(trainer_class)
    with python_print():  # TRL maps the dataset: no bytecode in a Prefect run's log
        return trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora_config(config) if config.lora else None,
                             callbacks=list(callbacks), **kwargs)


def train_sft(dataset: str, config: SFTConfig | None = None, out_dir: str | Path | None = None,
              log_fn: LogFn | None = None, data_dir: str | Path | None = None) -> Path:
    """Fine-tune the base model on `dataset`; returns the folder of the kept (best) checkpoint.

    Args:
        dataset: dataset name (data/<dataset>/ must be built).
        config: SFTConfig; default: the quick profile (with conf/params.yaml).
        out_dir: output folder; default checkpoints/<dataset>/sft.
        log_fn: `log_fn(metrics, step)` receives losses and held-out metrics (e.g. MLflow).
        data_dir: folder holding the datasets; default data/.

    Returns:
        out_dir, loadable with `components.model.models.load_model(adapter=out_dir)` (LoRA) or as a
        model folder (full fine-tuning).
    """
    from components import config as project_config
    from components.model.models import load_model
    from components.model.prompts import Strategy

    config = config or load_config("sft", "quick")
    log = printer()
    require_valid_data(dataset, data_dir)
    out_dir = Path(out_dir) if out_dir else project_config.checkpoints_dir() / dataset / "sft"
    strategy = Strategy.parse(config.train_strategy)
    started = time.time()

    model, tokenizer = load_model(config.model)
    model.train()
    labels, train, held, pool = load_data(dataset, data_dir, config.train_size, config.eval_size, config.seed)
    builder = make_builder(tokenizer, labels, strategy, pool, config.max_prompt_tokens, config.seed)
    if config.rebalance:
        train = rebalance(train, config.seed)

    stats: dict[str, float] = {}
    uncertain_ids: set[str] = set()
    if strategy.uncertain and config.uncertain_policy == "margin":
        with eval_mode(model):
            uncertain_ids, stats = select_uncertain(model, tokenizer, builder, train, config)
        log(f"uncertain targets: {len(uncertain_ids)} of {len(train)} (margin rule; {stats})")
    builder.truncated = 0
    rows = build_sft_rows(builder, train, uncertain_ids)
    stats.update({"truncated_rows": float(builder.truncated), "train_examples": float(len(rows)),
                  "heldout_examples": float(len(held))})
    log(f"SFT {dataset}: {len(rows)} training rows ({builder.truncated} truncated to {config.max_prompt_tokens} "
        f"prompt tokens), {len(held)} held out, strategy {strategy.slug()}")
    if log_fn:
        log_fn({f"sft/{k}": v for k, v in stats.items()}, 0)

    gate, from_held = gate_slice(dataset, data_dir, train + held, config.gate_size, config.seed)
    if from_held:
        gate = held
        log("gate slice: no training example is left outside SFT's sample; the champion gate uses the held-out "
            "slice checkpoints were chosen on")
    write_json(out_dir / GATE_FILE, {"ids": [ex["id"] for ex in gate], "selection_slice": from_held,
                                     "seed": config.seed})
    run_id = fingerprint({"kind": "sft", "dataset": dataset, "config": asdict_config(config),
                          "rows": fingerprint(rows), "held": [ex["id"] for ex in held]})
    trainer_dir, best_dir = out_dir / "trainer", out_dir / "best"
    resume = resume_checkpoint(trainer_dir, run_id, log)
    started -= seconds_spent(resume)  # a resumed run's seconds include what its earlier attempts spent
    if resume is None and best_dir.exists():
        import shutil

        shutil.rmtree(best_dir)
    if config.patience > 0 and not (held and config.eval_every_steps > 0):
        raise ValueError(f"sft.patience={config.patience} needs held-out evaluations to stop on: set sft.eval_size > 0 "
                         f"and sft.eval_every_steps > 0 (got {config.eval_size} and {config.eval_every_steps})")
    evaluator = None
    if held:
        eval_builder = make_builder(tokenizer, labels, strategy, pool, config.max_prompt_tokens, config.seed)
        evaluator = GenerativeEval(eval_builder, tokenizer, held, list(labels), best_dir,
                                   trainer_dir / "eval_history.json", config.eval_every_steps,
                                   config.eval_batch_size, log_fn, "sft", log=log, patience=config.patience,
                                   min_step=math.ceil(config.min_epochs * math.ceil(len(rows) / (config.batch_size
                                                                                              * config.grad_accum))))
    trainer = build_trainer(model, tokenizer, rows, config, trainer_dir, make_callbacks(log_fn, evaluator, "sft"))
    trainer.gencls_started = started  # each checkpoint records the seconds spent so far
    use_compact_progress(trainer, "sft")
    resumed_step = int(resume.rsplit("-", 1)[-1]) if resume else 0
    if resume and evaluator is not None:
        evaluator.trim(resumed_step)
    if resume and evaluator is not None and evaluator.should_stop:
        # stopped early, then killed before the output was written: nothing is left to train (the Trainer would
        # train one more step before it looks at a stop), so the checkpoint's state stands
        from transformers import TrainerState

        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        evaluator.resumed_from = int(trainer.state.global_step)
        train_loss = run_loss(trainer)
        log(f"{resume}: stopped early at this step (held-out macro-F1 best at step {evaluator.best['step']}); "
            "nothing left to train")
    else:
        train_loss = run_loss(trainer, trainer.train(resume_from_checkpoint=resume), resumed=bool(resume))

    save_final(trainer.model, tokenizer, out_dir, best_dir, evaluator)
    history = evaluator.history if evaluator else []
    metrics = {
        "kind": "sft", "dataset": dataset, "train_loss": train_loss,
        "global_step": int(trainer.state.global_step), "max_steps": int(trainer.state.max_steps),
        "stopped_early": bool(evaluator and evaluator.should_stop and trainer.state.global_step < trainer.state.max_steps),
        "resumed_from_step": evaluator.resumed_from if evaluator else resumed_step,
        "eval_history": history, "best": evaluator.best if evaluator else None,
        "seconds": round(time.time() - started, 1), **stats,
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
    }
    write_json(out_dir / METRICS_FILE, stable(metrics))  # timings go to run.json (not part of the output)
    write_json(out_dir / RUN_INFO_FILE, run_info(metrics))
    write_json(out_dir / CONFIG_FILE, {
        "kind": "sft", "dataset": dataset, "base_model": config.model, "strategy": strategy.slug(),
        "train_strategy": strategy.slug(), "lora": config.lora, "config": asdict_config(config),
        "libraries": library_versions(), "best_step": (evaluator.best or {}).get("step") if evaluator else None,
    })
    plot_curves(trainer.state.log_history, history, ["loss"], out_dir / "loss_curve.png", f"SFT loss ({dataset})")
    best = metrics["best"]
    if best:
        log(f"SFT done in {metrics['seconds']}s: best held-out step {best['step']} accuracy {best['accuracy']:.3f} "
            f"macro-F1 {best['macro_f1']:.3f} -> {out_dir}")
    return out_dir


def read_metrics(out_dir: str | Path) -> dict:
    """metrics.json of a finished run (empty dict when absent)."""
    return read_json(Path(out_dir) / METRICS_FILE, {})
