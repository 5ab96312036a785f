"""Decoding: turn a causal LM into a classifier, generatively or by label likelihood.

Usage:
    from components.decoding import predict
    records = predict(model, tokenizer, builder, examples)   # builder.strategy.decoding decides

* generative: greedy batched generation (left padding), only the new tokens decoded, cut
  at the end-of-turn token, parsed strictly by `builder.parse`; anything else is invalid.
* perplexity: the log-likelihood of every candidate answer (its tokens + `<|im_end|>`, so
  "1" and "10", or a label and its prefix, are told apart) after the prompt. The prompt
  runs once; its KV cache is repeated for the K candidates, which run as one batch.
* `uncertain` (when the strategy offers it) is resolved to the most likely real label by
  scoring the real labels only, and the record is marked `abstained`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from components.prompts import UNCERTAIN

INVALID = "invalid"
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")  # ChatML, Gemma, Llama 3
MAX_CANDIDATE_ROWS = 64  # prompt copies x candidates per forward: bounds KV-cache memory


def end_token_id(tokenizer: Any) -> int:
    """Id of the end-of-turn token (ChatML `<|im_end|>`, Gemma `<end_of_turn>`, ...; else eos)."""
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            return int(token_id)
    return int(tokenizer.eos_token_id)


def candidate_ids(tokenizer: Any, candidates: Sequence[str]) -> list[list[int]]:
    """Token ids scored for each candidate answer: its tokens then the end-of-turn token."""
    end = end_token_id(tokenizer)
    return [tokenizer(c, add_special_tokens=False)["input_ids"] + [end] for c in candidates]


def _encode_prompts(tokenizer: Any, prompts: Sequence[str], device: Any):
    """Left-padded input ids and attention mask for already templated prompts."""
    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), add_special_tokens=False, padding=True, return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def _model_device(model: Any):
    return next(model.parameters()).device


def _cache_kwarg(model: Any) -> str:
    """Name of the forward argument taking a KV cache (`cache` since transformers 5.2x)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def score_candidates(
    model: Any, tokenizer: Any, prompts: Sequence[str], candidates: Sequence[str], batch_size: int = 16
) -> np.ndarray:
    """Log-likelihood of each candidate answer after each prompt, sharing the prompt's KV cache.

    Args:
        model: causal LM.
        tokenizer: its tokenizer.
        prompts: n templated prompts (ending with the assistant generation prompt).
        candidates: K answer strings.
        batch_size: prompts per forward pass.

    Returns:
        float array [n, K] of summed log-probabilities (answer tokens + end-of-turn).
    """
    import torch
    from transformers import DynamicCache

    device = _model_device(model)
    cand = candidate_ids(tokenizer, candidates)
    k, length = len(cand), max(len(c) for c in cand)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cand_ids = torch.full((k, length), pad, dtype=torch.long, device=device)
    cand_mask = torch.zeros((k, length), dtype=torch.long, device=device)
    for i, ids in enumerate(cand):
        cand_ids[i, : len(ids)] = torch.tensor(ids, device=device)
        cand_mask[i, : len(ids)] = 1
    first = cand_ids[:, 0]
    out = np.zeros((len(prompts), k), dtype=np.float64)
    group = max(1, MAX_CANDIDATE_ROWS // k)  # prompts whose candidates run together
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            input_ids, mask = _encode_prompts(tokenizer, prompts[start : start + batch_size], device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            result = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1)  # only the last position's logits are needed
            last_logp = torch.log_softmax(result.logits[:, -1].float(), dim=-1)  # [b, V]
            kv = result.cache if getattr(result, "cache", None) is not None else result.past_key_values
            layers = [(layer.keys, layer.values) for layer in kv.layers]
            lengths = mask.sum(-1)
            for g in range(0, input_ids.shape[0], group):
                rows = slice(g, g + group)
                b = lengths[rows].shape[0]
                offset = int(mask.shape[1] - lengths[rows].max())  # drop columns that are padding for all
                cache = DynamicCache(
                    [(key[rows, :, offset:].repeat_interleave(k, 0), val[rows, :, offset:].repeat_interleave(k, 0))
                     for key, val in layers]
                )
                full_mask = torch.cat(
                    [mask[rows, offset:].repeat_interleave(k, 0), cand_mask.repeat(b, 1)], dim=1
                )
                cand_pos = lengths[rows].repeat_interleave(k).unsqueeze(1) + torch.arange(length, device=device)
                scores = last_logp[rows].gather(1, first.unsqueeze(0).expand(b, k))  # first token
                if length > 1:
                    logits = model(
                        input_ids=cand_ids[:, :-1].repeat(b, 1),
                        attention_mask=full_mask[:, :-1],
                        position_ids=cand_pos[:, :-1],
                        use_cache=True,
                        **{_cache_kwarg(model): cache},
                    ).logits.float()
                    logp = torch.log_softmax(logits, dim=-1)
                    targets = cand_ids[:, 1:].repeat(b, 1)
                    tok = logp.gather(2, targets.unsqueeze(-1)).squeeze(-1) * cand_mask[:, 1:].repeat(b, 1)
                    scores = scores + tok.sum(-1).view(b, k)
                out[start + g : start + g + b] = scores.double().cpu().numpy()
    return out


def score_candidates_naive(
    model: Any, tokenizer: Any, prompts: Sequence[str], candidates: Sequence[str]
) -> np.ndarray:
    """Reference: one full forward pass over prompt + candidate for every pair (no padding).

    Same contract as `score_candidates`; used by tests and the benchmark.
    """
    import torch

    device = _model_device(model)
    cand = candidate_ids(tokenizer, candidates)
    out = np.zeros((len(prompts), len(cand)), dtype=np.float64)
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for j, ids in enumerate(cand):
                seq = torch.tensor([prompt_ids + ids], device=device)
                # logits of the positions that predict the candidate's tokens only
                logits = model(input_ids=seq, logits_to_keep=len(ids) + 1).logits[0, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                out[i, j] = float(logp[torch.arange(len(ids), device=device), torch.tensor(ids, device=device)].sum())
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of log-scores (rows sum to 1)."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    expd = np.exp(shifted)
    return expd / expd.sum(axis=-1, keepdims=True)


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 16
) -> list[str]:
    """Greedy completions of templated prompts: new tokens only, cut at the end of turn.

    Args:
        model: causal LM.
        tokenizer: its tokenizer (pad token set).
        prompts: templated prompts.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per generate call.

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
            input_ids, mask = _encode_prompts(tokenizer, prompts[start : start + batch_size], device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
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

    return tqdm(total=total, disable=not enabled, desc=desc, unit="ex", leave=False)


def predict(
    model: Any,
    tokenizer: Any,
    builder: Any,
    examples: Sequence[dict],
    batch_size: int = 16,
    progress: bool = True,
    max_new_tokens: int | None = None,
    calibrate: bool = False,
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
    bar = _progress(len(examples), progress, "perplexity" if perplexity else "generative")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [builder.prompt(ex) for ex in chunk]
        if perplexity:
            scores = score_candidates(model, tokenizer, prompts, answers, batch_size)
            records += [_perplexity_record(ex, row, space, answers, prior) for ex, row in zip(chunk, scores)]
        else:
            texts = generate_answers(model, tokenizer, prompts, budget, batch_size)
            parsed = [builder.parse(t) for t in texts]
            unsure = [i for i, p in enumerate(parsed) if p == UNCERTAIN]
            resolved = {}
            if unsure:
                real_scores = score_candidates(model, tokenizer, [prompts[i] for i in unsure], real, batch_size)
                resolved = dict(zip(unsure, real_scores))
            for i, (ex, text, label) in enumerate(zip(chunk, texts, parsed)):
                records.append(_generative_record(ex, text, label, space, resolved.get(i)))
        bar.update(len(chunk))
    bar.close()
    return records


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
