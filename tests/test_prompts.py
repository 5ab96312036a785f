"""Prompt strategies: rendering of every dimension combination, goldens, parsing, truncation."""
from __future__ import annotations

import itertools

import pytest

from components.model.prompts import UNCERTAIN, LabelSpace, PromptBuilder, Strategy
from components.model.retrieval import Retriever, hashed_bow_encode

LABELS = {
    "positive": "The text expresses a favourable opinion.",
    "negative": "The text expresses an unfavourable opinion.",
    "neutral": "The text expresses no clear opinion.",
}
TRAIN = [
    {"id": f"t{i}", "text": text, "label": label}
    for i, (text, label) in enumerate([
        ("loved it , great film", "positive"), ("awful , terrible plot", "negative"),
        ("it was a film", "neutral"), ("great acting and great music", "positive"),
        ("bad acting , bad film", "negative"), ("the film is two hours long", "neutral"),
        ("wonderful and moving", "positive"), ("boring and bad", "negative"),
    ])
]
EXAMPLE = {"id": "e1", "text": "great film , great music", "label": "positive"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    return Retriever(TRAIN, encode=hashed_bow_encode, cache=False)


def _combinations():
    for icl, definitions, uncertain, numeric, decoding, reasoning in itertools.product(
        ("none", "random", "semantic"), (False, True), (False, True), (False, True),
        ("generative", "perplexity"), (False, True),
    ):
        if reasoning and decoding == "perplexity":
            continue  # invalid combination (Strategy refuses it)
        yield Strategy(icl=icl, k=3, definitions=definitions, uncertain=uncertain, numeric=numeric,
                       decoding=decoding, reasoning=reasoning)


@pytest.mark.parametrize("strategy", list(_combinations()), ids=lambda s: s.slug())
def test_rendering_every_combination(strategy, tokenizer, retriever):
    builder = PromptBuilder(tokenizer, LABELS, strategy, TRAIN, retriever=retriever)
    prompt = builder.prompt(EXAMPLE)
    user = builder.messages(EXAMPLE)[-1]["content"]
    answers = ["1", "2", "3"] if strategy.numeric else list(LABELS)
    # options listed, in order, uncertain last iff on
    options = ", ".join(answers + ([UNCERTAIN] if strategy.uncertain else []))
    assert f"categories: {options}." in user
    # definitions present iff on
    assert all((definition in user) == strategy.definitions for definition in LABELS.values())
    assert (f"reply {UNCERTAIN}" in user) == strategy.uncertain
    assert ("<think>" in user) == strategy.reasoning
    # demos: count, numeric answers, never the example itself
    demos = builder.demos(EXAMPLE)
    assert len(demos) == (0 if strategy.icl == "none" else 3)
    assert user.count("Category:") == len(demos) + 1
    assert all(d["id"] != EXAMPLE["id"] and d["text"] != EXAMPLE["text"] for d in demos)
    for demo in demos:
        assert f"Text: {demo['text']}\nCategory: {builder.space.answer(demo['label'])}" in user
    if strategy.numeric:
        assert "Category: positive" not in user and "Category: negative" not in user
    # the text to classify closes the user turn; the prompt ends with the generation prompt
    assert user.endswith(f"Text: {EXAMPLE['text']}\nCategory:")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # the target parses back to the gold label
    assert builder.parse(builder.target(EXAMPLE)) == EXAMPLE["label"]


GOLDEN = {
    "naive": (
        "<|im_start|>system\nYou are a precise text classifier.<|im_end|>\n<|im_start|>user\n"
        "Classify the text into exactly one of these categories: positive, negative.\n"
        "Reply with the category only.\n\nText: great film\nCategory:<|im_end|>\n<|im_start|>assistant\n",
        "positive",
    ),
    "definitions,uncertain,numeric,decoding=perplexity": (
        "<|im_start|>system\nYou are a precise text classifier.<|im_end|>\n<|im_start|>user\n"
        "Classify the text into exactly one of these categories: 1, 2, uncertain.\n"
        "Category definitions:\n- 1: The text expresses a favourable opinion.\n"
        "- 2: The text expresses an unfavourable opinion.\nIf you cannot tell, reply uncertain.\n"
        "Reply with the category only.\n\nText: great film\nCategory:<|im_end|>\n<|im_start|>assistant\n",
        "1",
    ),
    "icl=random,k=2,reasoning": (
        "<|im_start|>system\nYou are a precise text classifier.<|im_end|>\n<|im_start|>user\n"
        "Classify the text into exactly one of these categories: positive, negative.\n"
        "First think briefly inside <think> and </think>, then give the category alone on the last line.\n\n"
        "Examples:\n\nText: loved it\nCategory: positive\n\nText: awful\nCategory: negative\n\n"
        "Text: great film\nCategory:<|im_end|>\n<|im_start|>assistant\n",
        "<think>Key words: great, film.</think>\npositive",
    ),
}


@pytest.mark.parametrize("spec", list(GOLDEN))
def test_golden_prompts(spec, tokenizer):
    labels = {k: LABELS[k] for k in ("positive", "negative")}
    train = [{"id": "t1", "text": "loved it", "label": "positive"}, {"id": "t2", "text": "awful", "label": "negative"}]
    builder = PromptBuilder(tokenizer, labels, Strategy.parse(spec), train)
    example = {"id": "e1", "text": "great film", "label": "positive"}
    assert (builder.prompt(example), builder.target(example)) == GOLDEN[spec]


def test_strategy_parse_and_slug_round_trip():
    for strategy in _combinations():
        expected = strategy if strategy.icl != "none" else strategy.replace(k=Strategy().k)  # k unused, not in slug
        assert Strategy.parse(strategy.slug()) == expected
    with pytest.raises(ValueError, match="unknown dimension"):
        Strategy.parse("icl=semantic,colour")
    with pytest.raises(ValueError, match="reasoning"):
        Strategy.parse("reasoning,decoding=perplexity")


def test_numeric_label_round_trip():
    space = LabelSpace.from_strategy(LABELS, Strategy(numeric=True, uncertain=True))
    assert space.answers == ["1", "2", "3", UNCERTAIN]
    for label in LABELS:
        assert space.parse(space.answer(label)) == label
    assert space.parse("uncertain") == UNCERTAIN
    assert space.parse("4") is None and space.parse("0") is None and space.parse("positive") is None


@pytest.mark.parametrize("text, expected", [
    ("positive", "positive"), ("Positive", "positive"), ("  NEGATIVE \n", "negative"), ("neutral.", "neutral"),
    ('"positive"', "positive"), ("positive or negative", None), ("", None), ("   ", None),
    ("positive, because it is nice", None), ("The answer is positive", None), ("pos", None),
    ("uncertain", None),  # not offered in this label space
])
def test_strict_parsing(text, expected):
    space = LabelSpace.from_strategy(LABELS, Strategy())
    assert space.parse(text) == expected


def test_reasoning_parse_needs_think_block(tokenizer):
    builder = PromptBuilder(tokenizer, LABELS, Strategy(reasoning=True))
    assert builder.parse("<think>it is nice</think>\npositive") == "positive"
    assert builder.parse("positive") is None
    assert builder.parse("<think>unclosed positive") is None


def test_truncation_keeps_instruction_and_options(tokenizer):
    strategy = Strategy(definitions=True, uncertain=True, icl="random", k=2)
    builder = PromptBuilder(tokenizer, LABELS, strategy, TRAIN, max_prompt_tokens=320)
    long_example = {"id": "long", "text": "great film " * 400, "label": "positive"}
    prompt = builder.prompt(long_example)
    n_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert n_tokens <= 320 + 8  # budget (+ a few tokens of re-tokenisation slack at the cut)
    assert builder.truncated == 1
    assert "categories: positive, negative, neutral, uncertain." in prompt
    assert all(definition in prompt for definition in LABELS.values())
    assert prompt.endswith(" ...\nCategory:<|im_end|>\n<|im_start|>assistant\n")


def test_demos_dropped_before_text_goes_below_minimum(tokenizer):
    # budget: instruction + 4 demos would not leave MIN_TEXT_TOKENS for the text itself
    strategy = Strategy(definitions=True, icl="random", k=4)
    example = {"id": "long", "text": "great film " * 100, "label": "positive"}
    plain = PromptBuilder(tokenizer, LABELS, Strategy(definitions=True), max_prompt_tokens=10_000)
    header_tokens = len(tokenizer(plain._chat(plain.user_message(example, [], text="")))["input_ids"])
    budget = header_tokens + 40
    builder = PromptBuilder(tokenizer, LABELS, strategy, TRAIN, max_prompt_tokens=budget, demo_tokens=40)
    prompt = builder.prompt(example)
    n_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert n_tokens <= budget + 8
    n_demos = prompt.count("Text:") - 1
    assert 0 <= n_demos < 4
    assert "great film great film" in prompt.rsplit("Text:", 1)[1]


def test_long_demos_leave_half_the_room_to_the_text(tokenizer):
    # long demos and a long text under a tight budget: the demos shrink, the text keeps a fair share
    pool = [{"id": f"d{i}", "text": "awful movie " * 200, "label": "negative"} for i in range(3)]
    example = {"id": "long", "text": "great film " * 200, "label": "positive"}
    plain = PromptBuilder(tokenizer, LABELS, Strategy(), max_prompt_tokens=10_000)
    header_tokens = len(tokenizer(plain._chat(plain.user_message(example, [], text="")))["input_ids"])
    budget = header_tokens + 120
    builder = PromptBuilder(tokenizer, LABELS, Strategy(icl="random", k=2), pool, max_prompt_tokens=budget)
    content = builder.messages(example)[-1]["content"]
    n_tokens = len(tokenizer(builder.prompt(example), add_special_tokens=False)["input_ids"])
    assert n_tokens <= budget + 8
    assert content.count("awful movie") >= 2 * 2  # both demos kept, shortened
    text_tokens = len(tokenizer(content.rsplit("Text:", 1)[1], add_special_tokens=False)["input_ids"])
    assert text_tokens >= 120 // 2 - 4  # demos, Text:/Category: lines included, take at most half (-4: cut marks)


@pytest.mark.parametrize("icl", ["random", "semantic"])
def test_no_demo_leakage(icl, tokenizer):
    # data leak: the example and an exact duplicate of its text (other id) are in the pool
    pool = TRAIN + [dict(EXAMPLE), {"id": "dup", "text": EXAMPLE["text"], "label": "negative"}]
    retriever = Retriever(pool, encode=hashed_bow_encode, cache=False)
    builder = PromptBuilder(tokenizer, LABELS, Strategy(icl=icl, k=len(pool)), pool, retriever=retriever)
    demos = builder.demos(EXAMPLE)
    assert len(demos) == len(TRAIN)
    assert all(d["text"] != EXAMPLE["text"] for d in demos)
    assert EXAMPLE["text"] not in builder.messages(EXAMPLE)[-1]["content"].split("Examples:")[1].rsplit("Text:", 1)[0]


def test_semantic_demos_are_nearest_first(tokenizer, retriever):
    builder = PromptBuilder(tokenizer, LABELS, Strategy(icl="semantic", k=2), TRAIN, retriever=retriever)
    demos = builder.demos({"id": "q", "text": "bad acting", "label": "negative"})
    assert demos[0]["id"] == "t4"  # "bad acting , bad film" shares both words


def test_random_demos_reproducible(tokenizer):
    one = PromptBuilder(tokenizer, LABELS, Strategy(icl="random", k=3), TRAIN, seed=1).demos(EXAMPLE)
    two = PromptBuilder(tokenizer, LABELS, Strategy(icl="random", k=3), TRAIN, seed=1).demos(EXAMPLE)
    assert one == two


@pytest.mark.parametrize("numeric", [False, True])
def test_reasoning_target_never_gives_the_answer_away(tokenizer, numeric):
    """The thought holds words of the text only: never a label name (gold or other) nor a definition."""
    labels = {"sports": "The text is about a sport, a match or an athlete.",
              "business": "The text is about companies, markets or money."}
    builder = PromptBuilder(tokenizer, labels, Strategy(reasoning=True, numeric=numeric))
    example = {"id": "x", "text": "Sports news: the business of football clubs, markets and a late match winner",
               "label": "sports"}
    target = builder.target(example)
    thought, answer = target.split("</think>")
    thought = thought.removeprefix("<think>").lower()
    assert builder.parse(target) == "sports" and answer.strip() == ("1" if numeric else "sports")
    assert "sports" not in thought and "business" not in thought
    assert labels["sports"].lower() not in thought and labels["business"].lower() not in thought
    assert thought == "key words: news, football, clubs, markets, late, match."  # the text's own words, in order
