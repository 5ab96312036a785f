"""GRPO from an SFT checkpoint on the tiny model: two steps, files, logging, resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from components.train.configs import RLConfig, SFTConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_sft import make_toy_data  # noqa: E402  (shared toy dataset layout)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    from components.train.sft import train_sft

    root = tmp_path_factory.mktemp("rl")
    data = make_toy_data(root / "data")
    config = SFTConfig(model=str(tiny_model_dir), train_size=8, eval_size=0, batch_size=4, max_steps=1,
                       save_steps=10, logging_steps=1, learning_rate=1e-2)
    return data, train_sft("toy", config, out_dir=root / "sft", data_dir=data)


def rl_config(**changes) -> RLConfig:
    base = dict(train_size=8, eval_size=4, num_generations=2, batch_size=4, max_steps=2, max_completion_length=4,
                eval_every=1, eval_batch_size=8, save_steps=1, learning_rate=1e-2, beta=0.04)
    base.update(changes)
    return RLConfig(**base)


def test_grpo_two_steps_from_sft_checkpoint(sft_run, tmp_path):
    from components.model.models import load_model
    from components.train.rl import train_rl

    data, sft_dir = sft_run
    logged = []
    out = train_rl("toy", rl_config(), sft_dir=sft_dir, out_dir=tmp_path / "rl",
                   log_fn=lambda m, s: logged.append((s, m)), data_dir=data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    assert [h["step"] for h in metrics["eval_history"]] == [0, 1, 2]  # step 0 = the SFT policy
    for name in ("adapter_model.safetensors", "adapter_config.json", "gencls_config.json", "reward_curve.png",
                 "tokenizer_config.json"):
        assert (out / name).exists(), name
    assert not (out / "ref").exists()  # only the trained adapter, not TRL's frozen reference copy
    info = json.loads((out / "gencls_config.json").read_text())
    assert info["base_model"] == json.loads((sft_dir / "gencls_config.json").read_text())["base_model"]
    keys = {k for _, m in logged for k in m}
    assert {"rl/reward", "rl/zero_variance_groups", "rl/eval_macro_f1"} <= keys
    # a random tiny model gets the same (invalid) reward in every group: no signal, as logged
    assert metrics["train_history"][0]["zero_variance_groups"] == 1.0
    model, _ = load_model(None, adapter=out)
    assert hasattr(model, "peft_config")


class Interrupt(Exception):
    pass


def test_grpo_resumes_after_interruption(sft_run, tmp_path):
    from components.train.rl import train_rl

    data, sft_dir = sft_run
    config = rl_config(max_steps=3, eval_size=0)

    def crash(metrics, step):
        if step >= 2 and "rl/reward" in metrics:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_rl("toy", config, sft_dir=sft_dir, out_dir=tmp_path / "rl", log_fn=crash, data_dir=data)
    out = train_rl("toy", config, sft_dir=sft_dir, out_dir=tmp_path / "rl", data_dir=data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 1 and metrics["global_step"] == 3
    assert metrics["focus_kept"] == 6  # the resumed run trains on the prompts the first one chose (focus.json)



def test_no_signal_chance_counts_reward_classes():
    import numpy as np

    from components.train.rl import no_signal_chance, pick_informative, prompts_per_run

    # answers: gold (1), uncertain (0.5), two wrong labels (0); the rest of the mass is invalid text (-0.5)
    rewards = np.array([[1.0, 0.5, 0.0, 0.0]] * 4)
    probs = np.array([[1.0, 0, 0, 0],  # sure and right: every group all 1
                      [0, 0, 0.5, 0.5],  # sure it is one of the wrong labels: every group all 0
                      [0.5, 0, 0.25, 0.25],  # right half the time
                      [0.1, 0.45, 0.45, 0.0]])  # the wrong classes are not one class
    chances = no_signal_chance(probs, rewards, -0.5, 4)
    assert chances[:2] == pytest.approx([1.0, 1.0])
    assert chances[2] == pytest.approx(2 * 0.5**4)
    assert chances[3] == pytest.approx(0.1**4 + 0.45**4 + 0.45**4)  # not 0.1**4 + 0.9**4
    # mass the answers leave is invalid text, its own reward class
    assert no_signal_chance(np.array([[0.5, 0.0]]), np.array([[1.0, 0.0]]), -0.5, 2)[0] == pytest.approx(0.5)
    assert pick_informative(chances, 2) == [2, 3]
    # the trainer's own count of prompts per generation round
    from trl import GRPOConfig

    config = rl_config(max_steps=3, batch_size=8, num_generations=4, grad_accum=2)
    args = GRPOConfig(output_dir="unused", per_device_train_batch_size=8, gradient_accumulation_steps=2,
                      num_generations=4, max_steps=3, use_cpu=True, report_to=[])
    assert prompts_per_run(config) == 3 * args.generation_batch_size // args.num_generations == 12


def test_focus_keeps_the_prompts_with_learning_signal(sft_run, monkeypatch):
    import numpy as np

    import components.model.scoring as scoring
    from components.model.prompts import Strategy
    from components.train.rl import focus_examples, load_policy
    from components.train.sft import load_data, make_builder

    data, sft_dir = sft_run
    model, tokenizer, _ = load_policy(sft_dir)
    labels, train, _, pool = load_data("toy", data, 0, 0, 0)
    builder = make_builder(tokenizer, labels, Strategy.parse("numeric,uncertain"), pool, 64, 0)
    # a policy whose gold-answer probability is known per example: 0.6 for ids ending in 1 or 4 (most
    # informative), 0.9 for 7, ~0 for 9 (sure and wrong: no signal), else 1.0 (sure and right: no signal)
    p_gold = {ex["id"]: {"1": 0.6, "4": 0.6, "7": 0.9, "9": 1e-9}.get(ex["id"][-1], 1.0) for ex in train}
    seen = []

    def fake_scores(model, tokenizer, builder, examples, answers, batch_size=16):
        seen.append(list(answers))
        gold = np.array([answers.index(builder.space.answer(ex["label"])) for ex in examples])
        probs = np.full((len(examples), len(answers)), 1e-12)
        for i, ex in enumerate(examples):
            probs[i, gold[i]] = p_gold[ex["id"]]
            probs[i, (gold[i] + 1) % 2] = 1.0 - p_gold[ex["id"]]  # the other real label
        return np.log(np.maximum(probs, 1e-300)), gold

    monkeypatch.setattr(scoring, "score_gold", fake_scores)
    informative = {i for i, p in p_gold.items() if p == 0.6}
    likely = {i for i, p in p_gold.items() if p == 0.9}
    config = rl_config(max_steps=len(informative) + len(likely), batch_size=4, num_generations=4,
                       focus_candidates=len(train))
    kept, stats = focus_examples(model, tokenizer, builder, train, config, log=lambda m: None)
    assert model.training  # handed back in train mode
    assert seen[0] == ["1", "2", "uncertain"]  # numeric answers and `uncertain` scored, as the policy writes them
    assert {ex["id"] for ex in kept} == informative | likely
    assert stats["focus_kept"] == len(kept) and stats["focus_scored"] == len(train)
    wrong = sum(p < 0.5 for p in p_gold.values())
    assert wrong and stats["focus_policy_accuracy"] == pytest.approx(1 - wrong / len(train))
    expected = (len(informative) * (0.6**4 + 0.4**4) + len(likely) * (0.9**4 + 0.1**4)) / len(kept)
    assert stats["focus_no_signal_kept"] == pytest.approx(expected, abs=1e-6)
    # focus=all, a pool no larger than the run needs, or a reasoning strategy: the examples as given
    assert focus_examples(model, tokenizer, builder, train, rl_config(focus="all"))[0] == train
    assert focus_examples(model, tokenizer, builder, train[:4], config) == (train[:4], {})
    thinking = make_builder(tokenizer, labels, Strategy.parse("reasoning"), pool, 64, 0)
    assert focus_examples(model, tokenizer, thinking, train, config) == (train, {})
    # focus_candidates below what the run needs still gives the run its prompts
    assert len(focus_examples(model, tokenizer, builder, train, rl_config(focus_candidates=1))[0]) == 4


def test_rl_run_records_focus_and_a_completion_budget_that_fits_the_labels(sft_run, tmp_path):
    from components.train.rl import FOCUS_FILE, train_rl

    data, sft_dir = sft_run
    logged = []
    config = rl_config(max_steps=1, eval_size=0, max_completion_length=1)  # 2 prompts of 8; labels need 3 tokens
    out = train_rl("toy", config, sft_dir=sft_dir, out_dir=tmp_path / "rl", data_dir=data,
                   log_fn=lambda m, s: logged.append(m))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["focus_kept"] == 2 and metrics["focus_scored"] == 8
    assert any("rl/focus_no_signal_kept" in m for m in logged)
    info = json.loads((out / "gencls_config.json").read_text())
    assert info["config"]["max_completion_length"] > 1  # raised to the longest answer + end of turn
    chosen = json.loads((out / FOCUS_FILE).read_text())["ids"]
    assert len(chosen) == 2


def test_rl_checkpoint_is_chosen_the_way_its_cell_decodes(sft_run, tmp_path):
    """select_strategy decodes the held-out slice as the adapter will be used (perplexity never answers
    off the label set, while the random tiny policy's generative answers are all invalid)."""
    from components.train.rl import train_rl

    data, sft_dir = sft_run
    out = train_rl("toy", rl_config(max_steps=1), sft_dir=sft_dir, out_dir=tmp_path / "rl", data_dir=data,
                   select_strategy="decoding=perplexity")
    metrics = json.loads((out / "metrics.json").read_text())
    assert "perplexity" in metrics["select_strategy"]
    assert "perplexity" in json.loads((out / "gencls_config.json").read_text())["select_strategy"]
    assert [h["invalid_rate"] for h in metrics["eval_history"]] == [0.0, 0.0]
    generative = train_rl("toy", rl_config(max_steps=1), sft_dir=sft_dir, out_dir=tmp_path / "rl-gen", data_dir=data)
    history = json.loads((generative / "metrics.json").read_text())["eval_history"]
    assert all(h["invalid_rate"] > 0 for h in history)


def test_rl_selects_on_sfts_held_out_slice_when_that_slice_is_also_the_gate(tiny_model_dir, tmp_path):
    """The study trains on every pooled example, so SFT's champion gate falls back to its own held-out
    selection slice (gate.json selection_slice). RL must still choose its checkpoint on that slice, not
    drop it as "the gate" and keep its last step unselected (the bug this test pins)."""
    from components.train.rl import train_rl
    from components.train.sft import GATE_FILE, train_sft

    data = make_toy_data(tmp_path / "data")
    sft_dir = train_sft("toy", SFTConfig(model=str(tiny_model_dir), train_size=0, eval_size=4, batch_size=4,
                                          max_steps=1, eval_every_steps=1, eval_batch_size=8, save_steps=10,
                                          logging_steps=1, learning_rate=1e-2),
                        out_dir=tmp_path / "sft", data_dir=data)
    gate = json.loads((sft_dir / GATE_FILE).read_text())
    assert gate["selection_slice"] and len(gate["ids"]) == 4
    out = train_rl("toy", rl_config(train_size=0, max_steps=1), sft_dir=sft_dir, out_dir=tmp_path / "rl",
                   data_dir=data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["eval_history"]] == [0, 1]
    assert metrics["best"] is not None and metrics["best"]["step"] in (0, 1)
    assert json.loads((out / "gencls_config.json").read_text())["best_step"] == metrics["best"]["step"]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_group_shared_steps_reuse_generations_prompt_pass_and_the_reference_prefix(sft_run, tmp_path, monkeypatch,
                                                                                   grad_accum):
    """In a real GRPO run the loss continues from generation's prompt pass (same log-probs as a fresh pass, so
    the weights did not move in between) and the reference's prompt prefix runs once for the whole run. With
    gradient accumulation one generation serves two loss passes (TRL's steps_per_generation): no reuse."""
    import torch

    from components.train import grpo_engine
    from components.train.rl import train_rl

    used, prefix_runs = [], []
    stash_logps, frozen_layers = grpo_engine.PromptStash.logps, grpo_engine.FrozenPrefix.layers

    def checked_logps(self, model, input_ids, attention_mask, logits_to_keep, temperature=1.0, compute_entropy=False):
        out = stash_logps(self, model, input_ids, attention_mask, logits_to_keep, temperature, compute_entropy)
        if out is not None:
            with torch.no_grad():
                fresh, _ = grpo_engine.group_shared_logps(model, input_ids, attention_mask, logits_to_keep,
                                                          temperature)
            torch.testing.assert_close(out[0].detach(), fresh, atol=1e-5, rtol=1e-5)
            used.append(out[0].shape)
        return out

    def counted_layers(self, model, prefix_ids):
        before = self.held
        out = frozen_layers(self, model, prefix_ids)
        prefix_runs.append(self.held is not before)
        return out

    monkeypatch.setattr(grpo_engine.PromptStash, "logps", checked_logps)
    monkeypatch.setattr(grpo_engine.FrozenPrefix, "layers", counted_layers)
    data, sft_dir = sft_run
    train_rl("toy", rl_config(max_steps=3, eval_every=10, temperature=1.5, grad_accum=grad_accum,
                              batch_size=4 // grad_accum), sft_dir=sft_dir, out_dir=tmp_path / "rl", data_dir=data)
    assert len(used) == (3 if grad_accum == 1 else 0)  # every step's loss, or none
    assert prefix_runs and prefix_runs[0] and not any(prefix_runs[1:])  # the reference prefix ran once
