"""Rule-based rewards: every case, including reward-hacking attempts."""
from __future__ import annotations

import pytest

from components.model.prompts import LabelSpace, PromptBuilder, Strategy
from components.train.rewards import (
    build_rewards,
    completion_text,
    make_format_reward,
    make_label_reward,
    zero_variance_share,
)

LABELS = {"ABBR": "abbreviation", "HUM": "a person", "NUM": "a number"}


def space(**kw) -> LabelSpace:
    return LabelSpace.from_strategy(LABELS, Strategy(**kw))


@pytest.mark.parametrize("answer, reward", [
    ("HUM", 1.0),                 # exact gold label
    (" hum. ", 1.0),              # case, whitespace, one trailing period are forgiven
    ('"HUM"', 1.0),               # surrounding quotes forgiven
    ("NUM", 0.0),                 # wrong label
    ("HUM or NUM", -0.5),         # hedging between labels
    ("ABBR, HUM, NUM", -0.5),     # listing every label
    ("HUM NUM", -0.5),            # two labels
    ("HUM because it is a person", -0.5),  # label with extra text
    ("The answer is HUM", -0.5),  # extra text before
    ("", -0.5),                   # empty
    ("   ", -0.5),                # whitespace only
    ("uncertain", -0.5),          # not offered by this strategy
    ("person", -0.5),             # a definition, not a label
    ("HUMAN", -0.5),              # prefix/superstring of a label
])
def test_label_reward_direct(answer, reward):
    assert make_label_reward(space())([answer], label=["HUM"]) == [reward]


def test_uncertain_sits_between_wrong_and_right():
    fn = make_label_reward(space(uncertain=True), uncertain_reward=0.5)
    assert fn(["HUM", "uncertain", "NUM", "HUM or uncertain"], label=["HUM"] * 4) == [1.0, 0.5, 0.0, -0.5]
    with pytest.raises(ValueError):
        make_label_reward(space(uncertain=True), uncertain_reward=1.0)


def test_numeric_labels_map_back():
    fn = make_label_reward(space(numeric=True))
    assert fn(["2", "3", "HUM", "2 or 3"], label=["HUM"] * 4) == [1.0, 0.0, -0.5, -0.5]


@pytest.mark.parametrize("completion, label_r, format_r", [
    ("<think>asks for a person</think>\nHUM", 1.0, 1.0),   # well formed, right
    ("<think>asks for a number</think>\nNUM", 0.0, 1.0),   # well formed, wrong
    ("HUM", -0.5, 0.0),                                     # reasoning without think
    ("<think>asks for a person</think>", -0.5, 0.0),        # think without answer
    ("<think>x</think>\nHUM or NUM", -0.5, 1.0),            # hedged answer after think
    ("<think></think>\nHUM", 1.0, 0.0),                     # empty thought: no format reward
    ("<think>HUM</think>\nthe answer is NUM", -0.5, 1.0),  # only the answer is compared
    ("HUM <think>x</think>", -0.5, 0.0),                    # answer before think
    ("<think>a</think>\nHUM\nNUM", -0.5, 0.0),             # two answer lines
])
def test_reasoning_rewards(completion, label_r, format_r):
    s = space(reasoning=True)
    assert make_label_reward(s, reasoning=True)([completion], label=["HUM"]) == [label_r]
    assert make_format_reward(s)([completion], label=["HUM"]) == [format_r]


def test_conversational_completions():
    fn = make_label_reward(space())
    convo = [[{"role": "assistant", "content": "HUM"}], [{"role": "assistant", "content": "HUM or NUM"}]]
    assert fn(convo, label=["HUM", "HUM"]) == [1.0, -0.5]
    assert completion_text([]) == ""


def test_zero_variance_share_is_logged_per_group():
    seen = {}
    fn = make_label_reward(space(), num_generations=2)
    fn(["HUM", "HUM", "HUM", "NUM"], label=["HUM"] * 4, log_metric=lambda k, v: seen.update({k: v}))
    assert seen == {"zero_variance_groups": 0.5}
    assert zero_variance_share([0, 0, 0, 0], 4) == 1.0


def test_build_rewards_from_builder(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    funcs, weights = build_rewards(PromptBuilder(tok, LABELS, Strategy(reasoning=True)), format_weight=0.2)
    assert [f.__name__ for f in funcs] == ["label_reward", "format_reward"] and weights == [1.0, 0.2]
    funcs, weights = build_rewards(PromptBuilder(tok, LABELS, Strategy()))
    assert len(funcs) == 1 and weights == [1.0]
