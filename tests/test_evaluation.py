"""Metrics against hand-computed cases, ECE, reports, and the evaluate/prompt/bench CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.model.prompts import Strategy
from components.evaluate.evaluation import (
    compute_metrics,
    evaluate,
    expected_calibration_error,
    plot_confusion,
    select_examples,
)


def _rec(label, pred, probs=None, abstained=False):
    return {"id": f"{label}-{pred}", "label": label, "pred": pred, "raw": pred, "probs": probs,
            "abstained": abstained, "invalid": pred == "invalid"}


def test_metrics_hand_computed():
    records = [_rec("a", "a"), _rec("a", "b"), _rec("b", "b"), _rec("b", "invalid"), _rec("c", "c", abstained=True)]
    m = compute_metrics(records, ["a", "b", "c"])
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    # a: P 1/1 R 1/2 F 2/3; b: P 1/2 R 1/2 F 1/2; c: P 1 R 1 F 1 -> macro (2/3 + 1/2 + 1) / 3
    assert m["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["per_label"]["b"]["precision"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["confusion"]["columns"] == ["a", "b", "c", "invalid"]
    assert m["confusion"]["matrix"] == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert m["invalid_rate"] == pytest.approx(1 / 5)
    assert m["abstention_rate"] == pytest.approx(1 / 5)
    assert m["answered_accuracy"] == pytest.approx(2 / 4)
    assert m["ece"] is None  # no probabilities (generative decoding)


def test_metrics_without_invalid_have_no_invalid_column():
    m = compute_metrics([_rec("a", "a"), _rec("b", "a")], {"a": "def a", "b": "def b"})
    assert m["confusion"]["columns"] == ["a", "b"] and m["confusion"]["matrix"] == [[1, 0], [1, 0]]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(ValueError):
        compute_metrics([], ["a"])


def test_ece_small_cases():
    # bin 9: conf 0.9, acc 0.5 -> 0.4 * 2/4; bin 6: conf 0.6, acc 1.0 -> 0.4 * 2/4
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [True, False, True, True]) == pytest.approx(0.4)
    assert expected_calibration_error([1.0, 1.0], [True, True]) == pytest.approx(0.0)
    assert expected_calibration_error([0.5, 0.5], [True, False]) == pytest.approx(0.0)
    assert expected_calibration_error([], []) == 0.0


def test_ece_from_records():
    records = [_rec("a", "a", {"a": 0.9, "b": 0.1}), _rec("b", "a", {"a": 0.9, "b": 0.1}),
               _rec("a", "a", {"a": 0.6, "b": 0.4}), _rec("b", "b", {"a": 0.4, "b": 0.6})]
    assert compute_metrics(records, ["a", "b"])["ece"] == pytest.approx(0.4)


def test_plot_confusion_writes_png(tmp_path):
    m = compute_metrics([_rec("a", "a"), _rec("b", "invalid")], ["a", "b"])
    path = plot_confusion(m, ["a", "b"], tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_select_examples_seeded():
    examples = [{"id": str(i)} for i in range(20)]
    assert select_examples(examples, None) == examples
    assert select_examples(examples, 5, seed=1) == select_examples(examples, 5, seed=1)
    assert len({e["id"] for e in select_examples(examples, 5)}) == 5


@pytest.fixture()
def tiny_dataset(tmp_path):
    """A small dataset laid out as data/<name>/ (the datasets module's format)."""
    data = tmp_path / "data" / "tiny-sent"
    data.mkdir(parents=True)
    labels = {"positive": "A favourable opinion.", "negative": "An unfavourable opinion."}
    train = [{"id": f"t{i}", "text": f"{w} film number {i}", "label": lab}
             for i, (w, lab) in enumerate([("great", "positive"), ("awful", "negative")] * 6)]
    test = [{"id": f"e{i}", "text": f"{w} movie {i}", "label": lab}
            for i, (w, lab) in enumerate([("great", "positive"), ("bad", "negative")] * 5)]
    (data / "labels.yaml").write_text(yaml.safe_dump(labels, sort_keys=False))
    for name, rows in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


@pytest.mark.parametrize("spec", ["decoding=perplexity,uncertain", "icl=random,k=2,numeric"])
def test_evaluate_writes_reports(spec, tiny_dataset, tiny_model_dir):
    out = tiny_dataset / "out"
    m = evaluate("tiny-sent", str(tiny_model_dir), spec, limit=6, out_dir=out, batch_size=4,
                 progress=False, data_dir=tiny_dataset / "data")
    assert m["n"] == 6 and m["strategy"] == Strategy.parse(spec).slug() and m["examples_per_s"] > 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[0])["pred"] in {"positive", "negative", "invalid"}
    written = json.loads((out / "metrics.json").read_text())
    assert written["accuracy"] == m["accuracy"] and "seconds" not in written and "examples_per_s" not in written
    assert json.loads((out / "run.json").read_text())["seconds"] == m["seconds"]  # timings beside, not inside
    scores = json.loads((out / "scores.json").read_text())  # what `dvc metrics show` lists: numbers only,
    assert list(scores) == ["out"]                            # under the evaluation's name (short exp show heads)
    assert scores["out"]["accuracy"] == round(m["accuracy"], 4) and "n" not in scores["out"]
    assert all(isinstance(v, (int, float)) for v in scores["out"].values())
    assert ("ece" in scores["out"]) == ("perplexity" in spec)
    assert (out / "confusion.png").exists() and "<|im_start|>assistant" in (out / "prompts_sample.txt").read_text()
    assert (m["ece"] is not None) == ("perplexity" in spec)


def test_cli_prompt_show_and_evaluate(tiny_dataset, tiny_model_dir, capsys):
    from cli.main import main

    data = str(tiny_dataset / "data")
    assert main(["prompt", "show", "--dataset", "tiny-sent", "--strategy", "definitions,numeric",
                 "--model", str(tiny_model_dir), "--index", "1", "--data-dir", data]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("<|im_start|>system\n") and "Text: bad movie 1\nCategory:" in shown
    assert "- 2: An unfavourable opinion." in shown
    assert main(["prompt", "show", "--dataset", "tiny-sent", "--model", str(tiny_model_dir),
                 "--split", "train", "--id", "t1", "--data-dir", data]) == 0
    assert capsys.readouterr().out.endswith("<|im_start|>assistant\nnegative\n")

    out = tiny_dataset / "eval"
    assert main(["evaluate", "--dataset", "tiny-sent", "--model", str(tiny_model_dir), "--strategy",
                 "decoding=perplexity", "--limit", "4", "--out", str(out), "--data-dir", data]) == 0
    assert "accuracy" in capsys.readouterr().out and (out / "metrics.json").exists()


def test_cli_output_in_a_file_has_no_bars_or_colours(tiny_dataset, tiny_model_dir, tmp_path):
    """stderr/stdout to a file (a CI log, `make run > log`): no \\r progress redraws, no ANSI colour codes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "NO_COLOR")}
    with open(tmp_path / "log.txt", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "cli.main", "evaluate", "--dataset", "tiny-sent", "--model",
                             str(tiny_model_dir), "--strategy", "decoding=perplexity", "--limit", "4", "--out",
                             str(tmp_path / "eval"), "--data-dir", str(tiny_dataset / "data")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent.parent).returncode
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0 and "accuracy" in text, text[-2000:]
    assert "\r" not in text and "\x1b[" not in text, repr(text[:2000])


@pytest.mark.parametrize("argv, message", [
    (["prompt", "show", "--dataset", "nope", "--strategy", "naive"], "available: tiny-sent"),
    (["prompt", "show", "--dataset", "tiny-sent", "--strategy", "icl=sideways"], "icl='sideways'"),
    (["evaluate", "--dataset", "tiny-sent", "--strategy", "reasoning,decoding=perplexity"], "reasoning"),
    (["evaluate", "--dataset", "nope", "--strategy", "naive"], "not found"),
])
def test_cli_clear_errors(argv, message, tiny_dataset, capsys):
    from cli.main import main

    assert main(argv + ["--data-dir", str(tiny_dataset / "data")]) == 2
    assert message in capsys.readouterr().err


def test_bench_decoding_tiny(capsys):
    from cli.main import main

    assert main(["bench", "decoding", "--model", "tiny", "--n", "2", "--labels", "4", "--prompt-tokens", "48"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "identical predictions: yes" in out


def test_bench_decoding_shared_prompt_prefix_tiny(tiny_dataset, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("GENCLS_ROOT", str(tiny_dataset))  # data_dir() = <root>/data
    assert main(["bench", "decoding", "--model", "tiny", "--dataset", "tiny-sent", "--n", "3", "--prompt-tokens", "96",
                 "--strategy", "icl=random,k=2,decoding=perplexity", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    shared = int(out.split("tokens on average, ")[1].split(" shared")[0])
    assert shared >= 16  # system message + instructions + label list
    assert "speed-up" in out and "identical predictions: yes" in out
