"""Scoring: log-probabilities of candidate answers after prompts, computed once per shared piece.

Usage:
    from components.model.scoring import score_candidates
    scores = score_candidates(model, tokenizer, prompts, ["positive", "negative"])   # [n, K] log-probs

* a candidate's tokens + `<|im_end|>` are scored, so "1" and "10", or a label and its prefix,
  are told apart;
* shared prefix (`SharedPrefix`): the tokens every prompt of a call starts with (system
  message, instructions, label list: ~190 of 250 tokens on 20newsgroups) run once; each batch
  continues from their KV cache, so only the rest of each prompt is computed;
* candidate trie (`CandidateTrie`): the prompt runs once, all K candidates then run as one
  packed row over its KV cache, shared candidate prefixes once.

`components.model.decoding` turns these scores (or generated text) into predictions; the
training engine (`components.train.engine`) reuses the shared-prefix pieces.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>")  # ChatML, Gemma, Llama 3
MIN_SHARED_PREFIX = 16  # a common prefix shorter than this is not worth a separate pass
MAX_SCORED_ELEMENTS = 1 << 25  # float32 logits scored at once (128 MB): rows x trie positions x vocabulary


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


class SharedPrefix:
    """The token ids all prompts of a batch job start with, and their KV cache (batch 1).

    Args:
        model: causal LM.
        ids: the common prefix's token ids.
    """

    def __init__(self, model: Any, ids: Sequence[int]):
        import torch

        self.ids = list(ids)
        device = _model_device(model)
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([self.ids], device=device), use_cache=True, logits_to_keep=1)
        self.layers = [(layer.keys, layer.values) for layer in _output_cache(out).layers]

    def cache(self, batch: int):
        """A fresh DynamicCache holding the prefix for `batch` rows (generation appends to it)."""
        from transformers import DynamicCache

        return DynamicCache([(k.expand(batch, -1, -1, -1).contiguous(), v.expand(batch, -1, -1, -1).contiguous())
                             for k, v in self.layers])


def shared_prefix_length(token_lists: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX) -> int:
    """Length of the longest common token prefix, leaving every prompt at least one token; 0 if < minimum.

    Example:
        >>> shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]], minimum=2)
        3
    """
    if not token_lists:
        return 0
    first, limit = token_lists[0], min(len(t) for t in token_lists) - 1
    n = 0
    while n < limit and all(t[n] == first[n] for t in token_lists):
        n += 1
    return n if n >= minimum else 0


def length_order(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Indices of `prompts` from the fewest tokens to the most (stable): batches of similar length carry little
    padding. A held-out slice in its own order padded 1,290 tokens of trec6 prompt rests to 2,328 in batches of 16;
    in this order to 1,752. Each prompt's result does not depend on its batch (padding is masked).

    Example:
        >>> class Chars:  # a stand-in tokenizer: one token per character
        ...     def __call__(self, texts, add_special_tokens=False):
        ...         return {"input_ids": [list(t) for t in texts]}
        >>> length_order(Chars(), ["ccc", "a", "bb", "d"])
        [1, 3, 2, 0]
    """
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]] if prompts else []
    return sorted(range(len(prompts)), key=lengths.__getitem__)


def find_shared_prefix(model: Any, tokenizer: Any, prompts: Sequence[str]) -> SharedPrefix | None:
    """The KV cache of the tokens all `prompts` start with (None for one prompt or a short common prefix)."""
    if len(prompts) < 2:
        return None
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    n = shared_prefix_length(ids)
    return SharedPrefix(model, ids[0][:n]) if n else None


def _encode_after_prefix(tokenizer: Any, prompts: Sequence[str], prefix: SharedPrefix, device: Any):
    """[prefix | left padding | rest of prompt] ids, the full attention mask and the rest's positions."""
    import torch

    n = len(prefix.ids)
    rests = []
    for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]:
        if ids[:n] != prefix.ids or len(ids) <= n:
            raise ValueError("prompt does not start with the shared prefix it was batched with")
        rests.append(ids[n:])
    width = max(len(r) for r in rests)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rest_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rests], device=device)
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
    mask = torch.cat([torch.ones((len(rests), n), dtype=rest_mask.dtype, device=device), rest_mask], dim=1)
    positions = n + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    return rest_ids, mask, positions


def _model_device(model: Any):
    return next(model.parameters()).device


def _cache_kwarg(model: Any) -> str:
    """Name of the forward argument taking a KV cache (`cache` since transformers 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(_base_model(model)).forward).parameters else "past_key_values"


def _base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _output_cache(output: Any) -> Any:
    """The KV cache of a forward pass (`cache` since transformers 5.2x, else `past_key_values`)."""
    return output.cache if getattr(output, "cache", None) is not None else output.past_key_values


class CandidateTrie:
    """The candidates' token prefixes as one tree, fed to the model as a single packed row per prompt.

    Every candidate `c` (its tokens + end-of-turn) needs the model's prediction after each of
    its proper prefixes. Candidates that share a prefix ("comp.sys." on 20newsgroups) share
    those positions: 20newsgroups' 20 candidates need 77 positions instead of 20 x 10 padded
    ones. Each position attends to the prompt and to its own ancestors only (a 4D mask).

    Args:
        cand: token ids of each candidate (from `candidate_ids`).
    """

    def __init__(self, cand: Sequence[Sequence[int]]):
        index: dict[tuple, int] = {}
        for ids in cand:
            for t in range(1, len(ids)):
                index.setdefault(tuple(ids[:t]), len(index))
        self.nodes = list(index)  # prefixes, parents before children
        self.tokens = [node[-1] for node in self.nodes]
        self.depth = [len(node) for node in self.nodes]
        self.ancestors = [[index[node[:d]] for d in range(1, len(node) + 1)] for node in self.nodes]
        # (candidate, node whose logits predict the token, that token) for every token after the first
        self.targets = [(j, index[tuple(ids[:t])], ids[t]) for j, ids in enumerate(cand) for t in range(1, len(ids))]

    def __len__(self) -> int:
        return len(self.nodes)

    def tree_mask(self, device: Any) -> Any:
        """[Q, Q] bool: position i may attend to position j (j is i or one of its ancestors)."""
        import torch

        tree = torch.zeros((len(self), len(self)), dtype=torch.bool, device=device)
        for i, chain in enumerate(self.ancestors):
            tree[i, chain] = True
        return tree


def _attend_mask(model: Any, prompt_mask: Any, tree: Any) -> Any:
    """4D mask [b, 1, Q, K + Q]: each trie position sees the prompt's real tokens and its ancestors (`tree`)."""
    import torch

    b, q = prompt_mask.shape[0], tree.shape[0]
    mask = torch.cat([prompt_mask.bool()[:, None, None, :].expand(b, 1, q, -1), tree.expand(b, 1, q, q)], dim=-1)
    base = _base_model(model)
    if getattr(base.config, "_attn_implementation", "sdpa") == "eager":  # eager attention adds a float mask
        return torch.zeros(mask.shape, dtype=base.dtype, device=mask.device).masked_fill(~mask, torch.finfo(base.dtype).min)
    return mask


def _target_logp(logits: Any, nodes: Any, tokens: Any) -> Any:
    """log p(tokens[t] | position nodes[t]) for every row: [b, T], in float32, rows in chunks of bounded memory."""
    import torch

    b, q, v = logits.shape
    step = max(1, MAX_SCORED_ELEMENTS // max(q * v, 1))
    out = []
    for r in range(0, b, step):
        chunk = logits[r : r + step].float()  # [c, Q, V]
        out.append(chunk[:, nodes, tokens] - torch.logsumexp(chunk, dim=-1)[:, nodes])
    return torch.cat(out)


def score_candidates(
    model: Any, tokenizer: Any, prompts: Sequence[str], candidates: Sequence[str], batch_size: int = 16,
    prefix: SharedPrefix | None = None,
) -> np.ndarray:
    """Log-likelihood of each candidate answer after each prompt, sharing the prompt's KV cache.

    The prompts run once; then every prompt's candidate tokens run as one packed row over its
    cache (`CandidateTrie`: shared candidate prefixes computed once).

    Args:
        model: causal LM.
        tokenizer: its tokenizer.
        prompts: n templated prompts (ending with the assistant generation prompt).
        candidates: K answer strings.
        batch_size: prompts per forward pass.
        prefix: KV cache of the tokens every prompt starts with (only the rest is computed).

    Returns:
        float array [n, K] of summed log-probabilities (answer tokens + end-of-turn).
    """
    import torch

    device = _model_device(model)
    cand = candidate_ids(tokenizer, candidates)
    trie = CandidateTrie(cand)
    first = torch.tensor([ids[0] for ids in cand], device=device)
    node_ids = torch.tensor(trie.tokens, dtype=torch.long, device=device)
    depth = torch.tensor(trie.depth, dtype=torch.long, device=device)
    tree = trie.tree_mask(device)
    tgt_cand = torch.tensor([t[0] for t in trie.targets], dtype=torch.long, device=device)
    tgt_node = torch.tensor([t[1] for t in trie.targets], dtype=torch.long, device=device)
    tgt_tok = torch.tensor([t[2] for t in trie.targets], dtype=torch.long, device=device)
    out = np.zeros((len(prompts), len(cand)), dtype=np.float64)
    order = length_order(tokenizer, prompts)  # batches of similar length; rows are written back in input order
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            rows = order[start : start + batch_size]
            chunk = [prompts[i] for i in rows]
            if prefix is None:
                input_ids, mask = _encode_prompts(tokenizer, chunk, device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                cached = {}
            else:
                input_ids, mask, positions = _encode_after_prefix(tokenizer, chunk, prefix, device)
                cached = {_cache_kwarg(model): prefix.cache(len(chunk))}
            result = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **cached)  # only the last position's logits are needed
            last_logp = torch.log_softmax(result.logits[:, -1].float(), dim=-1)  # [b, V]
            b = input_ids.shape[0]
            scores = last_logp[:, first]  # first candidate tokens [b, K]
            if len(trie):
                logits = model(
                    input_ids=node_ids.expand(b, -1),
                    attention_mask=_attend_mask(model, mask, tree),
                    position_ids=mask.sum(-1, keepdim=True) + depth - 1,
                    use_cache=True,
                    **{_cache_kwarg(model): _output_cache(result)},
                ).logits
                scores = scores.index_add(1, tgt_cand, _target_logp(logits, tgt_node, tgt_tok))
            out[rows] = scores.double().cpu().numpy()
    return out


def score_gold(model: Any, tokenizer: Any, builder: Any, examples: Sequence[dict], answers: Sequence[str],
               batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """`score_candidates` of `answers` after each example's prompt (shared prefix run once), and
    the index of each example's gold answer among `answers`: ([n, K] summed log-probs, [n] ints)."""
    prompts = [builder.prompt(ex) for ex in examples]
    scores = score_candidates(model, tokenizer, prompts, answers, batch_size,
                              prefix=find_shared_prefix(model, tokenizer, prompts))
    gold = np.array([list(answers).index(builder.space.answer(ex["label"])) for ex in examples], dtype=int)
    return scores, gold


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
