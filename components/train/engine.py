"""Training engine: answer-only SFT loss over a shared prompt prefix (GRPO's: components.train.grpo_engine).

    from components.train.engine import SharedPrefixCollator, make_sft_trainer_class, answer_loss

Two exact rewrites of what TRL's SFTTrainer computes, each cheaper on the same numbers:

* answer-only logits (SFT): the LM head (49k x 576 on SmolLM2) runs on the answer positions
  only, via the model's own `logits_to_keep`; rows are left-padded so every answer ends the row.
  No full-vocabulary entropy or token accuracy per step unless `token_metrics` is asked for.
* shared prompt prefix (SFT): the tokens every prompt of a batch starts with (system message,
  instructions, label list, definitions) run once, as a batch of one, with gradients; their
  key/value cache is broadcast to the batch (`expand`, no copy), so gradients from every row
  flow back through it into the LoRA weights. The rest of each row continues at its true
  positions. Loss and gradients equal the plain padded forward's (tests/test_engine.py).

`prompt_pass` (a prefix once, then each row's rest) serves both this loss and GRPO's passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from components.model.scoring import MIN_SHARED_PREFIX, _cache_kwarg, _output_cache, shared_prefix_length

IGNORE = -100  # label of a position that carries no loss (prompt, padding)
PACK_MAX_TOKENS = 2048  # a packed row attends through a [T, T] mask: beyond this, padded rows cost less


# ----------------------------------------------------------------------------- SFT batches
@dataclass
class SharedPrefixCollator:
    """Collate tokenized SFT rows (`input_ids`, `labels`) into [shared prefix] + left-padded rests.

    The prefix is the longest token prefix common to every row's prompt part (the tokens before
    its first supervised label), or empty when shorter than `min_prefix` (or `share` is False).
    Every rest keeps at least one prompt token, so the prediction of the first answer token is
    made inside the rest.

    Returns (torch tensors): `prefix_ids` [1, n], `input_ids`/`attention_mask`/`labels` [B, W]
    (left padding), `answer_tokens` (scalar): the most positions any row supervises, `pack` (scalar):
    1 when `pack` is asked and the prefix and the rests' real tokens make at most PACK_MAX_TOKENS, so the
    loss runs them as one packed row (`packed_answer_logits`: no padding, one forward).

    Example:
        >>> c = SharedPrefixCollator(pad_id=0, min_prefix=2)
        >>> out = c([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, -100, 8, 9]},
        ...          {"input_ids": [5, 6, 3, 9], "labels": [-100, -100, -100, 9]}])
        >>> out["prefix_ids"].tolist(), out["input_ids"].tolist(), int(out["answer_tokens"])
        ([[5, 6]], [[7, 8, 9], [0, 3, 9]], 2)
    """

    pad_id: int
    min_prefix: int = MIN_SHARED_PREFIX
    share: bool = True
    pack: bool = False

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        starts = [next((i for i, t in enumerate(lab) if t != IGNORE), len(lab)) for lab in labels]
        n = shared_prefix_length([row[:s] for row, s in zip(ids, starts)], self.min_prefix) if self.share else 0
        rests, rest_labels = [row[n:] for row in ids], [lab[n:] for lab in labels]
        width = max(len(r) for r in rests)
        pads = [width - len(r) for r in rests]
        return {
            "prefix_ids": torch.tensor([ids[0][:n]], dtype=torch.long),
            "input_ids": torch.tensor([[self.pad_id] * p + r for p, r in zip(pads, rests)], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * p + [1] * len(r) for p, r in zip(pads, rests)], dtype=torch.long),
            "labels": torch.tensor([[IGNORE] * p + lab for p, lab in zip(pads, rest_labels)], dtype=torch.long),
            "answer_tokens": torch.tensor(max(len(row) - s for row, s in zip(ids, starts))),
            "pack": torch.tensor(int(self.pack and n + sum(map(len, rests)) <= PACK_MAX_TOKENS)),
        }


def prefix_layers_of(model: Any, prefix_ids: Any) -> list:
    """Per-layer (keys, values) [1, ..., n, ...] of `prefix_ids` [1, n]; gradients flow through them when enabled."""
    out = model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in _output_cache(out).layers]


def answer_logits(model: Any, batch: dict) -> tuple[Any, Any]:
    """(logits [B, M, V] predicting the last M tokens of each row, their labels [B, M]).

    M = `answer_tokens`: with left padding every row's answer ends the row, so the model's
    `logits_to_keep` keeps exactly the positions that predict answer tokens (plus a few
    prompt positions of rows with shorter answers, which carry label -100).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    keep = int(batch["answer_tokens"])
    prefix = batch.get("prefix_ids")
    if prefix is None:
        prefix = ids[:1, :0]
    if int(batch.get("pack", 0)) and _takes_a_custom_mask(model):
        return packed_answer_logits(model, prefix, ids, mask, labels)
    _, logits, _ = prompt_pass(model, prefix, ids, mask, logits_to_keep=keep + 1)
    return logits[:, :-1], labels[:, -keep:]


def _takes_a_custom_mask(model: Any) -> bool:
    """Whether the model's attention applies a 4D mask as given: eager and SDPA do, flash kernels do not, and a
    sliding window (Gemma 3's local layers) would be dropped by a block mask passed as is."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    windowed = bool(getattr(text, "sliding_window", None)) and getattr(text, "use_sliding_window", True) is not False
    return getattr(config, "_attn_implementation", None) in ("eager", "sdpa") and not windowed


def packed_answer_logits(model: Any, prefix: Any, ids: Any, mask: Any, labels: Any) -> tuple[Any, Any]:
    """(logits [1, K, V] at the K positions that predict answer tokens, those tokens [1, K]) from one packed row.

    The row is [prefix | row 1's real tokens | row 2's | ...]: each row's tokens sit at their true positions
    (after the prefix) and attend, through a block mask, to the prefix and to their own row only, so every
    logit is the padded forward's; padding and a second forward for the prefix are gone.

    Example:
        >>> import torch
        >>> calls = []
        >>> class Echo(torch.nn.Module):  # a stand-in model recording what it is given
        ...     config = None
        ...     def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        ...         calls.append((input_ids.tolist(), position_ids.tolist(), logits_to_keep.tolist()))
        ...         return type("Out", (), {"logits": torch.zeros(1, len(logits_to_keep), 3)})
        >>> _, targets = packed_answer_logits(Echo(), torch.tensor([[7, 8]]), torch.tensor([[0, 5, 6], [4, 5, 9]]),
        ...                                   torch.tensor([[0, 1, 1], [1, 1, 1]]),
        ...                                   torch.tensor([[-100, -100, 6], [-100, 5, 9]]))
        >>> calls[0], targets.tolist()
        (([[7, 8, 5, 6, 4, 5, 9]], [[0, 1, 2, 3, 2, 3, 4]], [2, 4, 5]), [[6, 5, 9]])
    """
    import torch

    device, n = ids.device, prefix.shape[1]
    real = mask.bool()
    rows = [row[keep] for row, keep in zip(ids, real)]
    packed = torch.cat([prefix[0], *rows])
    positions = torch.cat([torch.arange(n, device=device), *(n + torch.arange(len(r), device=device) for r in rows)])
    segment = torch.cat([torch.zeros(n, dtype=torch.long, device=device),
                         *(torch.full((len(r),), i + 1, device=device) for i, r in enumerate(rows))])
    order = torch.arange(len(packed), device=device)
    allowed = (order[None, :] <= order[:, None]) & ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    block = allowed  # SDPA takes a boolean mask (True: attend); eager adds the mask to the scores
    if getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") == "eager":
        block = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    targets = torch.cat([torch.full((n,), IGNORE, device=device), *(lab[keep] for lab, keep in zip(labels, real))])
    answer = (targets != IGNORE).nonzero().flatten()
    out = model(input_ids=packed[None], attention_mask=block[None, None], position_ids=positions[None],
                logits_to_keep=answer - 1)
    return out.logits, targets[answer][None]


def answer_loss(model: Any, batch: dict, num_items_in_batch: Any = None, metrics: bool = False) -> tuple[Any, dict]:
    """Cross-entropy summed over the answer tokens / their number (or `num_items_in_batch`, as
    transformers does under gradient accumulation). Returns (loss, stats); with `metrics`, the
    stats add the answer tokens' mean entropy and top-1 accuracy (a full-vocab pass each)."""
    import torch
    import torch.nn.functional as F

    logits, targets = answer_logits(model, batch)
    logits = logits.float()
    valid = targets != IGNORE
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    count = valid.sum()
    denom = count if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=total.device)
    stats: dict[str, float] = {"answer_tokens": float(count)}
    if metrics:
        with torch.no_grad():
            logp = logits[valid].log_softmax(-1)
            stats["entropy"] = float(-(logp.exp() * logp).sum(-1).mean())
            stats["mean_token_accuracy"] = float((logits[valid].argmax(-1) == targets[valid]).float().mean())
    return total / denom.clamp(min=1), stats


def make_sft_trainer_class():
    """TRL's SFTTrainer with `compute_loss` = `answer_loss` (imported lazily: TRL is heavy)."""
    from trl import SFTTrainer

    class AnswerOnlySFTTrainer(SFTTrainer):
        """SFTTrainer whose loss reads logits at answer positions only, over a shared prompt prefix."""

        token_metrics = False  # per-step entropy / token accuracy of the answer tokens

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            loss, stats = answer_loss(model, inputs, num_items_in_batch, metrics=self.token_metrics)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            for key in ("entropy", "mean_token_accuracy"):
                if key in stats:
                    self._metrics[mode][key].append(stats[key])
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum()) + \
                    inputs["prefix_ids"].shape[1] * inputs["input_ids"].shape[0]
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, None) if return_outputs else loss

    return AnswerOnlySFTTrainer


def prompt_pass(model: Any, prefix_ids: Any, rest_ids: Any, rest_mask: Any,
                logits_to_keep: int = 1, prefix_layers: list | None = None) -> tuple[Any, Any, Any]:
    """Run [common prefix once | each row's rest] -> (cache, the last `logits_to_keep` positions' logits or None,
    mask). SFT's answer loss and GRPO's prompt passes both go through here.

    The prefix runs as a batch of one and its cache is broadcast to the rows; every token sits
    at its true position (its index among the row's real tokens). `mask` covers the cache.
    `prefix_layers`: the prefix's (keys, values) per layer, computed before (`FrozenPrefix`).
    """
    import torch
    from transformers import DynamicCache

    rows, n = rest_ids.shape[0], prefix_ids.shape[1]
    kwargs: dict[str, Any] = {}
    if n:  # the prefix's cache broadcast to the rows (`expand`, no copy): gradients from every row flow back
        layers = prefix_layers if prefix_layers is not None else prefix_layers_of(model, prefix_ids)
        kwargs[_cache_kwarg(model)] = DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                                    for k, v in layers])
    ones = torch.ones((rows, n), dtype=rest_mask.dtype, device=rest_mask.device)
    mask = torch.cat([ones, rest_mask], dim=1)
    if rest_ids.shape[1] == 0:
        return kwargs.get(_cache_kwarg(model), DynamicCache()), None, mask
    positions = n + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=rest_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=logits_to_keep, **kwargs)
    return _output_cache(out), out.logits[:, -logits_to_keep:], mask
