"""dvc.yaml wiring: after a param change `dvc repro --dry` lists exactly the stages that must rerun."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).parent / "dvc")
ALL_STAGES = {"data", "validate", "render", "sft", "rl", "evaluate", "register"}


def _run(args: list[str], cwd: Path, **extra_env: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **extra_env}
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"{args}: {out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def _stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


STUB = """import json, sys, time, pathlib
stage, outs = sys.argv[1], sys.argv[2:]
with open("kept.log", "a") as fh:  # the outputs dvc left in place for the stage (`persist`)
    fh.write(json.dumps({"stage": stage, "kept": [o for o in outs if pathlib.Path(o).exists()], "outs": outs}) + "\\n")
SCORES = json.loads(pathlib.Path("scores.json").read_text())  # metrics files: the real format
for out in outs:
    path = pathlib.Path(out)
    target = path if path.suffix else path / "stub.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(SCORES[out] if out in SCORES else f"{stage} {time.time_ns()}\\n")  # new each run
with open("ran.log", "a") as fh:
    fh.write(stage + "\\n")
"""


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A git + dvc repo with the real dvc.yaml (commands swapped for stubs that write the outs) and conf/params.yaml."""
    root = tmp_path_factory.mktemp("dvc_repo")
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "conf/params.yaml").read_text())
    subst = {"${data.dataset}": params["data"]["dataset"], "${profile}": params["profile"]}

    def path_of(entry) -> str:
        name = entry if isinstance(entry, str) else next(iter(entry))
        for key, value in subst.items():
            name = name.replace(key, value)
        return name

    outputs = {s for st in spec["stages"].values()
               for s in map(path_of, st.get("outs", []) + st.get("metrics", []) + st.get("plots", []))}
    for name, stage in spec["stages"].items():
        outs = [path_of(e) for e in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", [])]
        stage["cmd"] = f"python stub.py {name} " + " ".join(outs)
        for dep in map(path_of, stage.get("deps", [])):
            if dep in outputs:
                continue
            path = root / dep
            if path.suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"stub {path.name}\n")
            else:  # a folder dependency (data/<dataset>)
                path.mkdir(parents=True, exist_ok=True)
                (path / "train.jsonl").write_text("{}\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "conf").mkdir()
    shutil.copy(REPO / "conf/params.yaml", root / "conf/params.yaml")
    (root / "stub.py").write_text(STUB)
    from components.evaluate.evaluation import scores
    metrics = {"accuracy": 0.5, "macro_f1": 0.4, "invalid_rate": 0.1, "n": 200, "ece": None}
    (root / "scores.json").write_text(json.dumps({path_of(m): json.dumps(scores(metrics, Path(path_of(m)).parent.name))
                                                  for st in spec["stages"].values() for m in st.get("metrics", [])}))
    (root / ".gitignore").write_text("ran.log\nkept.log\n")
    _run(["git", "init", "-q"], root)
    _run([DVC, "init", "-q"], root)
    _run([DVC, "repro", "-q"], root)
    assert set((root / "ran.log").read_text().split()) == ALL_STAGES
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-q", "-m", "pipeline"], root)
    assert _stages(_run([DVC, "repro", "--dry"], root)) == set()
    return root


def _after_change(pipeline: Path, tmp_path: Path, section: str, key: str, value) -> tuple[set[str], set[str]]:
    """(stages `dvc repro --dry` names, stages `dvc repro` actually runs) after one param change, in a copy."""
    root = tmp_path / "repo"
    shutil.copytree(pipeline, root, symlinks=True)
    data = yaml.safe_load((root / "conf/params.yaml").read_text())
    data[section][key] = value
    (root / "conf/params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    dry = _stages(_run([DVC, "repro", "--dry"], root))
    (root / "ran.log").write_text("")
    _run([DVC, "repro", "-q"], root)
    return dry, set((root / "ran.log").read_text().split())


def test_rl_param_reruns_rl_and_later_never_sft(pipeline, tmp_path):
    dry, ran = _after_change(pipeline, tmp_path, "rl", "learning_rate", 1e-5)
    assert "rl" in dry and "sft" not in dry
    assert ran == {"rl", "evaluate", "register"}


def test_evaluate_keeps_its_rows_so_unchanged_ones_are_skipped(pipeline, tmp_path):
    """One stage evaluates every row; dvc must leave the rows' files in place (`persist`), or the rows whose inputs
    did not change (zero-shot and naive SFT after an RL change) could not be skipped by their records."""
    (tmp_path / "repo").mkdir()
    _after_change(pipeline, tmp_path / "repo", "rl", "learning_rate", 3e-5)
    runs = [json.loads(line) for line in (tmp_path / "repo" / "repo" / "kept.log").read_text().splitlines()]
    last = [r for r in runs if r["stage"] == "evaluate"][-1]
    assert len(last["outs"]) == 16 and last["kept"] == last["outs"]
    assert not [r for r in runs if r["stage"] == "register"][-1]["kept"]  # outputs without `persist` are removed first


def test_evaluate_stage_runs_every_row_in_one_process(monkeypatch):
    from flows import stages, steps

    calls = []
    monkeypatch.setattr(steps, "step_baselines", lambda dataset, profile: calls.append("tfidf"))
    monkeypatch.setattr(steps, "step_evaluate", lambda dataset, name, profile: calls.append(name))
    assert stages.main(["evaluate"]) == 0 and calls == ["tfidf", "zeroshot", "sft", "gencls"]
    calls.clear()
    assert stages.main(["evaluate", "sft"]) == 0 and calls == ["sft"]
    with pytest.raises(SystemExit):
        stages.main(["evaluate", "nope"])


def test_sft_param_reruns_sft_and_everything_downstream(pipeline, tmp_path):
    dry, ran = _after_change(pipeline, tmp_path, "sft", "lora_r", 8)
    assert dry == {"sft"}
    assert ran == {"sft", "rl", "evaluate", "register"}


def test_eval_param_reruns_only_evaluations(pipeline, tmp_path):
    _, ran = _after_change(pipeline, tmp_path, "evaluate", "batch_size", 8)
    assert ran == {"evaluate", "register"}


def test_exp_run_sweeps_a_param(pipeline, tmp_path):
    from components.evaluate.evaluation import SCORE_KEYS

    root = tmp_path / "repo"
    shutil.copytree(pipeline, root, symlinks=True)
    out = _run([DVC, "exp", "run", "-S", "conf/params.yaml:rl.learning_rate=3e-5"], root)
    assert "Running stage 'rl'" in out and "Running stage 'sft'" not in out
    columns = _run([DVC, "exp", "show", "--csv"], root).splitlines()[0].split(",")
    params = [c for c in columns if "/" not in c and ":" not in c and c not in ("Experiment", "rev", "typ", "Created",
                                                                               "parent")
              and c.split(".")[-1] not in SCORE_KEYS]  # not the metrics (gencls.accuracy, ...)
    assert "rl.learning_rate" in params and "sft.lora_r" in params and "profiles.quick.sft.train_size" in params
    unread = [c for c in params if c.startswith(("profiles.full", "profiles.cpu", "profiles.gpu", "retrain"))]
    assert not unread, f"dvc exp show lists params no stage reads: {unread}"
    metrics = [c for c in columns if c.endswith(".accuracy")]  # short, unique heads; GenCLS++ first
    assert metrics == ["gencls.accuracy", "sft.accuracy", "zeroshot.accuracy"], metrics
    drop = re.search(r"--drop '([^']+)'", (REPO / "Makefile").read_text()).group(1)  # `make exp`
    table = _run([DVC, "exp", "show", "--no-pager", "--drop", drop], root, COLUMNS="200")
    head = next(line for line in table.splitlines() if "Experiment" in line)
    assert all(f"{e}.{k}" in head for e in ("gencls", "sft") for k in ("accuracy", "macro_f1")), head


def test_every_stage_lists_its_script_and_params():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(spec["stages"]) == ALL_STAGES
    for name, stage in spec["stages"].items():
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
        assert "flows/stages.py" in deps and "flows/steps.py" in deps, name
        assert stage.get("params"), name
    params = yaml.safe_load((REPO / "conf/params.yaml").read_text())
    assert {"data", "sft", "rl", "evaluate", "register", "profiles", "retrain"} <= set(params)
    assert not (REPO / "params.yaml").exists()  # DVC's default file would put every key in `dvc exp show`


# ----------------------------------------------------------------------------- deps derived from the code
STAGE_ENTRY = {  # dvc stage -> the flows.steps functions `python -m flows.stages <stage>` calls
    "data": ["step_data"], "validate": ["step_validate"], "render": ["step_render", "resolve_configs", "eval_settings"],
    "sft": ["step_sft"], "rl": ["step_rl"], "evaluate": ["step_evaluate", "step_baselines"], "register": ["step_register"],
}


def _stage_code(entries: list[str]) -> set[str]:
    """Files of the repo modules a stage can import: its step functions' imports (and the steps helpers they
    call), the module-level imports of flows/steps.py and flows/stages.py, then everything those import
    (components.fingerprint.module_closure: the same closure the steps' skip records hash)."""
    import ast

    from components.fingerprint import imported_modules, module_closure

    tree = ast.parse((REPO / "flows" / "steps.py").read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    top = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    modules = set().union(*(imported_modules(n) for n in top)) | imported_modules(
        ast.parse((REPO / "flows/stages.py").read_text()))
    seen, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        modules |= imported_modules(functions[name])
        todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name) and n.id in functions]
    modules -= {"flows.steps", "flows.stages"}  # their other functions belong to other stages
    files = {str(path.relative_to(REPO)) for path in module_closure(*sorted(modules)) if path.name != "__init__.py"}
    return files | {"flows/steps.py", "flows/stages.py"}


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRY))
def test_each_stage_lists_the_code_it_imports(stage):
    """A change to any module a stage's code can import must rerun the stage: dvc.yaml lists them all."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    listed = {d for d in spec["deps"] if d.endswith(".py")}
    derived = _stage_code(STAGE_ENTRY[stage])
    missing, extra = sorted(derived - listed), sorted(listed - derived)
    assert not missing, f"dvc.yaml stage {stage!r} imports but does not list: {missing}"
    assert not extra, f"dvc.yaml stage {stage!r} lists code it cannot import (reruns for nothing): {extra}"


def test_run_specific_files_are_dvcignored(tmp_path):
    """Timings, run ids and trainer resume state never enter an output's hash (dvc.lock stays put)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    _run([DVC, "init", "-q"], repo)
    shutil.copy(REPO / ".dvcignore", repo / ".dvcignore")
    ignored = ["checkpoints/trec6/sft/run.json", "checkpoints/trec6/sft/.gencls_step.json",
               "checkpoints/trec6/rl/trainer/checkpoint-8/trainer_state.json", "reports/trec6/sft/run.json"]
    kept = ["checkpoints/trec6/sft/metrics.json", "checkpoints/trec6/sft/best/adapter_config.json",
            "checkpoints/trec6/sft/adapter_model.safetensors"]
    for rel in ignored + kept:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("x")
    out = subprocess.run([DVC, "check-ignore", *ignored, *kept], cwd=repo, capture_output=True, text=True)
    assert set(out.stdout.split()) == set(ignored)


def test_stable_and_portable_outputs(tmp_path, monkeypatch):
    from components import config
    from components.train.checkpoints import canonical_adapter_config

    data = {"accuracy": 0.5, "seconds": 3.2, "eval_history": [{"step": 1, "seconds": 1.0, "run_id": "x"}]}
    assert config.stable(data) == {"accuracy": 0.5, "eval_history": [{"step": 1}]}
    assert config.run_info(data) == {"seconds": 3.2}
    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    assert config.portable(tmp_path / "checkpoints" / "d" / "sft") == "checkpoints/d/sft"
    assert config.portable("/elsewhere/model") == "/elsewhere/model" and config.portable(None) is None
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["v_proj", "k_proj", "q_proj"]}))
    canonical_adapter_config(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["k_proj", "q_proj", "v_proj"]


def test_a_step_fingerprint_covers_all_the_code_it_can_run():
    """The skip record's source hash follows imports: SFT's covers the engine and prompts, not serving."""
    from components.fingerprint import module_closure, source_hash

    files = {p.name for p in module_closure("components.train.sft")}
    assert {"sft.py", "engine.py", "prompts.py", "models.py", "config.py"} <= files
    assert "serving.py" not in files and "registry.py" not in files
    assert source_hash("components.train.sft") != source_hash("components.train.rl")


def test_skip_records_are_one_mechanism(tmp_path):
    """A folder is finished for a key only with its record (written last, atomically) and the files it needs."""
    from components.fingerprint import RECORD_FILE, fingerprint, finished, read_record, write_record

    key = fingerprint({"config": {"lr": 1e-4}, "data": "abc"})
    assert finished(tmp_path, key) is None and read_record(tmp_path) == {}
    write_record(tmp_path, {"fingerprint": key, "run_id": "r1"})
    assert finished(tmp_path, key)["run_id"] == "r1"
    assert finished(tmp_path, fingerprint({"config": {"lr": 2e-4}, "data": "abc"})) is None  # other inputs
    assert finished(tmp_path, key, ("adapter_model.safetensors",)) is None  # an output is missing
    (tmp_path / RECORD_FILE).write_text('{"fingerprint": "')  # torn by a kill
    assert finished(tmp_path, key) is None and not list(tmp_path.glob("*.tmp"))
    assert fingerprint({"a": 1}, 16) == fingerprint({"a": 1})[:16]  # resume ids and study keys: the same hash
    (tmp_path / "predictions.jsonl").write_text("run A\n")
    write_record(tmp_path, {"fingerprint": key}, outputs=("predictions.jsonl",))
    assert finished(tmp_path, key, ("predictions.jsonl",))
    (tmp_path / "predictions.jsonl").write_text("run B\n")  # e.g. `dvc checkout` of another experiment's outputs
    assert finished(tmp_path, key, ("predictions.jsonl",)) is None


def test_an_evaluation_row_is_skipped_only_with_its_own_outputs(tmp_path, monkeypatch):
    """The evaluate stage's outputs persist across runs: a row is skipped only when its record's inputs match and
    its outputs are the ones it wrote; new adapter weights or restored outputs make it evaluate again."""
    from components import config
    from flows import steps

    root = tmp_path / "project"
    for sub in ("data/toy", "checkpoints/toy/sft", "reports"):
        (root / sub).mkdir(parents=True)
    for name in ("train.jsonl", "test.jsonl", "labels.yaml"):
        (root / "data/toy" / name).write_text(f"{name}\n")
    (root / "checkpoints/toy/sft/adapter_model.safetensors").write_bytes(b"weights 1")
    monkeypatch.setattr(config, "data_dir", lambda: root / "data")
    monkeypatch.setattr(config, "checkpoints_dir", lambda: root / "checkpoints")
    monkeypatch.setattr(config, "reports_dir", lambda: root / "reports")
    monkeypatch.setattr(steps.tracking, "log_metrics", lambda *a, **k: None)
    monkeypatch.setattr(steps.tracking, "log_artifact", lambda *a, **k: None)
    monkeypatch.setattr(steps, "run_scope", lambda *a, **k: __import__("contextlib").nullcontext("run"))
    calls = []

    def fake_evaluate(dataset, model, strategy, out_dir, **kwargs):
        calls.append(1)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in steps.EVAL_OUTPUTS:
            (out_dir / name).write_text(json.dumps({"accuracy": 0.5, "call": len(calls)}))
        return {"accuracy": 0.5}

    import components.evaluate.evaluation as evaluation

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    for _ in range(2):
        steps.step_evaluate("toy", "sft", model="tiny")
    assert len(calls) == 1  # the second run skipped the row
    out = root / "reports/toy/sft"
    (out / "predictions.jsonl").write_text("another experiment's predictions\n")  # restored by dvc, say
    steps.step_evaluate("toy", "sft", model="tiny")
    assert len(calls) == 2
    (root / "checkpoints/toy/sft/adapter_model.safetensors").write_bytes(b"weights 2")  # no record upstream
    steps.step_evaluate("toy", "sft", model="tiny")
    assert len(calls) == 3
