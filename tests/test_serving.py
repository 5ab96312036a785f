"""The registered pyfunc model served over REST by `mlflow models serve` (tiny model, real server)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from components.ops import registry, serving, tracking

LABELS = {"negative": "The text expresses an unfavourable opinion.",
          "neutral": "The text states facts without an opinion.",
          "positive": "The text expresses a favourable opinion."}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload) -> tuple[int, dict | str]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode()
        return err.code, body


PARITY_BUDGET = 40  # a prompt budget far from serving's old default (384), so a lost setting shows


@pytest.fixture(scope="module")
def registered(tiny_model_dir, tmp_path_factory):
    """A 1-step SFT adapter of the tiny model, logged as a pyfunc and registered as champion."""
    from components.train.sft import train_sft
    from components.train.configs import SFTConfig

    root = tmp_path_factory.mktemp("serving_root")
    patch = pytest.MonkeyPatch()
    patch.setenv("GENCLS_ROOT", str(root))
    patch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(root))
    folder = root / "data" / "toy"
    folder.mkdir(parents=True)
    for split, n in (("train", 12), ("test", 3)):
        rows = [{"id": f"{split}-{lab}-{i}", "label": lab,
                 "text": f"{split} {lab} example {i}" + " with a much longer tail of words" * (4 * (i % 2))}
                for lab in LABELS for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "labels.yaml").write_text(yaml.safe_dump(LABELS, sort_keys=False))
    config = SFTConfig(model=str(tiny_model_dir), train_size=8, eval_size=0, batch_size=4, max_steps=1,
                       save_steps=10, logging_steps=1)
    adapter = train_sft("toy", config, out_dir=root / "checkpoints" / "toy" / "sft")
    with tracking.start_run("toy", run_name="serve-test", tags={"strategy": "decoding=perplexity"}) as run:
        info = serving.log_model(run.info.run_id, adapter, folder / "labels.yaml", "decoding=perplexity",
                                 max_prompt_tokens=PARITY_BUDGET, seed=3)
        decision = registry.register_and_gate(run.info.run_id, "toy", {"accuracy": 0.5, "macro_f1": 0.5}, "h",
                                              model_uri=info.model_uri)
    assert decision["promoted"]
    yield root, info
    patch.undo()


def test_logged_model_names_base_and_holds_no_base_weights(registered):
    import mlflow

    root, info = registered
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "dl")))
    conf = yaml.safe_load((local / "MLmodel").read_text())
    model_config = conf["flavors"]["python_function"]["config"] if "config" in conf["flavors"]["python_function"] \
        else conf["flavors"]["python_function"].get("model_config", {})
    assert "base_model" in model_config and "package" in model_config
    weights = [p for p in local.rglob("*.safetensors")]
    assert weights and all("adapter" in p.name for p in weights)  # LoRA adapter only, never base weights
    reqs = (local / "requirements.txt").read_text()
    assert "torchvision" not in reqs and "mlflow==" in reqs
    assert info.signature.inputs.input_names() == ["text"]
    code = local / "code" / "components"  # the whole package ships with the model (a fresh process imports it)
    assert (code / "config.py").is_file() and (code / "ops" / "serving.py").is_file()


def test_models_logged_before_the_subpackages_still_load_their_class():
    """A pyfunc model pickled as `components.serving.GenclsClassifier` (before components/ had subpackages)
    finds its class in a process that has already imported this components/ package."""
    import pickle

    from components.ops import serving

    old_reference = b"ccomponents.serving\nGenclsClassifier\n."  # pickle: GLOBAL 'components.serving GenclsClassifier'
    assert pickle.loads(old_reference) is serving.GenclsClassifier


def test_rest_answers_label_and_probs_and_400_on_bad_requests(registered):
    root, _ = registered
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(root), "GENCLS_ROOT": str(root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    gencls_bin = str(Path(sys.executable).parent / "gencls")
    proc = subprocess.Popen([gencls_bin, "serve", "--dataset", "toy", "--port", str(port), "--max-rows", "5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 150
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow models serve did not become healthy")
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["text"],
                                                                         "data": [["great film"], ["who wrote it"]]}})
        assert status == 200, body
        preds = body["predictions"]
        assert len(preds) == 2
        for pred in preds:
            assert pred["label"] in LABELS
            assert set(pred["probs"]) == set(LABELS) and abs(sum(pred["probs"].values()) - 1) < 1e-4
        for bad in ({"dataframe_split": {"columns": ["text"], "data": []}},  # no rows
                    {"inputs": {"txt": ["hello"]}},  # wrong column
                    {"dataframe_split": {"columns": ["text"], "data": [[""]]}},  # empty text
                    {"nothing": 1}):  # not a known request format
            status, body = _post(f"{base}/invocations", bad)
            assert 400 <= status < 500, (bad, status, body)
            assert "message" in body or "error" in body
        status, body = _post(f"{base}/invocations", b"{not json")
        assert 400 <= status < 500, (status, body)
        nested = b'{"dataframe_split": {"columns": ["text"], "data": [' + b"[" * 5000 + b"]" * 5000 + b"]}}"
        status, body = _post(f"{base}/invocations", nested)
        assert 400 <= status < 500, (status, str(body)[:300])  # a malformed body is the client's fault, never a 500
        status, body = _post(f"{base}/invocations", {"dataframe_split": {"columns": ["text"],
                                                                         "data": [["a text"]] * 6}})
        assert status == 400 and "at most 5 per request" in str(body)  # --max-rows reached the server
        proc.send_signal(signal.SIGTERM)  # to `gencls serve` only: it must stop the server and its workers
        assert proc.wait(timeout=60) != 0
        time.sleep(1)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{base}/ping", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_serve_unknown_dataset_is_one_line_exit_2(registered, capsys):
    from cli.main import main

    root, _ = registered
    assert main(["serve", "--dataset", "nosuch", "--port", "5999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gencls-nosuch@champion" in err[0] and "retrain" in err[0]


def test_served_predictions_equal_gencls_evaluate(registered):
    """Train/serve parity: the registered model builds the prompts the evaluation built."""
    import mlflow
    import pandas as pd

    from components.data.datasets import load_split
    from components.evaluate.evaluation import evaluate

    root, info = registered
    adapter = root / "checkpoints" / "toy" / "sft"
    metrics = evaluate("toy", None, "decoding=perplexity", adapter=str(adapter), out_dir=root / "eval",
                       max_prompt_tokens=PARITY_BUDGET, seed=3, progress=False)
    assert metrics["truncated"] > 0  # the small budget matters for these prompts
    records = [json.loads(line) for line in (root / "eval" / "predictions.jsonl").read_text().splitlines()]
    texts = {ex["id"]: ex["text"] for ex in load_split("toy", "test")}
    model = mlflow.pyfunc.load_model("models:/gencls-toy@champion")
    served = model.predict(pd.DataFrame({"text": [texts[r["id"]] for r in records]}))
    assert list(served["label"]) == [r["pred"] for r in records]
    for probs, record in zip(served["probs"], records):
        assert max(abs(probs[k] - record["probs"][k]) for k in probs) < 1e-4
    # the tiny model is nearly indifferent to a few words, so compare the prompts themselves too
    builder = model.unwrap_python_model().builder
    by_id = {ex["id"]: ex for ex in load_split("toy", "test")}
    sample = (root / "eval" / "prompts_sample.txt").read_text()
    assert sample == ("\n" + "=" * 80 + "\n").join(builder.prompt(by_id[r["id"]]) for r in records[:3]) + "\n"


def test_gate_scorer_scores_the_served_model_on_validation_examples(registered):
    import mlflow
    import pandas as pd

    from components.data.datasets import load_split

    examples = load_split("toy", "train")[:9]
    correct = registry.gate_scorer(examples)("models:/gencls-toy@champion")
    served = mlflow.pyfunc.load_model("models:/gencls-toy@champion").predict(
        pd.DataFrame({"text": [ex["text"] for ex in examples]}))
    assert correct == [pred == ex["label"] for pred, ex in zip(served["label"], examples)]
    assert len(correct) == 9


def test_gencls_predict_classifies_a_file_like_the_served_model(registered, tmp_path, capsys):
    import mlflow
    import pandas as pd

    from cli.main import main
    from components.data.datasets import load_split

    rows = load_split("toy", "test")[:7]
    pd.DataFrame({"id": [r["id"] for r in rows], "message": [r["text"] for r in rows]}).to_csv(
        tmp_path / "in.csv", index=False)
    assert main(["predict", "--dataset", "toy", "--input", str(tmp_path / "in.csv"), "--output",
                 str(tmp_path / "out.jsonl"), "--text-col", "message", "--batch-size", "3"]) == 0
    out = pd.read_json(tmp_path / "out.jsonl", lines=True, dtype=False)
    served = mlflow.pyfunc.load_model("models:/gencls-toy@champion").predict(
        pd.DataFrame({"text": [r["text"] for r in rows]}))
    assert list(out["label"]) == list(served["label"]) and list(out["id"]) == [r["id"] for r in rows]
    probs = out[[c for c in out.columns if c.startswith("prob_")]]
    assert sorted(probs.columns) == sorted(f"prob_{label}" for label in LABELS)
    assert (abs(probs.sum(axis=1) - 1) < 1e-4).all()
    capsys.readouterr()  # the progress bars of the run above
    assert main(["predict", "--dataset", "toy", "--input", str(tmp_path / "in.csv"), "--output",
                 str(tmp_path / "bad.csv")]) == 2  # no `text` column: one line, nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'text'" in err[0] and not (tmp_path / "bad.csv").exists()
