"""Perplexity decoding benchmark: shared prompt prefix (KV cache reused) vs one forward per label.

    gencls bench decoding --labels 6 --prompt-tokens 128 --n 20 --model smollm2-135m

    gencls bench decoding --dataset 20newsgroups --prompt-tokens 246 --n 32   # shared prompt prefix on/off

Both paths score the same n prompts (each exactly `prompt-tokens` tokens, chat template
applied) against the same K candidate labels; the report gives examples/s for each, the
ratio, whether the argmax predictions are identical and the largest score difference.
With `--dataset`, `decoding.predict` classifies the dataset's first n test examples with
`--strategy` twice: the prompts' shared prefix (system message, instructions, label list)
run once per call, and run again for every prompt; same figures.
Not a timed test: CPU contention changes the numbers; run it on an idle machine.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

WORDS = ("what who where when how why city river film song year number person company "
         "country animal colour food game book war king river mountain").split()
LABEL_NAMES = ["description", "entity", "abbreviation", "human", "number", "location", "sports", "business",
               "politics", "technology", "health", "music", "science", "travel", "weather", "law"]


def make_prompts(tokenizer, n: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """n chat prompts of exactly `prompt_tokens` tokens, with random question-like text."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(prompt_tokens * 2)]
        shell = tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are a precise text classifier."},
             {"role": "user", "content": "{}"}], tokenize=False, add_generation_prompt=True)
        head, tail = shell.split("{}")
        budget = prompt_tokens - len(tokenizer(head + tail, add_special_tokens=False)["input_ids"])
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][: max(budget, 1)]
        prompts.append(head + tokenizer.decode(ids) + tail)
    return prompts


def load(model: str):
    """(model, tokenizer): `tiny` builds a random tiny model, anything else goes to load_model."""
    from components.model.models import load_model

    if model == "tiny":
        from components.model.tiny_model import build_tiny_model

        return load_model(build_tiny_model(Path(tempfile.mkdtemp(prefix="gencls-tiny-")), hidden_size=64))
    return load_model(model)


def run_benchmark(model: str = "smollm2-135m", labels: int = 6, prompt_tokens: int = 128, n: int = 20,
                  batch_size: int = 8, seed: int = 0) -> dict:
    """Time both scorers on the same inputs; returns a dict of the figures."""
    import numpy as np
    import torch

    from components.model.scoring import score_candidates, score_candidates_naive

    lm, tokenizer = load(model)
    prompts = make_prompts(tokenizer, n, prompt_tokens, seed)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    candidates = (LABEL_NAMES * (labels // len(LABEL_NAMES) + 1))[:labels]
    candidates = [c if i < len(LABEL_NAMES) else f"{c}{i}" for i, c in enumerate(candidates)]
    score_candidates(lm, tokenizer, prompts[:1], candidates, batch_size)  # warm-up
    t0 = time.perf_counter()
    shared = score_candidates(lm, tokenizer, prompts, candidates, batch_size)
    t1 = time.perf_counter()
    naive = score_candidates_naive(lm, tokenizer, prompts, candidates)
    t2 = time.perf_counter()
    return {
        "model": model, "device": str(next(lm.parameters()).device), "threads": torch.get_num_threads(),
        "labels": labels, "prompt_tokens": int(np.mean(lengths)), "n": n, "batch_size": batch_size,
        "shared_ex_per_s": n / (t1 - t0), "naive_ex_per_s": n / (t2 - t1),
        "ratio": (t2 - t1) / (t1 - t0),
        "identical_predictions": bool((shared.argmax(1) == naive.argmax(1)).all()),
        "max_abs_score_diff": float(np.abs(shared - naive).max()),
    }


def run_prefix_benchmark(model: str = "smollm2-135m", dataset: str = "20newsgroups", n: int = 32,
                         strategy: str = "icl=semantic,k=2,decoding=perplexity", prompt_tokens: int = 246,
                         batch_size: int = 16) -> dict:
    """Time `predict` with and without the shared prompt prefix on a dataset's first n test examples."""
    import numpy as np
    import torch

    from components.data.datasets import load_labels, load_split
    from components.model.decoding import predict
    from components.model.scoring import shared_prefix_length
    from components.evaluate.evaluation import build_retriever
    from components.model.prompts import PromptBuilder, Strategy

    lm, tokenizer = load(model)
    train, test = load_split(dataset, "train"), load_split(dataset, "test")[:n]
    parsed = Strategy.parse(strategy)
    builder = PromptBuilder(tokenizer, load_labels(dataset), parsed, train,
                            retriever=build_retriever(train, parsed, test), max_prompt_tokens=prompt_tokens)
    ids = tokenizer([builder.prompt(ex) for ex in test], add_special_tokens=False)["input_ids"]
    predict(lm, tokenizer, builder, test[:2], batch_size=batch_size, progress=False)  # warm-up
    t0 = time.perf_counter()
    shared = predict(lm, tokenizer, builder, test, batch_size=batch_size, progress=False)
    t1 = time.perf_counter()
    plain = predict(lm, tokenizer, builder, test, batch_size=batch_size, progress=False, share_prefix=False)
    t2 = time.perf_counter()
    diffs = [abs(a["probs"][k] - b["probs"][k]) for a, b in zip(shared, plain) if a["probs"] and b["probs"]
             for k in a["probs"]]
    return {
        "model": model, "device": str(next(lm.parameters()).device), "threads": torch.get_num_threads(),
        "dataset": dataset, "strategy": parsed.slug(), "n": n, "batch_size": batch_size,
        "prompt_tokens": int(np.mean([len(i) for i in ids])), "prefix_tokens": shared_prefix_length(ids),
        "shared_ex_per_s": n / (t1 - t0), "plain_ex_per_s": n / (t2 - t1), "ratio": (t2 - t1) / (t1 - t0),
        "identical_predictions": [r["pred"] for r in shared] == [r["pred"] for r in plain],
        "max_abs_prob_diff": max(diffs) if diffs else 0.0,
    }


def format_prefix_report(r: dict) -> str:
    """Human-readable lines of a `run_prefix_benchmark` result."""
    return "\n".join([
        f"model {r['model']} on {r['device']} ({r['threads']} threads); {r['dataset']}, {r['n']} test prompts "
        f"({r['prompt_tokens']} tokens on average, {r['prefix_tokens']} shared), strategy {r['strategy']}, "
        f"batch {r['batch_size']}",
        f"shared prompt prefix run once: {r['shared_ex_per_s']:.2f} ex/s",
        f"every prompt run whole:        {r['plain_ex_per_s']:.2f} ex/s",
        f"speed-up: {r['ratio']:.2f}x",
        f"identical predictions: {'yes' if r['identical_predictions'] else 'NO'} "
        f"(max |probability diff| {r['max_abs_prob_diff']:.2e})",
    ])


def format_report(r: dict) -> str:
    """Human-readable lines of a `run_benchmark` result."""
    return "\n".join([
        f"model {r['model']} on {r['device']} ({r['threads']} threads); {r['n']} prompts x {r['labels']} labels, "
        f"{r['prompt_tokens']} prompt tokens, batch {r['batch_size']}",
        f"shared prefix (KV cache reused): {r['shared_ex_per_s']:.2f} ex/s",
        f"naive (one forward per label):   {r['naive_ex_per_s']:.2f} ex/s",
        f"speed-up: {r['ratio']:.2f}x",
        f"identical predictions: {'yes' if r['identical_predictions'] else 'NO'} "
        f"(max |score diff| {r['max_abs_score_diff']:.2e})",
    ])
