"""Decoding: shared-prefix label scoring equals brute force; generative parsing; uncertainty."""
from __future__ import annotations

import numpy as np
import pytest

from components.model import decoding, scoring
from components.model.decoding import INVALID, predict
from components.model.scoring import score_candidates, score_candidates_naive
from components.model.prompts import UNCERTAIN, PromptBuilder, Strategy

LABELS = {"positive": "favourable", "negative": "unfavourable", "neutral": "no opinion"}
TRAIN = [{"id": f"t{i}", "text": f"great film number {i}", "label": list(LABELS)[i % 3]} for i in range(12)]
TEST = [{"id": f"e{i}", "text": "what a film " * (1 + 3 * i), "label": list(LABELS)[i % 3]} for i in range(7)]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from components.model.models import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("spec", ["decoding=perplexity", "numeric,uncertain,decoding=perplexity",
                                  "icl=random,k=2,definitions,decoding=perplexity"])
def test_shared_prefix_scores_equal_brute_force(spec, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, Strategy.parse(spec), TRAIN)
    prompts = [builder.prompt(ex) for ex in TEST]  # different lengths: exercises left padding
    # candidates of different token lengths, one a prefix of another ("1" vs "10" style)
    candidates = builder.space.answers + ["positive positive", "1", "10"]
    shared = score_candidates(model, tokenizer, prompts, candidates, batch_size=3)
    naive = score_candidates_naive(model, tokenizer, prompts, candidates)
    assert shared.shape == (len(TEST), len(candidates))
    np.testing.assert_allclose(shared, naive, atol=1e-4)
    assert (shared.argmax(1) == naive.argmax(1)).all()
    assert np.all(shared < 0)


def test_candidate_trie_shares_prefixes_and_batches_agree(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    trie = scoring.CandidateTrie([[5, 6, 7, 9], [5, 6, 8, 9], [4, 9]])
    assert len(trie) == 5  # (5), (5,6), (5,6,7), (5,6,8), (4) instead of 3 + 3 + 1 padded to 3 x 3
    assert trie.ancestors[trie.nodes.index((5, 6, 8))] == [trie.nodes.index((5,)), trie.nodes.index((5, 6)),
                                                           trie.nodes.index((5, 6, 8))]
    prompts = [PromptBuilder(tokenizer, LABELS, Strategy()).prompt(ex) for ex in TEST[:5]]
    candidates = ["comp.sys.mac", "comp.sys.ibm", "comp.graphics", "rec.autos"]  # shared prefixes
    whole = score_candidates(model, tokenizer, prompts, candidates, batch_size=5)
    np.testing.assert_allclose(score_candidates(model, tokenizer, prompts, candidates, batch_size=2), whole, atol=1e-5)
    monkeypatch.setattr(scoring, "MAX_SCORED_ELEMENTS", 1)  # score the rows one at a time
    np.testing.assert_allclose(score_candidates(model, tokenizer, prompts, candidates, batch_size=5), whole, atol=1e-5)
    np.testing.assert_allclose(whole, score_candidates_naive(model, tokenizer, prompts, candidates), atol=1e-4)


@pytest.mark.parametrize("spec", ["decoding=perplexity", "icl=random,k=2,definitions", "uncertain"])
def test_shared_prompt_prefix_gives_the_same_predictions(spec, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, Strategy.parse(spec), TRAIN)
    ids = tokenizer([builder.prompt(ex) for ex in TEST], add_special_tokens=False)["input_ids"]
    n = scoring.shared_prefix_length(ids)
    assert n >= scoring.MIN_SHARED_PREFIX and all(i[:n] == ids[0][:n] for i in ids)  # instructions + labels
    shared = predict(model, tokenizer, builder, TEST, batch_size=3, progress=False)
    plain = predict(model, tokenizer, builder, TEST, batch_size=3, progress=False, share_prefix=False)
    assert [r["pred"] for r in shared] == [r["pred"] for r in plain]
    assert [r["raw"] for r in shared] == [r["raw"] for r in plain]
    for a, b in zip(shared, plain):
        if b["probs"] is not None:
            np.testing.assert_allclose([a["probs"][k] for k in LABELS], [b["probs"][k] for k in LABELS], atol=1e-5)
    prefix = scoring.SharedPrefix(model, ids[0][:n])
    prompts = [builder.prompt(ex) for ex in TEST]
    np.testing.assert_allclose(score_candidates(model, tokenizer, prompts, list(LABELS), 4, prefix=prefix),
                               score_candidates_naive(model, tokenizer, prompts, list(LABELS)), atol=1e-4)
    with pytest.raises(ValueError, match="shared prefix"):
        score_candidates(model, tokenizer, ["unrelated prompt"], list(LABELS), prefix=prefix)


def test_end_of_turn_separates_prefix_labels(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = scoring.candidate_ids(tokenizer, ["1", "10"])
    assert ids[0][-1] == ids[1][-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids[0] != ids[1][: len(ids[0])]  # "1<|im_end|>" is not a prefix of "10<|im_end|>"


def test_predict_perplexity_records(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, Strategy(decoding="perplexity", numeric=True), TRAIN)
    records = predict(model, tokenizer, builder, TEST, batch_size=4, progress=False)
    naive = score_candidates_naive(model, tokenizer, [builder.prompt(ex) for ex in TEST], builder.space.answers)
    assert [r["id"] for r in records] == [ex["id"] for ex in TEST]
    for record, row, ex in zip(records, naive, TEST):
        assert set(record) == {"id", "label", "pred", "raw", "probs", "abstained", "invalid"}
        assert record["label"] == ex["label"]
        assert record["pred"] == list(LABELS)[int(np.argmax(row))]  # argmax of brute force
        assert record["raw"] in {"1", "2", "3"}
        assert sum(record["probs"].values()) == pytest.approx(1.0)
        assert not record["invalid"] and not record["abstained"]


def test_predict_generative_records(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, Strategy(), TRAIN)
    records = predict(model, tokenizer, builder, TEST, batch_size=3, progress=False)
    for record in records:
        assert isinstance(record["raw"], str) and "<|im_end|>" not in record["raw"]
        assert record["invalid"] == (builder.parse(record["raw"]) is None)
        assert record["pred"] == (INVALID if record["invalid"] else builder.parse(record["raw"]))
    # greedy is deterministic and independent of batching (left padding is masked)
    again = predict(model, tokenizer, builder, TEST, batch_size=7, progress=False)
    assert [r["raw"] for r in again] == [r["raw"] for r in records]


@pytest.mark.parametrize("spec", ["decoding=perplexity", "naive"])
def test_predict_batches_prompts_of_similar_length_and_keeps_the_order(spec, model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, Strategy.parse(spec), TRAIN)
    examples = TEST[::-1] + TEST[:3]  # long, short, long: the given order pads every batch
    batches = []
    for name in ("score_candidates", "generate_answers"):
        real = getattr(decoding, name)
        monkeypatch.setattr(decoding, name, lambda m, t, prompts, *a, _real=real, **k: batches.append(
            [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]) or _real(m, t, prompts, *a, **k))
    records = predict(model, tokenizer, builder, examples, batch_size=3, progress=False)
    assert [r["id"] for r in records] == [ex["id"] for ex in examples]
    flat = [n for batch in batches for n in batch]
    assert flat == sorted(flat) and len(flat) == len(examples)
    monkeypatch.undo()
    one_batch = predict(model, tokenizer, builder, examples, batch_size=len(examples), progress=False)
    assert [r["raw"] for r in records] == [r["raw"] for r in one_batch]
    if spec != "naive":
        naive = score_candidates_naive(model, tokenizer, [builder.prompt(ex) for ex in examples], builder.space.answers)
        np.testing.assert_allclose([[r["probs"][k] for k in LABELS] for r in records],
                                   [np.exp(row - row.max()) / np.exp(row - row.max()).sum() for row in naive], atol=1e-4)


def test_generation_budget_grows_with_reasoning(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    direct = decoding.answer_budget(tokenizer, PromptBuilder(tokenizer, LABELS, Strategy()))
    thinking = decoding.answer_budget(tokenizer, PromptBuilder(tokenizer, LABELS, Strategy(reasoning=True)))
    assert 2 <= direct <= 12 < thinking


def test_generative_uncertain_resolved_by_real_label_scores(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, Strategy(uncertain=True), TRAIN)
    answers = iter([["Uncertain", "negative", "maybe", "uncertain."]])
    monkeypatch.setattr(decoding, "generate_answers", lambda *args, **kwargs: next(answers))
    records = predict(model, tokenizer, builder, TEST[:4], batch_size=4, progress=False)
    real = score_candidates_naive(model, tokenizer, [builder.prompt(ex) for ex in TEST[:4]], list(LABELS))
    assert [r["abstained"] for r in records] == [True, False, False, True]
    assert [r["invalid"] for r in records] == [False, False, True, False]
    for i in (0, 3):
        assert records[i]["pred"] == list(LABELS)[int(np.argmax(real[i]))]
        assert sum(records[i]["probs"].values()) == pytest.approx(1.0)
    assert records[1]["pred"] == "negative" and records[1]["probs"] is None
    assert records[2]["pred"] == INVALID


def test_perplexity_uncertain_wins_then_best_real_label():
    space = PromptBuilder(None, LABELS, Strategy(uncertain=True, decoding="perplexity")).space
    row = np.array([-3.0, -2.0, -5.0, -0.1])  # positive, negative, neutral, uncertain
    record = decoding._perplexity_record({"id": "x", "label": "negative"}, row, space, space.answers, None)
    assert record["abstained"] and record["raw"] == UNCERTAIN and record["pred"] == "negative"
    assert list(record["probs"]) == list(LABELS) and sum(record["probs"].values()) == pytest.approx(1.0)
    assert UNCERTAIN not in record["probs"]


def test_contextual_calibration_changes_only_probs_shape(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    builder = PromptBuilder(tokenizer, LABELS, Strategy(decoding="perplexity"), TRAIN)
    records = predict(model, tokenizer, builder, TEST[:3], progress=False, calibrate=True)
    for record in records:
        assert sum(record["probs"].values()) == pytest.approx(1.0)
        assert record["pred"] == max(record["probs"], key=record["probs"].get)


@pytest.mark.slow
def test_real_smollm2_on_trec6(tmp_path):
    """Real SmolLM2 on 50 trec6 test questions with both decoders."""
    from components.data.build import build_dataset
    from components.data import datasets
    from components.evaluate.evaluation import select_examples
    from components.model.models import load_model

    data_dir = None
    try:
        datasets.load_labels("trec6")
    except datasets.DataError:
        data_dir = tmp_path / "data"
        build_dataset("trec6", data_dir=data_dir)
    labels = datasets.load_labels("trec6", data_dir)
    train = datasets.load_split("trec6", "train", data_dir)
    test = select_examples(datasets.load_split("trec6", "test", data_dir), 50, seed=0)
    model, tokenizer = load_model("smollm2-135m", device="cpu")

    builder = PromptBuilder(tokenizer, labels, Strategy(decoding="perplexity"), train)
    records = predict(model, tokenizer, builder, test, batch_size=16, progress=False)
    assert len(records) == 50
    for record in records:
        assert record["pred"] in labels and sum(record["probs"].values()) == pytest.approx(1.0)
    prompts = [builder.prompt(ex) for ex in test[:8]]
    shared = score_candidates(model, tokenizer, prompts, builder.space.answers, batch_size=8)
    naive = score_candidates_naive(model, tokenizer, prompts, builder.space.answers)
    np.testing.assert_allclose(shared, naive, atol=2e-3)
    assert (shared.argmax(1) == naive.argmax(1)).all()

    builder = PromptBuilder(tokenizer, labels, Strategy(), train)
    records = predict(model, tokenizer, builder, test, batch_size=16, progress=False)
    for record in records:
        assert isinstance(record["raw"], str)
        assert record["pred"] == (INVALID if record["invalid"] else builder.parse(record["raw"]))
        assert record["pred"] in set(labels) | {INVALID}
