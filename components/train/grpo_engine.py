"""Group-shared GRPO: the G completions of a prompt share its prompt work (a subclass of TRL's GRPOTrainer).

    from components.train.grpo_engine import make_grpo_trainer_class, group_shared_logps

Exact rewrites of what TRL's GRPOTrainer computes, each cheaper on the same numbers:

* the G completions of one prompt are rows with an identical prompt (consecutive from TRL's
  RepeatSampler, scattered after TRL shuffles the batch for the loss). Generation, the
  policy's log-probs (with gradients) and the reference's run each distinct prompt once and
  expand its cache to the G rows; only the completion tokens run per row. The prompts'
  common prefix (system message, instructions, label list) runs once for all of them.
* the reference policy never changes, so its cache of that prefix is kept from step to step
  (`FrozenPrefix`).
* the policy's prompt pass of a step is the one generation made: generation runs it with
  gradients and keeps it (`PromptStash`), and the loss continues from it with the completions
  (the weights do not move between the two when every step generates: steps_per_generation = 1,
  num_iterations = 1; otherwise the loss runs its own prompt pass).

Per-token log-probs equal TRL's unshared computation (tests/test_engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from components.model.scoring import MIN_SHARED_PREFIX, _cache_kwarg, shared_prefix_length
from components.train.engine import prefix_layers_of, prompt_pass


def prompt_groups(prompt_ids: Any, prompt_mask: Any) -> tuple[Any, Any]:
    """(first row of each distinct prompt, in order of first appearance; group index of every row).

    Rows need not be consecutive: TRL shuffles the generation batch before the loss, so the
    policy pass sees a group's G rows scattered; each distinct prompt still runs once.

    Example:
        >>> import torch
        >>> ids = torch.tensor([[1, 2], [1, 2], [3, 4], [3, 4]])
        >>> [t.tolist() for t in prompt_groups(ids, torch.ones_like(ids))]
        [[0, 2], [0, 0, 1, 1]]
        >>> [t.tolist() for t in prompt_groups(ids[[2, 0, 3, 1]], torch.ones_like(ids))]
        [[0, 1], [0, 1, 0, 1]]
    """
    import torch

    seen: dict[tuple, int] = {}
    firsts: list[int] = []
    group: list[int] = []
    for i, key in enumerate(zip(map(tuple, prompt_ids.tolist()), map(tuple, prompt_mask.tolist()))):
        if key not in seen:
            seen[key] = len(firsts)
            firsts.append(i)
        group.append(seen[key])
    device = prompt_ids.device
    return torch.tensor(firsts, dtype=torch.long, device=device), torch.tensor(group, dtype=torch.long, device=device)


def _expand_cache(cache: Any, index: Any) -> Any:
    """A DynamicCache whose row i is row `index[i]` of `cache` (differentiable)."""
    from transformers import DynamicCache

    return DynamicCache([(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                         for layer in cache.layers])


def split_common_prefix(prompt_ids: Any, prompt_mask: Any, min_prefix: int = MIN_SHARED_PREFIX,
                        max_prefix: int | None = None) -> tuple[Any, Any, Any]:
    """Left-padded prompts -> (common prefix [1, n], left-padded rests [R, W], their mask).

    n is the longest token prefix all rows' real tokens share, keeping at least one token in
    every rest (0 for a single row or a prefix shorter than `min_prefix`), at most `max_prefix`.

    Example:
        >>> import torch
        >>> ids = torch.tensor([[0, 5, 6, 7], [5, 6, 8, 9]])
        >>> [t.tolist() for t in split_common_prefix(ids, (ids > 0).long(), min_prefix=2)]
        [[[5, 6]], [[0, 7], [8, 9]], [[0, 1], [1, 1]]]
    """
    import torch

    rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
    n = shared_prefix_length(rows, min_prefix) if len(rows) > 1 else 0
    n = n if max_prefix is None else min(n, max_prefix)
    rests = [row[n:] for row in rows]
    width = max(len(r) for r in rests)
    pad = int(prompt_ids[0, 0]) if not prompt_mask[0, 0] else 0
    device = prompt_ids.device
    rest_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rests], dtype=prompt_ids.dtype, device=device)
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], dtype=prompt_mask.dtype,
                             device=device)
    return torch.tensor([rows[0][:n]], dtype=prompt_ids.dtype, device=device), rest_ids, rest_mask


class FrozenPrefix:
    """The prompt prefix's key/value cache under weights that never change (GRPO's reference policy), kept
    across steps: the system message, instructions and label list run once per run instead of once per step.

    `layers(model, prefix_ids)` -> (per-layer (keys, values) [1, ..., l, ...], l): l is the number of
    leading tokens of `prefix_ids` the held cache covers (a causal cache cut at l is the cache of those l
    tokens); when that is under MIN_SHARED_PREFIX the prefix runs and is held instead.
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.held: list = []

    def layers(self, model: Any, prefix_ids: Any) -> tuple[list, int]:
        import torch

        ids = prefix_ids[0].tolist()
        common = 0
        while common < min(len(ids), len(self.ids)) and ids[common] == self.ids[common]:
            common += 1
        if common < min(MIN_SHARED_PREFIX, len(ids)):
            with torch.no_grad():
                self.ids, self.held = ids, prefix_layers_of(model, prefix_ids)
            common = len(ids)
        return [(k[:, :, :common], v[:, :, :common]) for k, v in self.held], common


def group_shared_logps(model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int,
                       temperature: float = 1.0, compute_entropy: bool = False,
                       frozen: FrozenPrefix | None = None) -> tuple[Any, Any]:
    """Per-token log-probs (and entropies) of the last `logits_to_keep` tokens of each row.

    The same numbers as one forward over [prompt | completion] per row (TRL's unshared pass;
    RoPE attention depends on relative positions only, so dropping the left padding changes
    nothing but rounding): the prompts' common prefix runs once, each unique prompt's rest once,
    its last position predicts the first completion token, its cache is expanded to its G rows,
    and only the completions run per row. `frozen` (weights that never change: the reference
    policy) keeps the prefix's cache from one call to the next.
    """
    import torch

    width = input_ids.shape[1] - logits_to_keep
    prompt_ids, prompt_mask = input_ids[:, :width], attention_mask[:, :width]
    firsts, group = prompt_groups(prompt_ids, prompt_mask)
    prefix, rests, rest_mask = split_common_prefix(prompt_ids[firsts], prompt_mask[firsts])
    held = None
    if frozen is not None and prefix.shape[1]:
        held, common = frozen.layers(model, prefix)
        if common < prefix.shape[1]:
            prefix, rests, rest_mask = split_common_prefix(prompt_ids[firsts], prompt_mask[firsts],
                                                           max_prefix=common)
    cache, last, mask = prompt_pass(model, prefix, rests, rest_mask, prefix_layers=held)
    logits = last[group]
    if logits_to_keep > 1:
        tail = _continue(model, cache, mask, group, input_ids[:, width:-1], attention_mask[:, width:-1])
        logits = torch.cat([logits, tail], dim=1)
    return _token_logps(logits, input_ids[:, width:], attention_mask[:, width:], temperature, compute_entropy)


def _continue(model: Any, cache: Any, mask: Any, group: Any, ids: Any, ids_mask: Any) -> Any:
    """Logits of `ids` [B, L] run after row `group[i]` of the prompt `cache` (its `mask`), at their true positions."""
    import torch

    positions = mask.sum(-1, keepdim=True)[group] + torch.arange(ids.shape[1], device=ids.device)
    out = model(input_ids=ids, attention_mask=torch.cat([mask[group], ids_mask], dim=1), position_ids=positions,
                use_cache=True, **{_cache_kwarg(model): _expand_cache(cache, group)})
    return out.logits


def _token_logps(logits: Any, targets: Any, mask: Any, temperature: float,
                 compute_entropy: bool) -> tuple[Any, Any]:
    """(log-prob of each target token, the distribution's entropy or None) from logits [B, L, V]; 0 where `mask`
    is 0 (completion padding), as TRL's own pass gives."""
    logp = (logits.float() / temperature).log_softmax(-1)
    pad = mask == 0
    token_logps = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(pad, 0.0)
    return token_logps, ((-(logp.exp() * logp).sum(-1)).masked_fill(pad, 0.0) if compute_entropy else None)


@dataclass
class PromptStash:
    """The prompt pass generation ran for a step's distinct prompts (all tokens but each prompt's last, with
    gradients), for the loss to continue from: `keys` (each prompt's real tokens), `cache`, `mask`."""

    keys: dict
    cache: Any
    mask: Any
    step: int = -1

    @classmethod
    def run(cls, model: Any, padded_ids: Any, attention_mask: Any) -> tuple["PromptStash", Any, Any]:
        """(stash, group index of every row, the rows as `generate` is fed them: [common prefix | rest] ids and
        mask): the prompt pass of the distinct prompts among left-padded rows, with gradients when enabled."""
        import torch

        firsts, group = prompt_groups(padded_ids, attention_mask)
        prefix, rest_ids, rest_mask = split_common_prefix(padded_ids[firsts], attention_mask[firsts])
        cache, _, mask = prompt_pass(model, prefix, rest_ids[:, :-1], rest_mask[:, :-1])
        keys = {_real(ids, m): i for i, (ids, m) in enumerate(zip(padded_ids[firsts], attention_mask[firsts]))}
        rows = len(firsts)
        fed = torch.cat([prefix.expand(rows, -1), rest_ids], dim=1)[group]
        fed_mask = torch.cat([torch.ones_like(prefix).expand(rows, -1), rest_mask], dim=1)[group]
        return cls(keys, cache, mask), group, (fed, fed_mask)

    def logps(self, model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int, temperature: float = 1.0,
              compute_entropy: bool = False) -> tuple[Any, Any] | None:
        """`group_shared_logps` continued from the stash (the last prompt token and the completions run per row);
        None when a row's prompt is not in it."""
        import torch

        width = input_ids.shape[1] - logits_to_keep
        rows = [self.keys.get(_real(ids, m)) for ids, m in zip(input_ids[:, :width], attention_mask[:, :width])]
        if width < 1 or None in rows:
            return None
        group = torch.tensor(rows, dtype=torch.long, device=input_ids.device)
        logits = _continue(model, self.cache, self.mask, group, input_ids[:, width - 1:-1],
                           attention_mask[:, width - 1:-1])
        return _token_logps(logits, input_ids[:, width:], attention_mask[:, width:], temperature, compute_entropy)


def _real(ids: Any, mask: Any) -> tuple:
    """A prompt row's real tokens (its padding dropped), as a dict key."""
    return tuple(ids[mask.bool()].tolist())


def shared_generate(model: Any, padded_ids: Any, attention_mask: Any, generation_config: Any,
                    keep_graph: bool = False) -> tuple[Any, int, PromptStash | None]:
    """`model.generate` on left-padded rows that repeat prompts, sharing the prompt work.

    All prompt tokens but each row's last are prefilled once per unique prompt (their common
    prefix once for all), at their true positions as `generate` numbers them; the cache is
    expanded to the rows and `generate` continues from it. With `keep_graph` that prompt pass
    runs with gradients and is handed back for the loss (`PromptStash`).

    Returns:
        (generate's output: [prompt as fed | completion] ids, the width of the prompt as fed, the stash or None);
        the completions are `output[:, width:]`.
    """
    import torch

    with torch.set_grad_enabled(keep_graph):
        stash, group, (input_ids, mask) = PromptStash.run(model, padded_ids, attention_mask)
    with torch.no_grad():  # generate gets a copy outside the graph; the stash keeps the graph for the loss
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=generation_config,
                             **{_cache_kwarg(model): _expand_cache(stash.cache, group)})
    return out, input_ids.shape[1], (stash if keep_graph else None)


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
            stash = None
            if torch.is_grad_enabled():  # the loss's pass (the reference's runs without gradients, before it)
                stash, self._gencls_stash = getattr(self, "_gencls_stash", None), None  # used once
            with self.accelerator.autocast():
                found = None
                if stash is not None and stash.step == self.state.global_step:
                    found = stash.logps(model, input_ids, attention_mask, logits_to_keep, self.temperature,
                                        compute_entropy)
                logps, entropies = found or group_shared_logps(model, input_ids, attention_mask, logits_to_keep,
                                                               self.temperature, compute_entropy,
                                                               self._frozen_prefix(model))
            return logps, entropies, None

        def _keep_prompt_graph(self) -> bool:
            """Whether generation's prompt pass can serve the loss: the weights must not move in between (every
            step generates for itself), one process and no DeepSpeed/FSDP (their parameters are gathered for
            generation only), no recomputation."""
            return bool(self.model.training and self.args.steps_per_generation == 1 and self.num_iterations == 1
                        and self.accelerator.num_processes == 1 and not self.args.gradient_checkpointing
                        and not (self.is_deepspeed_enabled or self.is_fsdp_enabled))

        def _frozen_prefix(self, model) -> FrozenPrefix | None:
            """The reference pass's prefix cache, kept across steps (None for the policy: its weights move)."""
            if torch.is_grad_enabled() or getattr(self.args, "sync_ref_model", False):
                return None
            active = getattr(self.accelerator.unwrap_model(model), "active_adapter", None)
            if not ((self.ref_model is not None and model is self.ref_model) or active in ("ref", ["ref"])):
                return None
            if getattr(self, "_gencls_frozen", None) is None:
                self._gencls_frozen = FrozenPrefix()
            return self._gencls_frozen

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
                out, fed, stash = shared_generate(unwrapped, padded, mask, self.generation_config,
                                                  keep_graph=self._keep_prompt_graph())
            if stash is not None:
                stash.step = self.state.global_step
            self._gencls_stash = stash
            completions = out[:, fed:].cpu()
            eos = torch.tensor(self.eos_token_ids)
            kept = []
            for row in completions:
                hits = torch.isin(row, eos).nonzero()
                kept.append(row[: int(hits[0]) + 1 if len(hits) else len(row)].tolist())
            return kept, None

    return GroupSharedGRPOTrainer
