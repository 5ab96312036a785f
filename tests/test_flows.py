"""The Prefect retraining flow end to end on a tiny model and a tiny dataset (prefect_test_harness)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.ops import registry, tracking

LABELS = {"negative": "The text expresses an unfavourable opinion.",
          "neutral": "The text states facts without an opinion.",
          "positive": "The text expresses a favourable opinion."}


def write_tiny_dataset(data_dir, name="tiny", n_train=12, n_test=3, bad=False):
    """data/<name>/ with 3 labels; `bad` plants a label that labels.yaml does not define."""
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"id": f"{split}-{lab}-{i}", "text": f"{split} {lab} example number {i}", "label": lab}
                for lab in LABELS for i in range(n)]
        if bad and split == "train":
            rows.append({"id": "x", "text": "planted fault", "label": "bogus"})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "labels.yaml").write_text(yaml.safe_dump(LABELS, sort_keys=False), encoding="utf-8")


@pytest.fixture()
def project(tmp_path, monkeypatch, tiny_model_dir):
    """A temp project root (data/, checkpoints/, reports/, mlflow/) with a tiny dataset."""
    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    write_tiny_dataset(tmp_path / "data")
    return tmp_path


def tiny_overrides(model_dir) -> dict:
    """Configs that train for one step on the tiny model (seconds)."""
    return {"sft.model": str(model_dir), "sft.train_size": 8, "sft.eval_size": 0, "sft.batch_size": 4,
            "sft.max_steps": 1, "sft.save_steps": 10, "sft.logging_steps": 1,
            "rl.train_size": 8, "rl.eval_size": 0, "rl.num_generations": 2, "rl.batch_size": 4, "rl.max_steps": 1,
            "rl.max_completion_length": 4, "rl.save_steps": 10, "rl.logging_steps": 1}


def test_retrain_flow_end_to_end_then_resumes(prefect_harness, project, tiny_model_dir):
    from flows import steps
    from flows.retrain import retrain

    out = retrain("tiny", "quick", tiny_overrides(tiny_model_dir), {"limit": 6, "batch_size": 8},
                  evaluations=["zeroshot", "gencls"])
    assert out["decision"]["promoted"] and out["decision"]["version"] == "1"
    champ = registry.current_champion("tiny")
    assert champ is not None and str(champ.version) == "1"
    assert champ.tags["base_model"] and champ.tags["strategy.inference"] and champ.tags["profile"]
    assert len(champ.tags["data_hash"]) == 64 and "GenCLS++ classifier for tiny" in champ.description
    run = tracking.client().get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "tiny" and run.data.tags["strategy"] == steps.eval_settings("gencls")["strategy"]
    assert run.data.params["sft.model"] == str(tiny_model_dir) and "rl.beta" in run.data.params
    assert "gencls/accuracy" in run.data.metrics and "zeroshot/accuracy" in run.data.metrics
    history = tracking.client().get_metric_history(out["run_id"], "sft/loss")
    assert history, "per-step SFT loss is logged"
    artifacts = {a.path for a in tracking.client().list_artifacts(out["run_id"])}
    assert {"reports", "eval", "prompts", "validation"} <= artifacts
    eval_files = {a.path for a in tracking.client().list_artifacts(out["run_id"], "eval/gencls")}
    assert "eval/gencls/confusion.png" in eval_files and "eval/gencls/predictions.jsonl" in eval_files
    assert (project / "reports" / "tiny" / "register.json").is_file()
    from prefect.artifacts import Artifact

    from flows.retrain import artifact_key

    artifact = Artifact.get(artifact_key("tiny"))  # the flow run's result table, in the Prefect UI
    assert artifact is not None and artifact.type == "markdown"
    table_rows = {line.split("|")[1].strip() for line in artifact.data.splitlines() if line.startswith("|")}
    assert "GenCLS++ (SFT+RL)" in table_rows and out["run_id"] in artifact.data and "promoted" in artifact.data
    tfidf = json.loads((project / "reports" / "tiny" / "tfidf" / "metrics.json").read_text())
    tfidf_all = json.loads((project / "reports" / "tiny" / "tfidf_all" / "metrics.json").read_text())
    assert tfidf["n_train"] == 8 and tfidf_all["n_train"] == len(LABELS) * 12  # SFT's 8 examples; every train text
    assert tfidf["n"] == tfidf_all["n"] == 6  # the evaluations' test subset
    assert {"TF-IDF+LR same N", "TF-IDF+LR all data"} <= table_rows

    # second run: training and evaluation are up to date, so they are skipped; the gate sees a tie
    again = retrain("tiny", "quick", tiny_overrides(tiny_model_dir), {"limit": 6, "batch_size": 8},
                    evaluations=["gencls"])
    run2 = tracking.client().get_run(again["run_id"])
    assert run2.data.tags.get("sft.skipped") == "true" and run2.data.tags.get("rl.skipped") == "true"
    assert not again["decision"]["promoted"] and str(registry.current_champion("tiny").version) == "1"


def test_failed_validation_stops_before_training(prefect_harness, project, tiny_model_dir):
    from flows.retrain import retrain

    write_tiny_dataset(project / "data", "broken", bad=True)
    state = retrain("broken", "quick", tiny_overrides(tiny_model_dir), return_state=True)
    assert state.is_failed()
    assert "validation" in str(state.message).lower() or "bogus" in str(state.message)
    assert not (project / "checkpoints" / "broken" / "sft").exists()
    exp = tracking.client().get_experiment_by_name("gencls-broken")
    runs = tracking.client().search_runs([exp.experiment_id])
    assert runs and runs[0].info.status == "FAILED" and "DataValidationError" in runs[0].data.tags["error"]


def test_retrain_refuses_bad_settings_and_unknown_datasets_before_anything_runs(capsys, tmp_path, monkeypatch):
    from cli.main import main

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))  # no data built here
    assert main(["retrain", "--dataset", "trec6", "--set", "sft.max_steps=abc"]) == 2
    assert main(["retrain", "--dataset", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "SFTConfig.max_steps='abc': expected a whole number" in err[0]
    assert "'nosuch' is not built" in err[1] and "Traceback" not in "".join(err)


def test_schedule_runs_as_a_service_units(tmp_path, monkeypatch, capsys):
    """`gencls serve-deployments --systemd-units DIR` writes units that restart the server and the schedule."""
    from cli.main import main

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    assert main(["serve-deployments", "--systemd-units", str(tmp_path / "units")]) == 0
    server = (tmp_path / "units" / "gencls-prefect.service").read_text()
    schedule = (tmp_path / "units" / "gencls-schedule.service").read_text()
    for unit in (server, schedule):
        assert "Restart=always" in unit and f"WorkingDirectory={tmp_path}" in unit
        assert "PREFECT_API_URL=http://127.0.0.1:4200/api" in unit and f"PREFECT_HOME={tmp_path}/prefect-home" in unit
        exe = next(line.split("=", 1)[1].split()[0] for line in unit.splitlines() if line.startswith("ExecStart="))
        assert Path(exe).is_file(), exe  # the venv's own prefect / gencls
    assert "--host 127.0.0.1" in server and "serve-deployments" in schedule and "Requires=gencls-prefect" in schedule
    assert "systemctl --user" in capsys.readouterr().out


def test_dill_output_capture_inside_a_logging_task_stays_out_of_the_log(prefect_harness):
    """Inside a log_prints task, dill's stdout capture (HF datasets' fingerprint of TRL's map function)
    would go to the run log as bytecode; python_print keeps it captured."""
    import contextlib
    import dis
    import io

    from prefect import flow

    from components.train.callbacks import python_print

    def captured() -> str:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            dis.dis(lambda x: x + 1)
        return buffer.getvalue()

    @flow(log_prints=True)
    def probe() -> tuple[str, str]:
        bare = captured()
        with python_print():
            fixed = captured()
        return bare, fixed

    bare, fixed = probe()
    assert "LOAD_FAST" not in bare  # what Prefect's print patch does to a captured dis.dis
    assert "LOAD_FAST" in fixed


def test_summary_interval_pairs_the_two_rows_on_their_shared_test_examples(tmp_path, monkeypatch):
    from components.evaluate.summary import format_table, summary_interval

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    write_tiny_dataset(tmp_path / "data")
    gold = [lab for lab in LABELS for _ in range(10)]
    wrong = {lab: [other for other in LABELS if other != lab][0] for lab in LABELS}
    rows = {"sft": [g if i % 2 else wrong[g] for i, g in enumerate(gold)],  # half right
            "gencls": list(gold)}  # all right
    for name, preds in rows.items():
        folder = tmp_path / "reports" / "tiny" / name
        folder.mkdir(parents=True)
        (folder / "predictions.jsonl").write_text("".join(json.dumps({"id": f"e{i}", "label": g, "pred": p}) + "\n"
                                                          for i, (g, p) in enumerate(zip(gold, preds))))
    interval = summary_interval("tiny")
    assert interval["n"] == len(gold) and interval["accuracy"]["diff"] == 0.5
    assert 0 < interval["accuracy"]["low"] < 0.5 < interval["accuracy"]["high"] <= 0.75
    line = format_table([], interval).splitlines()[-1]
    assert line.startswith("GenCLS++ (SFT+RL) - naive SFT (paired bootstrap 95%, n = 30): accuracy +50.0 points")
    assert "points [+" in line and line.count("better") == 2
    (tmp_path / "reports" / "tiny" / "sft" / "predictions.jsonl").unlink()
    assert summary_interval("tiny") is None


def test_prefect_home_is_made_on_a_machine_without_a_cache_dir(tmp_path):
    """A fresh machine has no ~/.cache/gencls: Prefect makes its home without parents, so its sqlite database
    could not open and every flow's temporary server timed out. set_offline_env makes the path first."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "fresh" / "cache"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"} | {"GENCLS_CACHE": str(cache)}
    code = ("from components.config import set_offline_env; set_offline_env()\n"
            "import prefect.settings as s; print(s.get_current_settings().home)")
    out = subprocess.run([sys.executable, "-W", "error::UserWarning:prefect.context", "-c", code], env=env,
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == cache / "prefect"
    assert (cache / "prefect").is_dir()
