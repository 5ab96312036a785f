"""The training engine is exact: shared-prefix SFT and group-shared GRPO give the plain path's numbers."""
from __future__ import annotations

import pytest
import torch

from components.train import engine
from components.train.engine import IGNORE, SharedPrefixCollator, answer_loss, packed_answer_logits
from components.train.grpo_engine import (
    FrozenPrefix,
    PromptStash,
    group_shared_logps,
    prompt_groups,
    shared_generate,
    split_common_prefix,
)

SYSTEM = "You are a precise text classifier. Classify the text into exactly one of these categories: positive, negative."


@pytest.fixture()
def lora_model(tiny_model_dir):
    """Tiny model + tokenizer with a LoRA adapter whose B matrices are non-zero (so it changes outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.eval()  # no dropout: both paths see the same function
    return model, tokenizer


def _rows(tokenizer, texts, answers):
    rows = []
    for text, answer in zip(texts, answers):
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                                               tokenize=False, add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": p + c, "labels": [IGNORE] * len(p) + c})
    return rows


def _plain_loss(model, rows, pad_id):
    """The reference: one right-padded forward over every full row, HF's own causal-LM loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [IGNORE] * (width - len(r["labels"])) for r in rows])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _lora_grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("share,pack", [(True, True), (True, False), (False, False), (False, True)])
def test_shared_prefix_sft_loss_and_lora_gradients_equal_the_plain_path(lora_model, share, pack, attention,
                                                                       monkeypatch):
    model, tokenizer = lora_model
    model.config._attn_implementation = attention
    rows = _rows(tokenizer, ["great film , loved it", "terrible plot", "see you at lunch tomorrow , it was fine"],
                 ["positive", "negative", "negative positive"])
    batch = SharedPrefixCollator(pad_id=tokenizer.pad_token_id, share=share, pack=pack)(rows)
    assert int(batch["pack"]) == pack
    packed_calls = []
    monkeypatch.setattr(engine, "packed_answer_logits",
                        lambda *a: packed_calls.append(1) or packed_answer_logits(*a))
    assert (batch["prefix_ids"].shape[1] > 16) == share  # the system message and instructions are shared
    assert batch["input_ids"].shape[1] < max(len(r["input_ids"]) for r in rows) or not share
    fast, _ = answer_loss(model, batch)
    assert len(packed_calls) == int(pack)  # the packed row was taken when asked
    fast_grads = _lora_grads(model, fast)
    plain = _plain_loss(model, rows, tokenizer.pad_token_id)
    plain_grads = _lora_grads(model, plain)
    assert abs(float(fast) - float(plain)) < 1e-4
    assert fast_grads.keys() == plain_grads.keys() and len(fast_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0 or "lora_A" in name
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4)


def test_answer_loss_reports_token_metrics_only_when_asked(lora_model):
    model, tokenizer = lora_model
    batch = SharedPrefixCollator(pad_id=tokenizer.pad_token_id)(_rows(tokenizer, ["a", "bb"], ["positive", "negative"]))
    _, quiet = answer_loss(model, batch)
    _, loud = answer_loss(model, batch, metrics=True)
    assert "entropy" not in quiet and "mean_token_accuracy" not in quiet
    assert 0 <= loud["mean_token_accuracy"] <= 1 and loud["entropy"] > 0
    assert quiet["answer_tokens"] == float((batch["labels"] != IGNORE).sum())


def test_collator_without_a_long_common_prefix_pads_whole_rows():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, IGNORE, 3]}, {"input_ids": [1, 9, 9, 4], "labels": [IGNORE] * 3 + [4]}]
    out = SharedPrefixCollator(pad_id=0)(rows)
    assert out["prefix_ids"].shape == (1, 0)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3], [1, 9, 9, 4]]
    assert out["labels"][:, -1].tolist() == [3, 4] and int(out["answer_tokens"]) == 1


def _grpo_batch(tokenizer, group_size=3, texts=("great film , loved it", "terrible plot and bad acting , who wrote hamlet")):
    """TRL's layout: left-padded prompts repeated G times, right-padded completions."""
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}],
                                             tokenize=False, add_generation_prompt=True)
               for t in texts]
    completions = ["positive<|im_end|>", "negative", "uncertain positive<|im_end|>"]
    p_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts for _ in range(group_size)]
    c_ids = [tokenizer(completions[i % 3], add_special_tokens=False)["input_ids"] for i in range(len(p_ids))]
    pw, cw = max(map(len, p_ids)), max(map(len, c_ids))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (pw - len(p)) + p + c + [pad] * (cw - len(c)) for p, c in zip(p_ids, c_ids)])
    mask = torch.tensor([[0] * (pw - len(p)) + [1] * (len(p) + len(c)) + [0] * (cw - len(c))
                         for p, c in zip(p_ids, c_ids)])
    return ids, mask, cw


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_group_shared_logps_equal_the_unshared_forward(lora_model, temperature):
    model, tokenizer = lora_model
    ids, mask, keep = _grpo_batch(tokenizer)
    firsts, group = prompt_groups(ids[:, :-keep], mask[:, :-keep])
    assert firsts.tolist() == [0, 3] and group.tolist() == [0, 0, 0, 1, 1, 1]
    assert split_common_prefix(ids[firsts, :-keep], mask[firsts, :-keep])[0].shape[1] > 16  # prefix path taken
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1:-1].float() / temperature
    reference = logits.log_softmax(-1).gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)
    reference_entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    shared, entropy = group_shared_logps(model, ids, mask, keep, temperature, compute_entropy=True)
    valid = mask[:, -keep:].bool()
    torch.testing.assert_close(shared[valid], reference[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy[valid], reference_entropy[valid], atol=1e-4, rtol=1e-4)


def test_group_shared_logps_carry_gradients_like_the_unshared_forward(lora_model):
    model, tokenizer = lora_model
    ids, mask, keep = _grpo_batch(tokenizer, group_size=2)
    valid = mask[:, -keep:].bool()
    shared, _ = group_shared_logps(model, ids, mask, keep)
    fast = _lora_grads(model, shared[valid].sum())
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1:-1]
    reference = logits.log_softmax(-1).gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)
    plain = _lora_grads(model, reference[valid].sum())
    for name, grad in plain.items():
        torch.testing.assert_close(fast[name], grad, atol=1e-4, rtol=1e-4)


def _unshared_logps(model, ids, mask, keep):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1:-1]
    return logits.log_softmax(-1).gather(-1, ids[:, -keep:].unsqueeze(-1)).squeeze(-1)


def test_scattered_groups_run_each_prompt_once_and_give_the_unshared_numbers(lora_model):
    """TRL shuffles the batch before the loss: a group's rows are no longer consecutive."""
    model, tokenizer = lora_model
    ids, mask, keep = _grpo_batch(tokenizer)
    order = torch.tensor([4, 0, 3, 1, 5, 2])
    ids, mask = ids[order], mask[order]
    firsts, group = prompt_groups(ids[:, :-keep], mask[:, :-keep])
    assert firsts.tolist() == [0, 1] and group.tolist() == [0, 1, 0, 1, 0, 1]
    valid = mask[:, -keep:].bool()
    shared, _ = group_shared_logps(model, ids, mask, keep)
    torch.testing.assert_close(shared[valid], _unshared_logps(model, ids, mask, keep)[valid], atol=1e-4, rtol=1e-4)


def test_frozen_prefix_is_kept_across_calls_and_cut_to_a_shorter_prefix(lora_model):
    model, tokenizer = lora_model
    ids, mask, keep = _grpo_batch(tokenizer)
    frozen = FrozenPrefix()
    valid = mask[:, -keep:].bool()
    with torch.no_grad():
        first, _ = group_shared_logps(model, ids, mask, keep, frozen=frozen)
        held, held_ids = frozen.held, frozen.ids
        assert len(held_ids) > 16  # the system message and instructions
        # two prompts that share more than the held prefix ("great film , "): the held cache serves its part,
        # the rest of their common prefix runs with each prompt's rest
        more, more_mask, _ = _grpo_batch(tokenizer, group_size=2, texts=("great film , loved it", "great film , hated it"))
        prefix, _, _ = split_common_prefix(more[:, :-keep][[0, 2]], more_mask[:, :-keep][[0, 2]])
        assert prefix.shape[1] > len(held_ids)
        again, _ = group_shared_logps(model, more, more_mask, keep, frozen=frozen)
        assert frozen.held is held and frozen.ids == held_ids  # served from the held cache, nothing recomputed
        plain = _unshared_logps(model, ids, mask, keep)
        plain_more = _unshared_logps(model, more, more_mask, keep)
    torch.testing.assert_close(first[valid], plain[valid], atol=1e-4, rtol=1e-4)
    more_valid = more_mask[:, -keep:].bool()
    torch.testing.assert_close(again[more_valid], plain_more[more_valid], atol=1e-4, rtol=1e-4)
    assert (again[~more_valid] == 0).all()  # completion padding gets 0, as in TRL's pass
    layers, common = frozen.layers(model, torch.tensor([held_ids[:5]]))
    assert common == 5 and layers[0][0].shape[2] == 5 and frozen.held is held  # a cut, not a new pass


def test_prompt_stash_from_generation_gives_the_losss_logps_and_gradients(lora_model):
    """Generation's prompt pass (kept with its graph) serves the policy loss: same log-probs and LoRA gradients
    as the unshared forward, on the shuffled rows the loss sees."""
    from transformers import GenerationConfig

    model, tokenizer = lora_model
    ids, mask, keep = _grpo_batch(tokenizer, group_size=2)
    width = ids.shape[1] - keep
    config = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out, fed, stash = shared_generate(model, ids[:, :width], mask[:, :width], config, keep_graph=True)
        plain = model.generate(input_ids=ids[:, :width], attention_mask=mask[:, :width], generation_config=config)
    assert torch.equal(out[:, fed:], plain[:, width:])  # generation unchanged by keeping the graph
    order = torch.tensor([3, 1, 0, 2])
    ids, mask = ids[order], mask[order]
    valid = mask[:, -keep:].bool()
    fast, _ = stash.logps(model, ids, mask, keep)
    fast_grads = _lora_grads(model, fast[valid].sum())
    reference = _unshared_logps(model, ids, mask, keep)
    torch.testing.assert_close(fast[valid], reference[valid].detach(), atol=1e-4, rtol=1e-4)
    for name, grad in _lora_grads(model, reference[valid].sum()).items():
        torch.testing.assert_close(fast_grads[name], grad, atol=1e-4, rtol=1e-4)
    other = ids.clone()
    other[0, width - 2] += 1  # a prompt generation never saw
    assert stash.logps(model, other, mask, keep) is None


def test_shared_generation_is_the_plain_generation(lora_model):
    from transformers import GenerationConfig

    model, tokenizer = lora_model
    ids, mask, keep = _grpo_batch(tokenizer)
    prompt_ids, prompt_mask = ids[:, :-keep], mask[:, :-keep]
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        shared, fed, stash = shared_generate(model, prompt_ids, prompt_mask, config)
    assert torch.equal(plain[:, prompt_ids.shape[1]:], shared[:, fed:])
    prefix, rests, _ = split_common_prefix(prompt_ids, prompt_mask)
    assert prefix.shape[1] > 16 and rests.shape[0] == len(prompt_ids)  # system message + instructions shared
