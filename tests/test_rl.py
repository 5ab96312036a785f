"""GRPO from an SFT checkpoint on the tiny model: two steps, files, logging, resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from components.training_common import RLConfig, SFTConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_sft import make_toy_data  # noqa: E402  (shared toy dataset layout)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    from components.sft import train_sft

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
    from components.models import load_model
    from components.rl import train_rl

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
    from components.rl import train_rl

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


def test_no_signal_chance_and_pick():
    import numpy as np

    from components.rl import no_signal_chance, pick_informative, prompts_per_run

    chances = no_signal_chance(np.log([1.0, 1e-9, 0.5, 0.9]), 4)
    assert chances[0] == pytest.approx(1.0) and chances[1] == pytest.approx(1.0)  # sure right / sure wrong
    assert chances[2] == pytest.approx(2 * 0.5**4)  # the most informative a prompt can be
    assert chances[3] == pytest.approx(0.9**4 + 0.1**4)
    assert pick_informative(chances, 2) == [2, 3]
    # temperature flattens: at T=2 a gold answer with p=0.25 is sampled with p=0.5
    assert no_signal_chance(np.log([0.25]), 4, temperature=2.0)[0] == pytest.approx(2 * 0.5**4)
    assert prompts_per_run(rl_config(max_steps=3, batch_size=8, num_generations=4, grad_accum=2)) == 12


def test_focus_keeps_the_prompts_with_learning_signal(sft_run):
    import numpy as np

    from components.decoding import find_shared_prefix, score_candidates
    from components.rl import focus_examples, load_policy, no_signal_chance
    from components.sft import load_data, make_builder
    from components.prompts import Strategy

    data, sft_dir = sft_run
    model, tokenizer, _ = load_policy(sft_dir)
    labels, train, _, pool = load_data("toy", data, 0, 0, 0)
    builder = make_builder(tokenizer, labels, Strategy.parse("naive"), pool, 64, 0)
    config = rl_config(max_steps=2, batch_size=4, num_generations=2, focus_candidates=len(train))
    kept, stats = focus_examples(model, tokenizer, builder, train, config, log=lambda m: None)
    assert model.training  # handed back in train mode
    assert len(kept) == 4 and stats["focus_scored"] == len(train)
    # independent check: the kept examples are exactly the 4 lowest no-signal chances of the whole pool
    answers = builder.space.answers
    prompts = [builder.prompt(ex) for ex in train]
    scores = score_candidates(model, tokenizer, prompts, answers, config.eval_batch_size,
                              prefix=find_shared_prefix(model, tokenizer, prompts))
    gold = [answers.index(builder.space.answer(ex["label"])) for ex in train]
    chance = dict(zip([ex["id"] for ex in train], no_signal_chance(scores[np.arange(len(train)), gold], 2)))
    assert {ex["id"] for ex in kept} == set(sorted(chance, key=chance.get)[:4])
    assert stats["focus_no_signal_kept"] <= stats["focus_no_signal_scored"]
    assert stats["focus_no_signal_kept"] == pytest.approx(np.mean([chance[ex["id"]] for ex in kept]), abs=1e-4)
    # focus=all, or a pool no larger than the run needs: the examples as given, nothing scored
    assert focus_examples(model, tokenizer, builder, train, rl_config(focus="all"))[0] == train
    assert focus_examples(model, tokenizer, builder, train[:4], config) == (train[:4], {})
