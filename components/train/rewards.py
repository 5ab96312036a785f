"""Rule-based rewards for GRPO, with TRL's signature `fn(completions, label, **kwargs) -> list[float]`.

The answer is parsed strictly against the label set (`PromptBuilder.parse` /
`LabelSpace.parse`): only surrounding whitespace, quotes, case and one trailing period are
forgiven. So the usual hacks earn the invalid penalty, never a label's reward:
"A or B", listing every label, a label followed by extra words, an empty answer,
`uncertain` when the strategy does not offer it, and in reasoning mode an answer without
`<think>...</think>` or a thought without an answer.

    >>> from components.model.prompts import Strategy, LabelSpace
    >>> space = LabelSpace.from_strategy({"pos": "", "neg": ""}, Strategy())
    >>> label_reward = make_label_reward(space)
    >>> label_reward(["pos", "neg", "pos or neg", ""], label=["pos"] * 4)
    [1.0, 0.0, -0.5, -0.5]

Add a reward by adding a factory to `REWARDS`; `build_rewards` picks them by strategy.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from components.model.prompts import UNCERTAIN, LabelSpace, split_reasoning

RewardFn = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message of a conversational completion.

    >>> completion_text([{"role": "assistant", "content": "pos"}])
    'pos'
    >>> completion_text("neg")
    'neg'
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    return ""


def _space_and_reasoning(space_or_builder: Any, reasoning: bool | None) -> tuple[LabelSpace, bool]:
    """Accept a LabelSpace or a PromptBuilder (whose strategy gives the reasoning switch)."""
    if isinstance(space_or_builder, LabelSpace):
        return space_or_builder, bool(reasoning)
    space = space_or_builder.space
    return space, bool(space_or_builder.strategy.reasoning if reasoning is None else reasoning)


def parse_answer(text: str, space: LabelSpace, reasoning: bool) -> str | None:
    """Label, `uncertain` or None (invalid) for one completion; reasoning compares the answer only.

    >>> space = LabelSpace(("pos", "neg"))
    >>> parse_answer("<think>nice words</think>\\npos", space, reasoning=True)
    'pos'
    >>> parse_answer("pos", space, reasoning=True) is None   # no <think> block
    True
    """
    if reasoning:
        thought, answer = split_reasoning(text)
        if thought is None:
            return None
        text = answer
    return space.parse(text)


def make_label_reward(space_or_builder: Any, uncertain_reward: float = 0.5, invalid_penalty: float = -0.5,
                      wrong_reward: float = 0.0, reasoning: bool | None = None,
                      num_generations: int | None = None) -> RewardFn:
    """Correctness reward: 1 for the gold label, `uncertain_reward` for `uncertain` (when
    offered), `wrong_reward` for another label, `invalid_penalty` for anything else.

    Args:
        space_or_builder: a LabelSpace or a PromptBuilder (numeric labels map back to names).
        uncertain_reward: must lie strictly between wrong_reward and 1.
        invalid_penalty: reward of output outside the label set.
        wrong_reward: reward of a valid but wrong label.
        reasoning: compare only the answer after `<think>...</think>` (default: builder's strategy).
        num_generations: group size; when given, the share of groups whose rewards are all
            equal is reported through TRL's `log_metric` as `zero_variance_groups`.

    Example:
        >>> space = LabelSpace(("pos", "neg"), uncertain=True)
        >>> make_label_reward(space)(["pos", "uncertain", "neg", "pos neg"], label=["pos"] * 4)
        [1.0, 0.5, 0.0, -0.5]
    """
    space, reasoning = _space_and_reasoning(space_or_builder, reasoning)
    if space.uncertain and not wrong_reward < uncertain_reward < 1.0:
        raise ValueError(f"uncertain_reward={uncertain_reward}: expected {wrong_reward} < value < 1")

    def label_reward(completions: Sequence[Any], label: Sequence[str], **kwargs: Any) -> list[float]:
        rewards = []
        for completion, gold in zip(completions, label, strict=True):
            parsed = parse_answer(completion_text(completion), space, reasoning)
            if parsed is None:
                rewards.append(float(invalid_penalty))
            elif parsed == UNCERTAIN:
                rewards.append(float(uncertain_reward) if space.uncertain else float(invalid_penalty))
            else:
                rewards.append(1.0 if parsed == gold else float(wrong_reward))
        log_metric = kwargs.get("log_metric")
        if num_generations and callable(log_metric) and rewards:
            log_metric("zero_variance_groups", zero_variance_share(rewards, num_generations))
        return rewards

    return label_reward


def make_format_reward(space_or_builder: Any, **_: Any) -> RewardFn:
    """Reasoning format: 1 when the completion is `<think>non-empty</think>` then a one-line
    answer, else 0. (Whether the answer is right is the label reward's job.)

    Example:
        >>> fmt = make_format_reward(LabelSpace(("pos", "neg")))
        >>> fmt(["<think>kind words</think>\\npos", "pos", "<think>hm</think>", "<think></think> pos"], label=["pos"] * 4)
        [1.0, 0.0, 0.0, 0.0]
    """

    def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
        out = []
        for completion in completions:
            thought, answer = split_reasoning(completion_text(completion))
            ok = bool(thought) and bool(answer.strip()) and "\n" not in answer.strip()
            out.append(1.0 if ok else 0.0)
        return out

    return format_reward


def zero_variance_share(rewards: Sequence[float], num_generations: int) -> float:
    """Share of prompt groups (consecutive blocks of num_generations) whose rewards are all equal.

    >>> zero_variance_share([1, 1, 0, 1], 2)
    0.5
    """
    groups = [rewards[i : i + num_generations] for i in range(0, len(rewards), num_generations)]
    return sum(1 for g in groups if max(g) == min(g)) / max(len(groups), 1)


REWARDS: dict[str, Callable[..., RewardFn]] = {"label": make_label_reward, "format": make_format_reward}


def build_rewards(builder: Any, uncertain_reward: float = 0.5, invalid_penalty: float = -0.5,
                  wrong_reward: float = 0.0, format_weight: float = 0.2,
                  num_generations: int | None = None) -> tuple[list[RewardFn], list[float]]:
    """Reward functions and weights for a PromptBuilder's strategy: label (+ format in reasoning mode)."""
    names = ["label"] + (["format"] if builder.strategy.reasoning and format_weight > 0 else [])
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise KeyError(f"reward {unknown}: expected one of {', '.join(REWARDS)}")
    funcs = [REWARDS[n](builder, uncertain_reward=uncertain_reward, invalid_penalty=invalid_penalty,
                        wrong_reward=wrong_reward, num_generations=num_generations) for n in names]
    weights = [1.0] + ([float(format_weight)] if len(names) > 1 else [])
    return funcs, weights
