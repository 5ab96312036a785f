"""Training engine: answer-only SFT loss over a shared prompt prefix, group-shared GRPO passes.

    from components.train.engine import SharedPrefixCollator, AnswerOnlySFTTrainer, GroupSharedGRPOTrainer

Three exact rewrites of what TRL computes, each cheaper on the same numbers:

* answer-only logits (SFT): the LM head (49k x 576 on SmolLM2) runs on the answer positions
  only, via the model's own `logits_to_keep`; rows are left-padded so every answer ends the row.
  No full-vocabulary entropy or token accuracy per step unless `token_metrics` is asked for.
* shared prompt prefix (SFT): the tokens every prompt of a batch starts with (system message,
  instructions, label list, definitions) run once, as a batch of one, with gradients; their
  key/value cache is broadcast to the batch (`expand`, no copy), so gradients from every row
  flow back through it into the LoRA weights. The rest of each row continues at its true
  positions. Loss and gradients equal the plain padded forward's (tests/test_engine.py).
* group-shared GRPO: the G completions of one prompt are consecutive rows with an identical
  prompt (TRL's RepeatSampler). Generation, the policy's log-probs (with gradients) and the
  reference's run each unique prompt once and expand its cache to the G rows; only the
  completion tokens run per row. Per-token log-probs equal TRL's unshared computation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from components.model.scoring import MIN_SHARED_PREFIX, _cache_kwarg, _output_cache, shared_prefix_length

IGNORE = -100  # label of a position that carries no loss (prompt, padding)


# ----------------------------------------------------------------------------- SFT batches
@dataclass
class SharedPrefixCollator:
    """Collate tokenized SFT rows (`input_ids`, `labels`) into [shared prefix] + left-padded rests.

    The prefix is the longest token prefix common to every row's prompt part (the tokens before
    its first supervised label), or empty when shorter than `min_prefix` (or `share` is False).
    Every rest keeps at least one prompt token, so the prediction of the first answer token is
    made inside the rest.

    Returns (torch tensors): `prefix_ids` [1, n], `input_ids`/`attention_mask`/`labels` [B, W]
    (left padding), `answer_tokens` (scalar): the most positions any row supervises.

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
        }


def prefix_cache(model: Any, prefix_ids: Any, batch: int, grad: bool = True) -> tuple[Any, int]:
    """(KV cache of `prefix_ids` [1, n] broadcast to `batch` rows, n); gradients flow through it."""
    import torch
    from transformers import DynamicCache

    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        out = model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1)
    layers = [(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
              for layer in _output_cache(out).layers]
    return DynamicCache(layers), prefix_ids.shape[1]


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
    _, logits, _ = prompt_pass(model, prefix, ids, mask, logits_to_keep=keep + 1)
    return logits[:, :-1], labels[:, -keep:]


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


# ----------------------------------------------------------------------------- GRPO groups
def prompt_groups(prompt_ids: Any, prompt_mask: Any) -> tuple[Any, Any]:
    """(first row of each run of identical consecutive prompts, group index of every row).

    Example:
        >>> import torch
        >>> ids = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]])
        >>> [t.tolist() for t in prompt_groups(ids, torch.ones_like(ids))]
        [[0, 2], [0, 0, 1, 1]]
    """
    import torch

    same = (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (prompt_mask[1:] == prompt_mask[:-1]).all(-1)
    new = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    return new.nonzero().flatten(), new.long().cumsum(0) - 1


def _expand_cache(cache: Any, index: Any) -> Any:
    """A DynamicCache whose row i is row `index[i]` of `cache` (differentiable)."""
    from transformers import DynamicCache

    return DynamicCache([(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                         for layer in cache.layers])


def split_common_prefix(prompt_ids: Any, prompt_mask: Any, min_prefix: int = MIN_SHARED_PREFIX) -> tuple[Any, Any, Any]:
    """Left-padded prompts -> (common prefix [1, n], left-padded rests [R, W], their mask).

    n is the longest token prefix all rows' real tokens share, keeping at least one token in
    every rest (0 for a single row or a prefix shorter than `min_prefix`).

    Example:
        >>> import torch
        >>> ids = torch.tensor([[0, 5, 6, 7], [5, 6, 8, 9]])
        >>> [t.tolist() for t in split_common_prefix(ids, (ids > 0).long(), min_prefix=2)]
        [[[5, 6]], [[0, 7], [8, 9]], [[0, 1], [1, 1]]]
    """
    import torch

    rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
    n = shared_prefix_length(rows, min_prefix) if len(rows) > 1 else 0
    rests = [row[n:] for row in rows]
    width = max(len(r) for r in rests)
    pad = int(prompt_ids[0, 0]) if not prompt_mask[0, 0] else 0
    device = prompt_ids.device
    rest_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rests], dtype=prompt_ids.dtype, device=device)
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], dtype=prompt_mask.dtype,
                             device=device)
    return torch.tensor([rows[0][:n]], dtype=prompt_ids.dtype, device=device), rest_ids, rest_mask


def prompt_pass(model: Any, prefix_ids: Any, rest_ids: Any, rest_mask: Any,
                logits_to_keep: int = 1) -> tuple[Any, Any, Any]:
    """Run [common prefix once | each row's rest] -> (cache, the last `logits_to_keep` positions' logits or None,
    mask). SFT's answer loss and GRPO's prompt passes both go through here.

    The prefix runs as a batch of one and its cache is broadcast to the rows; every token sits
    at its true position (its index among the row's real tokens). `mask` covers the cache.
    """
    import torch
    from transformers import DynamicCache

    rows, n = rest_ids.shape[0], prefix_ids.shape[1]
    kwargs: dict[str, Any] = {}
    if n:
        cache, _ = prefix_cache(model, prefix_ids, rows)
        kwargs[_cache_kwarg(model)] = cache
    ones = torch.ones((rows, n), dtype=rest_mask.dtype, device=rest_mask.device)
    mask = torch.cat([ones, rest_mask], dim=1)
    if rest_ids.shape[1] == 0:
        return kwargs.get(_cache_kwarg(model), DynamicCache()), None, mask
    positions = n + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=rest_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=logits_to_keep, **kwargs)
    return _output_cache(out), out.logits[:, -logits_to_keep:], mask


def group_shared_logps(model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int,
                       temperature: float = 1.0, compute_entropy: bool = False) -> tuple[Any, Any]:
    """Per-token log-probs (and entropies) of the last `logits_to_keep` tokens of each row.

    The same numbers as one forward over [prompt | completion] per row (TRL's unshared pass;
    RoPE attention depends on relative positions only, so dropping the left padding changes
    nothing but rounding): the prompts' common prefix runs once, each unique prompt's rest once,
    its last position predicts the first completion token, its cache is expanded to its G rows,
    and only the completions run per row.
    """
    import torch

    width = input_ids.shape[1] - logits_to_keep
    prompt_ids, prompt_mask = input_ids[:, :width], attention_mask[:, :width]
    firsts, group = prompt_groups(prompt_ids, prompt_mask)
    cache, last, mask = prompt_pass(model, *split_common_prefix(prompt_ids[firsts], prompt_mask[firsts]))
    logits = last[group]
    if logits_to_keep > 1:
        lengths = mask.sum(-1, keepdim=True)[group]
        tail_mask = torch.cat([mask[group], attention_mask[:, width:-1]], dim=1)
        positions = lengths + torch.arange(logits_to_keep - 1, device=input_ids.device)
        tail = model(input_ids=input_ids[:, width:-1], attention_mask=tail_mask, position_ids=positions,
                     use_cache=True, **{_cache_kwarg(model): _expand_cache(cache, group)})
        logits = torch.cat([logits, tail.logits], dim=1)
    logp = (logits.float() / temperature).log_softmax(-1)
    token_logps = logp.gather(-1, input_ids[:, width:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if compute_entropy else None
    return token_logps, entropy


def shared_generate(model: Any, padded_ids: Any, attention_mask: Any, generation_config: Any) -> Any:
    """`model.generate` on left-padded rows that repeat prompts, sharing the prompt work.

    All prompt tokens but each row's last are prefilled once per unique prompt (their common
    prefix once for all), at their true positions as `generate` numbers them; the cache is
    expanded to the rows and `generate` continues from it.

    Returns:
        (generate's output: [prompt as fed | completion] ids, the width of the prompt as fed);
        the completions are `output[:, width:]`.
    """
    import torch

    firsts, group = prompt_groups(padded_ids, attention_mask)
    prefix, rest_ids, rest_mask = split_common_prefix(padded_ids[firsts], attention_mask[firsts])
    with torch.no_grad():
        cache, _, _ = prompt_pass(model, prefix, rest_ids[:, :-1], rest_mask[:, :-1])
    rows = len(group)
    input_ids = torch.cat([prefix.expand(rows, -1), rest_ids[group]], dim=1)
    mask = torch.cat([torch.ones_like(prefix).expand(rows, -1), rest_mask[group]], dim=1)
    return model.generate(input_ids=input_ids, attention_mask=mask, generation_config=generation_config,
                          **{_cache_kwarg(model): _expand_cache(cache, group)}), input_ids.shape[1]


def make_grpo_trainer_class():
    """TRL's GRPOTrainer with group-shared generation and log-probs (imported lazily)."""
    import torch
    from trl import GRPOTrainer
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import pad

    class GroupSharedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose generation, policy and reference passes run each prompt once per group."""

        def _plain(self) -> bool:
            text = self.model.config.get_text_config() if hasattr(self.model, "config") else None
            odd_head = text is not None and any(getattr(text, k, None) for k in
                                                ("final_logit_softcapping", "logit_scale", "logits_scaling"))
            return bool(self.use_vllm or self.use_transformers_continuous_batching or odd_head
                        or getattr(self.args, "cast_lm_head_to_fp32", False))

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **extra):
            if self._plain() or compute_aux_loss or any(v is not None for v in extra.values()):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **extra)
            with self.accelerator.autocast():
                logps, entropies = group_shared_logps(model, input_ids, attention_mask, logits_to_keep,
                                                      self.temperature, compute_entropy)
            return logps, entropies, None

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if self._plain() or images is not None or multimodal_fields:
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            rows = [torch.tensor(ids) for ids in prompt_ids]
            padded = pad(rows, padding_value=self._tokenizer.pad_token_id, padding_side="left")
            mask = pad([torch.ones_like(t) for t in rows], padding_value=0, padding_side="left")
            device = self.accelerator.device
            padded, mask = padded.to(device), mask.to(device)
            with (
                unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                            generation_kwargs=self.generation_kwargs,
                                            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
                as unwrapped,
                torch.no_grad(),
            ):
                out, fed = shared_generate(unwrapped, padded, mask, self.generation_config)
            completions = out[:, fed:].cpu()
            eos = torch.tensor(self.eos_token_ids)
            kept = []
            for row in completions:
                hits = torch.isin(row, eos).nonzero()
                kept.append(row[: int(hits[0]) + 1 if len(hits) else len(row)].tolist())
            return kept, None

    return GroupSharedGRPOTrainer
