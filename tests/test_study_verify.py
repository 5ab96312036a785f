"""`gencls study --verify`: committed study cells measured again from scratch and compared (the comparison
rules on constructed cells; the whole round trip on the tiny model in a subprocess, as a user runs it)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from components.study import verify
from tests.test_study import project, tiny_settings, write_dataset  # noqa: F401 (fixture)


def _cell(key, preds, gold="a"):
    rows = [[str(i), gold, p] for i, p in enumerate(preds)]
    acc = sum(p == gold for p in preds) / len(preds)
    return {"result": {"key": key, "name": f"cell {key}", "accuracy": acc, "macro_f1": acc},
            "predictions": {"test": rows}}


def _info(cells, fingerprint="fp", rl_fingerprint="rl"):
    return {"record": {"fingerprint": fingerprint, "rl_fingerprint": rl_fingerprint}, "labels": ["a", "b"],
            "cells": cells}


def test_compare_sorts_cells_into_identical_within_noise_and_differs():
    n = 200
    committed = _info([_cell("same", ["a"] * 150 + ["b"] * 50), _cell("noise", ["a"] * 150 + ["b"] * 50),
                       _cell("few", ["a"] * n), _cell("worse", ["a"] * 180 + ["b"] * 20), _cell("gone", ["a"] * n)])
    rerun = _info([_cell("same", ["a"] * 150 + ["b"] * 50),
                   _cell("noise", ["b"] * 2 + ["a"] * 150 + ["b"] * 48),  # 4 predictions changed, accuracy the same
                   _cell("few", ["b"] * 4 + ["a"] * (n - 4)),  # 4 of 200 all one way: the bootstrap excludes 0
                   _cell("worse", ["a"] * 120 + ["b"] * 80), _cell("new", ["a"] * n)])
    out = verify.compare_dataset(committed, rerun)
    by_key = {c["key"]: c for c in out["cells"]}
    assert by_key["same"]["verdict"] == "identical" and by_key["same"]["agreement"] == 1.0
    assert by_key["noise"]["verdict"] == "within noise" and by_key["noise"]["agreement"] == pytest.approx(0.98)
    few = by_key["few"]
    assert few["difference"]["accuracy"]["high"] < 0 and few["verdict"] == "within noise"
    assert few["mcnemar"] == {"p": pytest.approx(0.125), "only_rerun_right": 0, "only_committed_right": 4}
    assert by_key["worse"]["verdict"] == "differs" and by_key["worse"]["mcnemar"]["p"] < 1e-6
    assert by_key["worse"]["difference"]["accuracy"]["diff"] == pytest.approx(-0.3)  # re-run - committed
    assert out["not_rerun"] == ["gone"] and out["only_in_rerun"] == ["new"]
    assert out["counts"] == {"identical": 1, "within noise": 2, "differs": 1}
    assert out["reproduced"] is False and out["max_abs_accuracy_diff"] == pytest.approx(0.3)
    lines = verify.table("d", out)
    assert any("differs" in line and "-30.0" in line for line in lines)
    assert verify.summary({"d": out})["reproduced"] is False
    md = verify.markdown_lines({"datasets": {"d": out}, "summary": verify.summary({"d": out})})
    assert "**not reproduced**" in md[2] and any(line.startswith("| d | cell worse | 90.0 | 60.0 |") for line in md)
    assert verify.markdown_lines(None) == []
    fine = verify.compare_dataset(_info(committed["cells"][:3]), _info(rerun["cells"][:3]))
    assert fine["reproduced"] is True and verify.summary({"d": fine})["counts"]["identical"] == 1
    extra = verify.compare_dataset(_info(committed["cells"][:3]), _info(rerun["cells"][:3] + rerun["cells"][-1:]))
    assert extra["only_in_rerun"] == ["new"] and extra["reproduced"] is True  # a cell never committed: listed
    gap = verify.compare_dataset(_info(committed["cells"][:3]), _info(rerun["cells"][:2] + [
        {"result": rerun["cells"][2]["result"], "predictions": {}}]))
    assert gap["reproduced"] is False and gap["cells"][0]["key"] == "few" and gap["cells"][0]["verdict"] is None


def test_compare_refuses_other_settings_and_nothing_committed():
    with pytest.raises(ValueError, match="other settings"):
        verify.compare_dataset(_info([_cell("k", ["a"])]), _info([_cell("k", ["a"])], fingerprint="other"))
    with pytest.raises(ValueError, match="rl_fingerprint"):  # another RL budget: its RL cells would be other cells
        verify.compare_dataset(_info([_cell("k", ["a"])]), _info([_cell("k", ["a"])], rl_fingerprint="other"))
    with pytest.raises(ValueError, match="no committed cells"):
        verify.compare_dataset(None, _info([]))
    assert verify.compare_dataset(_info([_cell("k", ["a"])]), None)["not_rerun"] == ["k"]


def test_verify_measures_the_committed_cells_again_and_they_reproduce(prefect_harness, project, tiny_model_dir,
                                                                       monkeypatch):
    """A tiny study commits its cells; `gencls study --verify` trains and measures them again in a scratch project
    (its own process, MLflow store and checkpoints) and finds the same predictions; the committed cells stay."""
    from flows.study import study
    from flows.study_report import cells_root
    from flows.study_verify import scratch_root, verify_path

    import torch

    # the child's caches and thread count; its Prefect home stays the suite's (conftest: already migrated, where a
    # fresh one made the child's temporary server miss Prefect's startup timeout on 2 busy cores)
    monkeypatch.setenv("GENCLS_CACHE", str(project / "cache"))
    monkeypatch.setenv("GENCLS_THREADS", "1")
    torch.set_num_threads(1)  # as the child: another thread count sums in another order (the fixture restores it)
    settings = tiny_settings()
    study(["tinya"], "cpu", "local", "headline", str(tiny_model_dir), overrides=settings,
          only=["tfidf", "naive_sft"], register_model=False)
    committed = sorted(cells_root("cpu").joinpath("tinya").glob("*.json"))
    before = {p.name: p.read_bytes() for p in committed}
    assert len(before) >= 4  # dataset.json + tfidf, tfidf_all, naive SFT (generative, perplexity)
    command = [sys.executable, "-m", "cli", "study", "--datasets", "tinya", "--cells", "headline", "--model",
               str(tiny_model_dir), "--only", "tfidf", "naive_sft", "--verify"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reproduced ->" in done.stdout and "NOT reproduced" not in done.stdout
    out = json.loads(verify_path("cpu").read_text())
    tinya = out["datasets"]["tinya"]
    assert len(tinya["cells"]) == len(before) - 1 and not tinya["not_rerun"]
    assert all(c["verdict"] == "identical" for c in tinya["cells"])  # same engine, same machine: same predictions
    assert tinya["meta"]["command"].startswith("gencls study --verify --datasets tinya")
    rerun = scratch_root("cpu") / "reports" / "study" / "cells" / "cpu" / "tinya"
    assert sorted(p.name for p in rerun.glob("*.json")) == sorted(before)  # the same keys, measured again
    assert (scratch_root("cpu") / "mlflow" / "mlflow.db").is_file()  # its own store, not the project's
    assert {p.name: p.read_bytes() for p in committed} == before  # the committed cells are untouched
    assert "## Committed cells measured again from scratch" in (project / "reports" / "study.md").read_text()
    missing = subprocess.run([sys.executable, "-m", "cli", "study", "--datasets", "tinyb", "--verify"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no committed cpu cells for tinyb" in missing.stderr

    # --adopt: refused before any training when the re-run would leave committed cells (naive SFT) unmeasured ...
    from flows.study_verify import VerifyError, run_verification

    with pytest.raises(VerifyError, match=r"tinya: --adopt would keep 2 committed cell\(s\) .*--only tfidf"):
        run_verification(["tinya"], "cpu", "headline", str(tiny_model_dir), [], ["tfidf"], adopt_cells=True)
    # ... else the re-run's cells (resumed from the scratch project) replace the committed ones
    stale = next(p for p in committed if p.name != "dataset.json")
    cell = json.loads(stale.read_text())
    stale.write_text(json.dumps({**cell, "result": {**cell["result"], "seconds": -1.0}}))  # e.g. an older engine's
    measured = {p.name: p.read_bytes() for p in rerun.glob("*.json") if p.name != "dataset.json"}
    assert all(json.loads(b)["result"]["code"] for b in measured.values())  # the code that measured each cell
    done = subprocess.run(command + ["--adopt"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "adopted: tinya" in done.stdout
    strip = lambda b: {**json.loads(b), "result": {**json.loads(b)["result"], "adapter": None}}  # noqa: E731
    assert {p.name: strip(p.read_bytes()) for p in committed if p.name != "dataset.json"} == \
        {name: strip(b) for name, b in measured.items()}  # the re-run's cells (adapters now the project's)
    assert not rerun.exists() and not (scratch_root("cpu") / "checkpoints" / "study" / "tinya").exists()
    adapters = project / "checkpoints" / "study"  # the re-run's adapters are the project's now; the old ones kept aside
    assert list((adapters / "tinya").glob("*/sft")) and list((adapters / "tinya.replaced").glob("*/sft"))
    trained = [json.loads(p.read_text())["result"] for p in committed if p.name != "dataset.json"]
    assert all(Path(r["adapter"]).is_relative_to(adapters / "tinya") for r in trained if r.get("adapter"))
    assert any(r.get("adapter") and Path(r["adapter"]).is_dir() for r in trained)
    entry = json.loads(verify_path("cpu").read_text())["datasets"]["tinya"]
    assert entry["adopted"]["cells"] == len(before) - 1 and entry["adopted"]["code"] == [cell["result"]["code"]]
    assert "tinya: adopted on" in (project / "reports" / "study.md").read_text()
    assert not list(cells_root("cpu").glob("tinya.*"))  # no staged or replaced folder left


def test_an_interrupted_adoption_leaves_one_whole_folder(tmp_path):
    """The dataset folder is swapped by two renames; whichever step an interruption hit, one whole folder remains."""
    from components.study import measure
    from components.study.adopt import adopt_dataset, recover_adoption

    committed, rerun = tmp_path / "cells" / "d", tmp_path / "scratch" / "d"
    scratch_ckpt, ckpt = tmp_path / "scratch" / "checkpoints", tmp_path / "checkpoints"
    for folder, tag in ((committed, "old"), (rerun, "new")):
        for key in ("k1", "k2"):
            adapter = str(scratch_ckpt / "study" / "d" / "naive-1" / "sft") if key == "k1" else None
            measure.write_result(folder / f"{key}.json", {"result": {"key": key, "tag": tag, "adapter": adapter},
                                                          "predictions": {"test": []}})
    measure.write_result(committed / measure.DATASET_FILE, {"register": {"version": "3"}, "training": "old"})
    measure.write_result(rerun / measure.DATASET_FILE, {"register": None, "training": "new"})
    measure.write_result(rerun / "k9.json", {"result": {"key": "k9", "tag": "new"}})  # only in the re-run
    adopt_dataset(rerun, committed, ["k1", "k2"], scratch_ckpt, ckpt)
    assert sorted(p.name for p in committed.iterdir()) == ["dataset.json", "k1.json", "k2.json"]
    cells = {k: json.loads((committed / f"{k}.json").read_text())["result"] for k in ("k1", "k2")}
    assert all(c["tag"] == "new" for c in cells.values())
    assert cells["k1"]["adapter"] == str(ckpt / "study" / "d" / "naive-1" / "sft")  # where take_adapters puts it
    record = json.loads((committed / measure.DATASET_FILE).read_text())
    assert record == {"register": {"version": "3"}, "training": "new"}  # the committed registry decision kept
    committed.rename(committed.with_name("d.replaced"))  # killed between the two renames: the old folder comes back
    (tmp_path / "cells" / "d.adopting").mkdir()
    recover_adoption(committed)
    assert committed.is_dir() and not list(committed.parent.glob("d.*"))
    (tmp_path / "cells" / "d.replaced").mkdir()  # killed after both renames: the leftover goes
    recover_adoption(committed)
    assert committed.is_dir() and not list(committed.parent.glob("d.*"))


def test_adopted_adapters_replace_only_their_own_training_folders(tmp_path):
    """checkpoints/study/<d> holds every profile's adapters: only the re-run's training folders are replaced."""
    from components.study.adopt import take_adapters

    theirs, ours = tmp_path / "scratch" / "d", tmp_path / "study" / "d"
    for folder, names in ((theirs, ("naive-cpu",)), (ours, ("naive-cpu", "naive-cpulong"))):
        for name in names:
            (folder / name / "sft").mkdir(parents=True)
            (folder / name / "sft" / "who").write_text(folder.parent.name)
    assert take_adapters(theirs, ours) == ["naive-cpu"]
    assert (ours / "naive-cpu" / "sft" / "who").read_text() == "scratch"
    assert (ours / "naive-cpulong" / "sft" / "who").read_text() == "study"  # another profile's: untouched
    assert (tmp_path / "study" / "d.replaced" / "naive-cpu" / "sft" / "who").read_text() == "study"
    assert not theirs.exists()


def test_an_adoption_left_pending_is_finished_or_dropped(tmp_path, monkeypatch):
    """A verify entry still `adopting` (killed after writing it): done when the committed cells are the adopted
    ones, else its mark goes (the next --adopt adopts again)."""
    from components.study import measure
    from flows.study_report import cells_root
    from flows.study_verify import finish_adoptions, verify_path

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    for d, run in (("swapped", "new-run"), ("not-swapped", "old-run")):
        measure.write_result(cells_root("cpu") / d / measure.DATASET_FILE, {"fingerprint": "f"})
        measure.write_result(cells_root("cpu") / d / "k.json", {"result": {"key": "k", "fingerprint": "f", "run_id": run}})
    pending = {"state": "adopting", "run_ids": ["new-run"], "date": "2026-12-02"}
    measure.write_result(verify_path("cpu"), {"datasets": {d: {"cells": [], "adopted": dict(pending)}
                                                           for d in ("swapped", "not-swapped")}})
    scratch = tmp_path / "scratch"
    (scratch / "checkpoints" / "study" / "swapped" / "naive-1").mkdir(parents=True)
    finish_adoptions("cpu", scratch, scratch / "cells", ["swapped", "not-swapped"])
    entries = json.loads(verify_path("cpu").read_text())["datasets"]
    assert entries["swapped"]["adopted"]["state"] == "done" and "adopted" not in entries["not-swapped"]
    assert (tmp_path / "checkpoints" / "study" / "swapped" / "naive-1").is_dir()  # its adapters taken


def test_adopt_refuses_scratch_cells_of_other_code(tmp_path):
    from components.study import measure
    from components.study.adopt import AdoptError, check_adoptable

    info = {"record": {"settings": {"icl_k": 2}}, "cells": [{"result": {"key": "k", "name": "tfidf", "roles": ["tfidf"]}}]}
    scratch = tmp_path / "cells"
    measure.write_result(scratch / "d" / "k.json", {"result": {"key": "k", "fingerprint": "f", "code": "0ldc0de"}})
    check_adoptable({"d": info}, "headline", None, scratch, tmp_path / "ckpt", "0ldc0de")  # the same code: fine
    with pytest.raises(AdoptError, match=r"d: the scratch project holds cells measured by other code \(0ldc0de"):
        check_adoptable({"d": info}, "headline", None, scratch, tmp_path / "ckpt", "n3wc0de")
    with pytest.raises(AdoptError, match=r"d: --adopt would keep 1 committed cell\(s\) .*--only minilm .*\(tfidf\)"):
        check_adoptable({"d": info}, "headline", ["minilm"], scratch, tmp_path / "ckpt", "0ldc0de")


def test_adopt_needs_verify(monkeypatch):
    import flows.study
    from cli.main import main

    monkeypatch.setattr(flows.study, "study", lambda *a, **k: pytest.fail("a study ran"))
    assert main(["study", "--datasets", "tinya", "--adopt"]) == 2


def test_other_settings_stop_the_verification_before_training(tmp_path, monkeypatch):
    """The measuring-nothing run's records against the committed ones: another fingerprint is one clear error."""
    from components.study import measure
    from flows.study_report import cells_root
    from flows.study_verify import VerifyError, check_settings

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    committed = {"d": {"record": {"fingerprint": "a", "rl_fingerprint": "r"}}}
    scratch = tmp_path / "scratch"
    measure.write_result(scratch / "d" / measure.DATASET_FILE, {"dataset": "d", "fingerprint": "a", "rl_fingerprint": "r"})
    check_settings(committed, scratch, "cpu")  # the same settings: no error
    measure.write_result(scratch / "d" / measure.DATASET_FILE, {"dataset": "d", "fingerprint": "b", "rl_fingerprint": "r"})
    with pytest.raises(VerifyError, match=r"d: the re-run would measure other settings .*fingerprint b vs a.*--set"):
        check_settings(committed, scratch, "cpu")
    assert str(cells_root("cpu") / "d" / measure.DATASET_FILE) in str(
        pytest.raises(VerifyError, check_settings, committed, tmp_path / "empty", "cpu").value)


def test_keep_recipe_returns_the_stored_recipe_and_stops_when_there_is_none(tmp_path, monkeypatch):
    from components.study import measure
    from flows.study import update_recipe
    from flows.study_report import RECIPE_FILE, cells_root

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match="no stored recipe to keep"):
        update_recipe("cpu", {}, "tiny", None, keep_stored=True)
    stored = {"train": "definitions", "infer": "decoding=perplexity", "source": "validation",
              "validation_results": {"d": {"rows": []}}}
    measure.write_result(cells_root("cpu") / RECIPE_FILE, stored)
    kept = update_recipe("cpu", {}, "tiny", None, keep_stored=True)  # no dataset's rows: a re-choice would differ
    assert (kept["train"], kept["infer"], kept["source"]) == ("definitions", "decoding=perplexity", "validation")
    assert json.loads((cells_root("cpu") / RECIPE_FILE).read_text()) == stored  # not rewritten
