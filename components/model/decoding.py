"""Decoding: turn a causal LM into a classifier, generatively or by label likelihood.

Usage:
    from components.model.decoding import predict
    records = predict(model, tokenizer, builder, examples)   # builder.strategy.decoding decides

* generative: greedy batched generation (left padding), only the new tokens decoded, cut
  at the end-of-turn token, parsed strictly by `builder.parse`; anything else is invalid.
* perplexity: the log-likelihood of every candidate answer after the prompt
  (`components.model.scoring.score_candidates`: prompt once, candidates as one packed trie row).
* shared prefix: the tokens every prompt of a `predict` call starts with run once
  (`components.model.scoring.SharedPrefix`); each batch continues from their KV cache.
* batches: prompts of similar token length go together (`length_order`: less padding); the records
  come back in the order of the examples.
* `uncertain` (when the strategy offers it) is resolved to the most likely real label by
  scoring the real labels only, and the record is marked `abstained`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from components.model.prompts import UNCERTAIN
from components.model.scoring import (
    SharedPrefix,
    _cache_kwarg,
    _encode_after_prefix,
    _encode_prompts,
    _model_device,
    candidate_ids,
    end_token_id,
    find_shared_prefix,
    length_order,
    score_candidates,
    softmax,
)

INVALID = "invalid"


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 16,
    prefix: SharedPrefix | None = None,
) -> list[str]:
    """Greedy completions of templated prompts: new tokens only, cut at the end of turn.

    Args:
        model: causal LM.
        tokenizer: its tokenizer (pad token set).
        prompts: templated prompts.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per generate call.
        prefix: KV cache of the tokens every prompt starts with (generation continues from it).

    Returns:
        One decoded completion per prompt (special tokens removed).
    """
    import torch

    device = _model_device(model)
    stops = {end_token_id(tokenizer)}
    eos = model.generation_config.eos_token_id
    stops.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    texts: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            cached = {}
            if prefix is None:
                input_ids, mask = _encode_prompts(tokenizer, chunk, device)
            else:
                rest_ids, mask, _ = _encode_after_prefix(tokenizer, chunk, prefix, device)
                input_ids = torch.cat([torch.tensor([prefix.ids], device=device).expand(len(chunk), -1), rest_ids], 1)
                cached = {_cache_kwarg(model): prefix.cache(len(chunk))}
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                **cached,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=sorted(stops),
            )
            for row in generated[:, input_ids.shape[1] :].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def answer_budget(tokenizer: Any, builder: Any, reasoning_tokens: int = 160) -> int:
    """max_new_tokens: the longest answer + a few tokens; more in reasoning mode."""
    longest = max(len(ids) for ids in candidate_ids(tokenizer, builder.space.answers))
    return longest + 4 + (reasoning_tokens if builder.strategy.reasoning else 0)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=None if enabled else True, desc=desc, unit="ex", leave=False)  # None: off in files


def predict(
    model: Any,
    tokenizer: Any,
    builder: Any,
    examples: Sequence[dict],
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: int | None = None,
    calibrate: bool = False,
    share_prefix: bool = True,
) -> list[dict]:
    """Classify examples with the builder's strategy.

    Args:
        model: causal LM (eval mode).
        tokenizer: its tokenizer.
        builder: a `PromptBuilder`; its strategy picks generative or perplexity decoding.
        examples: dicts with id, text, label.
        batch_size: prompts per forward pass.
        progress: show a progress bar.
        max_new_tokens: generation budget (default: `answer_budget`).
        calibrate: perplexity only: divide label probabilities by those given to a
            content-free input ("N/A"), i.e. contextual calibration (Zhao et al. 2021).
        share_prefix: run the tokens all prompts start with once (same results, less compute).

    Returns:
        One record per example: {id, label, pred, raw, probs, abstained, invalid}; `pred` is
        a real label or "invalid"; `probs` maps real labels to probabilities (perplexity
        decoding, or a resolved `uncertain`), else None.
    """
    space = builder.space
    real = [space.answer(label) for label in space.labels]
    answers = space.answers  # real answers, then `uncertain` when offered
    perplexity = builder.strategy.decoding == "perplexity"
    prior = _content_free_prior(model, tokenizer, builder, real) if perplexity and calibrate else None
    budget = max_new_tokens or answer_budget(tokenizer, builder)
    records: list[dict] = []
    all_prompts = [builder.prompt(ex) for ex in examples]
    prefix = find_shared_prefix(model, tokenizer, all_prompts) if share_prefix else None
    order = length_order(tokenizer, all_prompts)  # batches of similar length; records come back in input order
    examples, all_prompts = [examples[i] for i in order], [all_prompts[i] for i in order]
    bar = _progress(len(examples), progress, "perplexity" if perplexity else "generative")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = all_prompts[start : start + batch_size]
        if perplexity:
            scores = score_candidates(model, tokenizer, prompts, answers, batch_size, prefix=prefix)
            records += [_perplexity_record(ex, row, space, answers, prior) for ex, row in zip(chunk, scores)]
        else:
            texts = generate_answers(model, tokenizer, prompts, budget, batch_size, prefix=prefix)
            parsed = [builder.parse(t) for t in texts]
            unsure = [i for i, p in enumerate(parsed) if p == UNCERTAIN]
            resolved = {}
            if unsure:
                real_scores = score_candidates(model, tokenizer, [prompts[i] for i in unsure], real, batch_size,
                                               prefix=prefix)
                resolved = dict(zip(unsure, real_scores))
            for i, (ex, text, label) in enumerate(zip(chunk, texts, parsed)):
                records.append(_generative_record(ex, text, label, space, resolved.get(i)))
        bar.update(len(chunk))
    bar.close()
    in_order: list[dict] = [{}] * len(records)
    for position, index in enumerate(order):
        in_order[index] = records[position]
    return in_order


def _perplexity_record(ex: dict, row: np.ndarray, space: Any, answers: list[str], prior: np.ndarray | None) -> dict:
    """Record for one example scored over all answers (real labels first)."""
    n_real = len(space.labels)
    probs = softmax(row[:n_real])
    if prior is not None:
        probs = probs / prior
        probs = probs / probs.sum()
    top = int(np.argmax(row))
    abstained = top >= n_real  # `uncertain` won
    pred = space.labels[int(np.argmax(probs))]
    return {
        "id": ex["id"], "label": ex.get("label"), "pred": pred, "raw": answers[top],
        "probs": {label: float(p) for label, p in zip(space.labels, probs)},
        "abstained": bool(abstained), "invalid": False,
    }


def _generative_record(ex: dict, text: str, label: str | None, space: Any, real_scores: np.ndarray | None) -> dict:
    """Record for one generated answer; `uncertain` resolved by the real-label scores."""
    probs = None
    if label is None:
        pred = INVALID
    elif label == UNCERTAIN:
        p = softmax(real_scores)
        probs = {lab: float(v) for lab, v in zip(space.labels, p)}
        pred = space.labels[int(np.argmax(p))]
    else:
        pred = label
    return {
        "id": ex["id"], "label": ex.get("label"), "pred": pred, "raw": text, "probs": probs,
        "abstained": label == UNCERTAIN, "invalid": label is None,
    }


def _content_free_prior(model: Any, tokenizer: Any, builder: Any, real: list[str]) -> np.ndarray:
    """Label probabilities the model gives to content-free inputs (mean over a few)."""
    probes = [{"id": f"__content_free_{i}__", "text": t, "label": None} for i, t in enumerate(("N/A", "", "[MASK]"))]
    scores = score_candidates(model, tokenizer, [builder.prompt(p) for p in probes], real)
    prior = softmax(scores).mean(axis=0)
    return prior / prior.sum()
