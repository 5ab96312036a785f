"""Prompt strategies: the five GenCLS++ dimensions plus the reasoning switch.

A `Strategy` says how a prompt is built; a `LabelSpace` maps labels to the answer strings
the model sees (label names, or numbers 1..K) and parses answers back strictly; a
`PromptBuilder` renders chat-template prompts and target completions for examples.

    gencls prompt show --dataset trec6 --strategy icl=semantic,k=4,definitions,numeric
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Sequence

UNCERTAIN = "uncertain"
ICL_MODES = ("none", "random", "semantic")
DECODINGS = ("generative", "perplexity")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Strategy:
    """One point in the GenCLS++ strategy space (DESIGN.md, "The five strategy dimensions").

    Attributes:
        icl: in-context examples: "none", "random" k, or "semantic" k nearest (MiniLM).
        k: number of demonstrations when icl is not "none".
        definitions: list each label's one-sentence definition in the prompt.
        uncertain: offer an extra answer `uncertain`.
        numeric: replace label names by the numbers 1..K in prompt and target.
        decoding: "generative" (greedy text, strict parse) or "perplexity" (label scoring).
        reasoning: answer after `<think>...</think>` instead of directly.
    """

    icl: Literal["none", "random", "semantic"] = "none"
    k: int = 4
    definitions: bool = False
    uncertain: bool = False
    numeric: bool = False
    decoding: Literal["generative", "perplexity"] = "generative"
    reasoning: bool = False

    def __post_init__(self) -> None:
        if self.icl not in ICL_MODES:
            raise ValueError(f"strategy icl={self.icl!r}: expected one of {', '.join(ICL_MODES)}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"strategy decoding={self.decoding!r}: expected one of {', '.join(DECODINGS)}")
        if self.icl != "none" and self.k < 1:
            raise ValueError(f"strategy k={self.k}: expected k >= 1 when icl={self.icl}")
        if self.reasoning and self.decoding == "perplexity":
            raise ValueError("strategy reasoning=on needs decoding=generative (perplexity scores a direct answer)")

    @classmethod
    def parse(cls, spec: str | None) -> "Strategy":
        """Parse `naive` or a comma list like `icl=semantic,k=4,definitions,decoding=perplexity`.

        A bare flag name turns a boolean on; `flag=off|false|0` turns it off.
        """
        spec = (spec or "").strip()
        if spec in ("", "naive", "plain", "default"):
            return cls()
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, raw = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in fields:
                raise ValueError(f"strategy {spec!r}: unknown dimension {key!r}; expected one of {', '.join(fields)}")
            values[key] = _coerce(key, raw.strip(), fields[key].type, spec)
        return cls(**values)

    def slug(self) -> str:
        """Canonical, parseable short name (`naive` for the default strategy)."""
        parts = []
        if self.icl != "none":
            parts += [f"icl={self.icl}", f"k={self.k}"]
        parts += [name for name in ("definitions", "uncertain", "numeric", "reasoning") if getattr(self, name)]
        if self.decoding != "generative":
            parts.append(f"decoding={self.decoding}")
        return ",".join(parts) or "naive"

    def replace(self, **changes: Any) -> "Strategy":
        """Copy with some dimensions changed."""
        return dataclasses.replace(self, **changes)


def _coerce(key: str, raw: str, type_name: Any, spec: str) -> Any:
    """Turn one `key=value` of a strategy spec into the field's type."""
    if key == "k":
        if not raw.isdigit():
            raise ValueError(f"strategy {spec!r}: k={raw!r} is not a positive integer")
        return int(raw)
    if key in ("icl", "decoding"):
        if not raw:
            raise ValueError(f"strategy {spec!r}: {key} needs a value, e.g. {key}={'semantic' if key == 'icl' else 'perplexity'}")
        return raw
    if raw in ("", "on", "true", "1", "yes"):
        return True
    if raw in ("off", "false", "0", "no"):
        return False
    raise ValueError(f"strategy {spec!r}: {key}={raw!r}; expected on/off")


@dataclass(frozen=True)
class LabelSpace:
    """Labels of a dataset as the model sees them, and strict parsing back.

    Attributes:
        labels: the real labels, in labels.yaml order.
        definitions: label -> one-sentence definition.
        numeric: answers are "1".."K" instead of label names.
        uncertain: the extra answer `uncertain` is offered.
    """

    labels: tuple[str, ...]
    definitions: dict[str, str] = field(default_factory=dict)
    numeric: bool = False
    uncertain: bool = False

    @classmethod
    def from_strategy(cls, labels: dict[str, str] | Sequence[str], strategy: Strategy) -> "LabelSpace":
        """Build from labels.yaml content (label -> definition) and a strategy."""
        defs = dict(labels) if isinstance(labels, dict) else {label: "" for label in labels}
        if UNCERTAIN in defs:
            raise ValueError(f"label {UNCERTAIN!r} is reserved for the uncertainty option; rename it in labels.yaml")
        return cls(tuple(defs), defs, strategy.numeric, strategy.uncertain)

    def answer(self, label: str) -> str:
        """The string the model should produce for `label` (or `uncertain`)."""
        if label == UNCERTAIN:
            if not self.uncertain:
                raise ValueError("`uncertain` is not an answer of this label space")
            return UNCERTAIN
        try:
            index = self.labels.index(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not one of {list(self.labels)}") from None
        return str(index + 1) if self.numeric else label

    @property
    def answers(self) -> list[str]:
        """Every answer offered, real labels first, then `uncertain` when on."""
        return [self.answer(label) for label in self.labels] + ([UNCERTAIN] if self.uncertain else [])

    def parse(self, text: str) -> str | None:
        """Map a model answer back to a label, `uncertain`, or None (invalid).

        Strict: only surrounding whitespace, surrounding quotes and one trailing period are
        forgiven, and case is ignored; anything else ("A or B", extra words, empty) is invalid.
        """
        cleaned = text.strip().strip("\"'`").strip()
        if cleaned.endswith("."):
            cleaned = cleaned[:-1].rstrip()
        lookup = {answer.lower(): answer for answer in self.answers}
        answer = lookup.get(cleaned.lower())
        if answer is None:
            return None
        if answer == UNCERTAIN:
            return UNCERTAIN
        return self.labels[int(answer) - 1] if self.numeric else answer


THOUGHT_WORDS = 6  # content words a reasoning target's thought restates


def thought_words(text: str, labels: Sequence[str], limit: int = THOUGHT_WORDS) -> list[str]:
    """The first `limit` distinct content words of `text`, lower-cased: no English stop word, no word
    shorter than 3 letters, no word of any label name (nor `uncertain`): a thought cannot name the gold label.

    >>> thought_words("Who wrote the play Hamlet in 1600? A positive play", ["positive", "negative"])
    ['wrote', 'play', 'hamlet']
    """
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    banned = {w for label in [*labels, UNCERTAIN] for w in re.findall(r"[a-z]+", str(label).lower())}
    out: list[str] = []
    for word in re.findall(r"[a-z][a-z'-]*[a-z]", text.lower()):
        if len(word) >= 3 and word not in ENGLISH_STOP_WORDS and word not in banned and word not in out:
            out.append(word)
            if len(out) == limit:
                break
    return out


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split `<think>...</think> answer` into (thought, answer); thought None if malformed."""
    match = re.fullmatch(r"\s*<think>(.*?)</think>\s*(.*?)\s*", text, flags=re.S)
    if not match:
        return None, text
    return match.group(1).strip(), match.group(2)


class Retriever(Protocol):
    """What semantic ICL needs: the ids of the k nearest training examples to a text."""

    def nearest(self, text: str, k: int, exclude_ids: set[str]) -> list[str]: ...


SYSTEM = "You are a precise text classifier."
MIN_TEXT_TOKENS = 16  # the text to classify always keeps at least this many tokens
MIN_DEMO_TOKENS = 8  # a demonstration whose text would get fewer tokens is dropped
# Version of the prompt layout; study cells and checkpoints keyed on it are re-measured when it changes.
# 2: demos get the room the text does not need (at most half), Text:/Category: lines counted;
#    1: demo texts took half of the room whatever the text's length, their scaffolding uncounted.
PROMPT_FORMAT = 2
INSTRUCTION = "Classify the text into exactly one of these categories: {options}."
DIRECT_HINT = "Reply with the category only."
REASONING_HINT = (
    "First think briefly inside <think> and </think>, then give the category alone on the last line."
)
UNCERTAIN_HINT = "If you cannot tell, reply {uncertain}."


def instruction_tokens(tokenizer: Any, labels: dict[str, str], strategy: Strategy | None = None) -> int:
    """Tokens of a rendered prompt with no demos and an empty text (what the instructions cost).

    Example:
        >>> instruction_tokens(tokenizer, {"spam": "", "ham": ""})  # doctest: +SKIP
        52
    """
    return PromptBuilder(tokenizer, labels, (strategy or Strategy()).replace(icl="none")).instruction_tokens


class PromptBuilder:
    """Renders prompts (chat template, generation prompt added) and targets for examples.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        labels: labels.yaml content (label -> definition).
        strategy: the strategy to render.
        train_examples: the training split (dicts with id, text, label): the demo pool.
        retriever: needed when strategy.icl == "semantic".
        max_prompt_tokens: budget for the whole prompt; the example text is truncated to fit.
        demo_tokens: budget for each demonstration's text. Demos (with their Text:/Category: lines)
            share the room the text to classify does not need; the text keeps its length up to half
            of the tokens the instructions leave.
        seed: seed for random demos (each example gets a fixed, reproducible draw).
    """

    def __init__(
        self,
        tokenizer: Any,
        labels: dict[str, str],
        strategy: Strategy,
        train_examples: Sequence[dict] = (),
        retriever: Retriever | None = None,
        max_prompt_tokens: int = 384,
        demo_tokens: int = 48,
        seed: int = 0,
    ) -> None:
        if strategy.icl == "semantic" and retriever is None:
            raise ValueError("strategy icl=semantic needs a retriever (components.model.retrieval.Retriever)")
        if strategy.icl != "none" and not train_examples:
            raise ValueError(f"strategy icl={strategy.icl} needs training examples to draw demos from")
        self.tokenizer = tokenizer
        self.strategy = strategy
        self.space = LabelSpace.from_strategy(labels, strategy)
        self.pool = list(train_examples)
        self.by_id = {ex["id"]: ex for ex in self.pool}
        self.retriever = retriever
        self.max_prompt_tokens = max_prompt_tokens
        self.demo_tokens = demo_tokens
        self.seed = seed
        self.truncated = 0  # number of examples whose text was cut to fit the budget

    # -- demos ---------------------------------------------------------------------------
    def demos(self, example: dict) -> list[dict]:
        """Demonstrations for `example`, never the example itself (same id or same text)."""
        strategy = self.strategy
        if strategy.icl == "none":
            return []
        exclude = {ex_id for ex_id, ex in self.by_id.items() if ex["text"] == example["text"]}
        exclude.add(example["id"])
        if strategy.icl == "semantic":
            ids = self.retriever.nearest(example["text"], strategy.k, exclude)
            return [self.by_id[i] for i in ids if i not in exclude][: strategy.k]
        rng = random.Random(f"{self.seed}:{example['id']}")
        candidates = [ex for ex in self.pool if ex["id"] not in exclude]
        return rng.sample(candidates, min(strategy.k, len(candidates)))

    # -- rendering -----------------------------------------------------------------------
    def header(self) -> str:
        """Instruction, options, definitions and answer hints (everything but demos and text)."""
        space, strategy = self.space, self.strategy
        lines = [INSTRUCTION.format(options=", ".join(space.answers))]
        if strategy.definitions:
            lines.append("Category definitions:")
            for label in space.labels:
                lines.append(f"- {space.answer(label)}: {space.definitions.get(label) or label}")
        if strategy.uncertain:
            lines.append(UNCERTAIN_HINT.format(uncertain=UNCERTAIN))
        lines.append(REASONING_HINT if strategy.reasoning else DIRECT_HINT)
        return "\n".join(lines)

    def user_message(self, example: dict, demos: Sequence[dict] | None = None, text: str | None = None,
                     demo_tokens: int | None = None) -> str:
        """The user turn: header, demos (text + answer, each text cut to `demo_tokens`), then the text to classify."""
        demos = self.demos(example) if demos is None else demos
        demo_tokens = self.demo_tokens if demo_tokens is None else demo_tokens
        parts = [self.header()]
        if demos:
            shots = [
                f"Text: {self.truncate(d['text'], demo_tokens)[0]}\nCategory: {self.space.answer(d['label'])}"
                for d in demos
            ]
            parts.append("Examples:\n\n" + "\n\n".join(shots))
        parts.append(f"Text: {example['text'] if text is None else text}\nCategory:")
        return "\n\n".join(parts)

    def messages(self, example: dict) -> list[dict[str, str]]:
        """Chat messages for `example`, with its text truncated to the token budget."""
        demos, per_demo = self._fit_demos(self.demos(example), len(self._encode(example["text"])))
        overhead = self._overhead(demos, per_demo)
        while demos and self.max_prompt_tokens - overhead < MIN_TEXT_TOKENS:
            demos = demos[:-1]  # the text to classify matters more than the last demonstration
            overhead = self._overhead(demos, per_demo)
        text, cut = self.truncate(example["text"], max(self.max_prompt_tokens - overhead, MIN_TEXT_TOKENS))
        self.truncated += int(cut)
        content = self.user_message(example, demos, text=text, demo_tokens=per_demo)
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]

    def _fit_demos(self, demos: list[dict], text_tokens: int) -> tuple[list[dict], int]:
        """Demos and their per-text token cut: they get the room the text to classify does not need.

        The room is what the instructions leave; the text keeps its length up to half of it, the
        demos (their "Text:/Category:" lines counted) share the rest. A demo is dropped (last
        first) while each would get fewer than MIN_DEMO_TOKENS.
        """
        room = self.max_prompt_tokens - self.instruction_tokens
        demo_room = room - min(text_tokens, room // 2)
        while demos:
            scaffold = self._overhead([{**d, "text": ""} for d in demos], 0) - self.instruction_tokens
            per_demo = min(self.demo_tokens, (demo_room - scaffold) // len(demos))
            if per_demo >= MIN_DEMO_TOKENS:
                return demos, per_demo
            demos = demos[:-1]
        return [], self.demo_tokens

    @functools.cached_property
    def instruction_tokens(self) -> int:
        """Tokens of this builder's prompt with no demos and an empty text (the same for every example)."""
        return self._overhead([], self.demo_tokens)

    def _overhead(self, demos: Sequence[dict], demo_tokens: int) -> int:
        """Tokens of the rendered prompt with these demos and an empty text to classify."""
        return len(self._encode(self._chat(self.user_message({"text": ""}, demos, text="", demo_tokens=demo_tokens))))

    def prompt(self, example: dict) -> str:
        """The exact string the model sees, ending with the assistant generation prompt."""
        return self._chat(self.messages(example)[-1]["content"])

    def target(self, example: dict, label: str | None = None) -> str:
        """The completion to train on: the answer, or `<think>thought</think>\nanswer`.

        There are no gold rationales, and a thought must never give the answer away: in
        reasoning mode the SFT thought restates the text's first content words (`thought_words`:
        no stop words, no word of any label name), so it holds nothing the label, its name or its
        definition would add; it teaches the format only. GRPO then lets the policy write its
        own thoughts, rewarded for the right answer and (format reward) for `<think>...</think>`.
        """
        label = example["label"] if label is None else label
        answer = self.space.answer(label)
        if not self.strategy.reasoning:
            return answer
        words = thought_words(example["text"], self.space.labels)
        thought = f"Key words: {', '.join(words)}." if words else "Key words: none."
        return f"{THINK_OPEN}{thought}{THINK_CLOSE}\n{answer}"

    def parse(self, completion: str) -> str | None:
        """Label (or `uncertain`) from a completion; None when invalid or malformed."""
        if self.strategy.reasoning:
            thought, answer = split_reasoning(completion)
            if thought is None:
                return None
            return self.space.parse(answer)
        return self.space.parse(completion)

    # -- tokens --------------------------------------------------------------------------
    def truncate(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """Cut `text` to at most `max_tokens` tokens; returns (text, was_cut)."""
        ids = self._encode(text)
        if len(ids) <= max_tokens:
            return text, False
        return self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).rstrip() + " ...", True

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat(self, user: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            tokenize=False,
            add_generation_prompt=True,
        )

