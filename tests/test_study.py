"""The GenCLS++ study: cell grid, best-combination rule, subsampling, report; the flow end to end,
resume after a fault, report vs MLflow, and two cells on a local Dask cluster (tiny model, tiny data)."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import yaml

from components.study import plan, prepare, report

LABELS = {"negative": "The text expresses an unfavourable opinion.",
          "neutral": "The text states facts without an opinion.",
          "positive": "The text expresses a favourable opinion."}
MODEL = "tiny"


def write_dataset(data_dir, name, n_train=16, n_test=4):
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [{"id": f"{split}-{lab}-{i}", "text": f"{name} {split} {lab} example number {i}", "label": lab}
                for lab in LABELS for i in range(n)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "labels.yaml").write_text(yaml.safe_dump(LABELS, sort_keys=False), encoding="utf-8")


# ----------------------------------------------------------------------------- pure helpers
def test_cell_key_is_stable_and_sensitive():
    cell = plan.Cell("trained", "definitions", "definitions", False, "cpu", MODEL)
    assert cell.key("fp") == plan.Cell("trained", "definitions", "definitions", False, "cpu", MODEL).key("fp")
    assert len(cell.key("fp")) == 12
    others = [plan.Cell("trained", "definitions", "definitions", True, "cpu", MODEL).key("fp"),  # rl
              plan.Cell("trained", "definitions", "naive", False, "cpu", MODEL).key("fp"),  # inference strategy
              plan.Cell("trained", "definitions", "definitions", False, "gpu", MODEL).key("fp"),  # profile
              cell.key("other-settings")]  # budget / subsample changed
    assert len({cell.key("fp"), *others}) == 5


def test_strategy_combination_and_canonical_slugs():
    assert plan.canonical("icl=semantic", k=2) == "icl=semantic,k=2"
    assert plan.combine("definitions", "numeric", "decoding=perplexity") == "definitions,numeric,decoding=perplexity"
    # reasoning forces generative decoding (perplexity scores a direct answer)
    assert plan.combine("definitions,decoding=perplexity", "reasoning") == "definitions,reasoning"
    assert plan.without_decoding("numeric,decoding=perplexity") == "numeric"


def test_plan_covers_baselines_dimensions_grid_and_best():
    headline = plan.roles_by_cell(plan.phase1_cells("headline", "cpu", MODEL, 2))
    assert {r for roles in headline.values() for r in roles} == {
        "naive_sft", "naive_sft_perplexity", "tfidf", "tfidf_all", "minilm", "zeroshot", "zeroshot_perplexity"}
    assert {c.kind for c in headline} == {"trained", "tfidf", "tfidf_all", "minilm", "zeroshot"}
    ablation = plan.phase1_cells("ablation", "cpu", MODEL, 2)
    roles = plan.roles_by_cell(ablation)
    # naive SFT is the reference of every validation comparison; grid-only cells are measured on test only
    naive = plan.Cell("trained", "naive", "naive", False, "cpu", MODEL)
    assert plan.needs_validation(headline[naive]) and plan.needs_validation(roles[naive])
    assert not plan.needs_validation(["grid:numeric|definitions"]) and not plan.needs_validation(["tfidf"])
    assert any(c.kind == "zeroshot" and c.infer == plan.PERPLEXITY for c in headline)
    grid = [r for r, _ in ablation if r.startswith("grid:")]
    assert len(grid) == len(plan.INTERPLAY) ** 2
    dims = {r for r, _ in ablation if r.startswith("dim:")}
    assert len(dims) == 3 * len(plan.TRAIN_DIMS) + len(plan.INFER_ONLY_DIMS)
    # one adapter per training strategy: naive + the five dimensions
    trained = {c.train for c in roles if c.kind == "trained"}
    assert trained == {"naive", "definitions", "uncertain", "numeric", "icl=random,k=2", "icl=semantic,k=2"}
    # cells shared between the grid and the single-dimension rows are measured once
    both = plan.Cell("trained", "definitions", "definitions", False, "cpu", MODEL)
    assert set(roles[both]) == {"dim:definitions:both", "grid:definitions|definitions"}
    # decoding is inference-only: never a training strategy
    assert not any("decoding" in c.train for c in roles)
    phase2 = dict(plan.phase2_cells("all", "cpu", MODEL, ("numeric", "numeric,decoding=perplexity")))
    assert phase2["gencls"].rl and phase2["gencls"].infer == "numeric,decoding=perplexity"
    assert not phase2["best_sft"].rl
    assert phase2["reasoning"].train == "numeric,reasoning" and phase2["reasoning"].infer == "numeric,reasoning"
    assert [r for r, _ in plan.phase2_cells("headline", "cpu", MODEL, ("naive", "naive"))] == ["best_sft", "gencls"]
    with pytest.raises(ValueError, match="headline, ablation, all"):
        plan.phase1_cells("everything", "cpu", MODEL, 2)


def _val(train, infer, acc, rl=False):
    return {"kind": "trained", "train": train, "infer": infer, "rl": rl, "val_accuracy": acc}


def test_select_best_uses_validation_gains_not_test():
    results = [_val("naive", "naive", 0.50), _val("definitions", "definitions", 0.60), _val("numeric", "numeric", 0.45),
               _val("uncertain", "uncertain", 0.50), _val("icl=random,k=2", "icl=random,k=2", 0.55),
               _val("icl=semantic,k=2", "icl=semantic,k=2", 0.58), _val("naive", "decoding=perplexity", 0.52),
               # a test-set number must not influence the choice
               {"kind": "trained", "train": "numeric", "infer": "numeric", "rl": False, "accuracy": 0.99}]
    best = plan.select_best(results, k=2)
    assert best["source"] == "validation"
    assert best["train"] == "icl=semantic,k=2,definitions"  # numeric (-5) and uncertain (0) stay off; better icl
    assert best["infer"] == "icl=semantic,k=2,definitions,decoding=perplexity"
    assert best["gains"]["numeric"] == pytest.approx(-0.05)
    default = plan.select_best([], k=2)
    assert default["source"] == "default" and default["train"] == plan.canonical(plan.DEFAULT_BEST[0], 2)


def test_subsample_records_exactly_what_it_took():
    from components.train.sampling import split_train_eval

    train = [{"id": f"t{i}", "text": f"x {i}", "label": "ab"[i % 2]} for i in range(60)]
    test = [{"id": f"s{i}", "text": f"y {i}", "label": "ab"[i % 2]} for i in range(20)]
    splits, record = prepare.subsample(train, test, train_size=10, val_size=6, test_size=8, seed=3, heldout=4)
    sizes = record["sizes"]
    assert {k: sizes[k] for k in ("pool", "trained", "heldout", "val", "test")} == \
        {"pool": 14, "trained": 10, "heldout": 4, "val": 6, "test": 8} and record["seed"] == 3
    assert sizes["train_all"] == 54 and not {e["id"] for e in splits["train_all"]} & {e["id"] for e in splits["val"]}
    # no leak between the validation slice and the pool; trained + held-out = pool
    assert not {e["id"] for e in splits["pool"]} & {e["id"] for e in splits["val"]}
    assert {e["id"] for e in splits["trained"]} | {e["id"] for e in splits["heldout"]} == {e["id"] for e in splits["pool"]}
    # SFT carves its held-out slice from the pool file with the same function and seed: the same examples
    sft_train, sft_held = split_train_eval(splits["pool"], 0, 4, 3)
    assert {e["id"] for e in sft_held} == {e["id"] for e in splits["heldout"]}
    assert {e["id"] for e in sft_train} == {e["id"] for e in splits["trained"]}
    assert record["ids_sha256"]["trained"] == prepare.ids_hash(splits["trained"])
    again, record2 = prepare.subsample(train, test, 10, 6, 8, seed=3, heldout=4)
    assert record2 == record and again == splits  # seeded, reproducible
    full, rec_full = prepare.subsample(train, test, None, 0, None, seed=0)
    assert rec_full["sizes"]["trained"] == 60 and rec_full["sizes"]["test"] == 20


def _result(key, roles, train, infer, acc, rl=False, kind="trained"):
    return {"key": key, "name": key, "roles": roles, "kind": kind, "train": train, "infer": infer, "rl": rl,
            "accuracy": acc, "macro_f1": acc - 0.1, "invalid_rate": 0.0, "run_id": f"run-{key}"}


def test_aggregate_markdown_and_plots(tmp_path):
    cells = [_result("a", ["tfidf"], "-", "-", 0.8, kind="tfidf"), _result("b", ["zeroshot"], "-", "naive", 0.2, kind="zeroshot"),
             _result("c", ["naive_sft", "grid:naive|naive"], "naive", "naive", 0.6),
             _result("d", ["grid:naive|numeric"], "naive", "numeric", 0.3),
             _result("e", ["gencls"], "definitions", "definitions", 0.7, rl=True)]
    study = report.aggregate({"ds1": {"cells": cells, "best": {"train": "definitions", "infer": "definitions",
                                                          "source": "default", "gains": {}, "rule": "r"}},
                         "ds2": {"cells": [_result("f", ["naive_sft"], "naive", "naive", 0.5),
                                           _result("g", ["gencls"], "definitions", "definitions", 0.55, rl=True)]}},
                        {"profile": "cpu", "cells": "all", "model": MODEL, "machine": report.machine_info(), "seconds": 1.0})
    summary = study["summary"]
    assert summary["gain_over_naive_sft"] == {"ds1": pytest.approx(0.1), "ds2": pytest.approx(0.05)}
    assert summary["mean_gain_over_naive_sft_points"] == pytest.approx(7.5)
    assert summary["tfidf_mean_accuracy"] == pytest.approx(0.8)  # ds2 has no tfidf cell
    assert summary["target_met"] == {"gain_over_naive_sft": True, "beats_tfidf_mean": False}
    grid = study["datasets"]["ds1"]["grid"]
    assert grid["axis"] == ["naive", "numeric"] and grid["accuracy"] == [[0.6, 0.3], [None, None]]
    text = report.render_markdown(study)
    # no dataset has a zero-shot perplexity cell: its column is left out; ds2 has no tfidf: "-"
    assert "| ds1 | 80.0 / 70.0 | 20.0 / 10.0 | 60.0 / 50.0 | 70.0 / 60.0 | +10.0 |" in text
    assert "| ds2 | - / - | - / - | 50.0 / 40.0 | 55.0 / 45.0 | +5.0 |" in text and "zero-shot (perplexity)" not in text
    assert "+7.50" in text and "NOT met" in text and "cpu_count" not in text
    assert "median gain +7.5 points, range +5.0 to +10.0, GenCLS++ ahead on 2 of 2 datasets" in text
    assert report.plot_heatmap(grid, tmp_path / "h.png", "t").stat().st_size > 0
    assert report.plot_headline(study, tmp_path / "b.png").stat().st_size > 0
    assert report.plot_heatmap({"axis": []}, tmp_path / "none.png", "t") is None


def test_cli_registers_study_command():
    from cli import study as cli_study

    parser = argparse.ArgumentParser()
    cli_study.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["study", "--datasets", "trec6", "r8", "--profile", "gpu", "--runner", "dask",
                              "--dask-address", "tcp://h:8786", "--cells", "all", "--set", "test_size=50",
                              "--set", "sft.max_steps=3"])
    assert args.datasets == ["trec6", "r8"] and args.cells == "all" and args.dask_address == "tcp://h:8786"
    assert args.func is cli_study.run_study
    assert cli_study.parse_settings(args.overrides) == {"test_size": 50, "sft.max_steps": "3"}


def test_texts_cut_once_and_prompt_budgets_never_cut_them_again(tiny_model_dir):
    from components.model.models import load_tokenizer
    from components.model.prompts import PromptBuilder, Strategy, instruction_tokens
    from components.study.prepare import fit_prompt_budgets, truncate_texts

    short = {"spam": "unwanted", "ham": "wanted"}
    long = {f"comp.sys.group{i}.hardware.misc": f"posts about hardware {i}" for i in range(20)}
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [{"id": str(i), "text": "spam " * (2 + 10 * i), "label": "ham"} for i in range(6)]
    cut, n_cut = truncate_texts(rows, tokenizer, 24)
    assert n_cut == sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) > 24 for r in rows) > 0
    fits = [len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) <= 24 for r in rows]
    assert [c is r for c, r in zip(cut, rows)] == fits  # texts that fit are kept as they are
    assert all(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) <= 24 + 4 for r in cut)
    budgets = {}
    for labels in (short, long):
        settings = {"text_tokens": 24, "icl_k": 2, "sft": {}, "rl": {}, "eval": {"batch_size": 4}}
        budget = fit_prompt_budgets(settings, tokenizer, labels)
        assert [settings[p]["max_prompt_tokens"] for p in ("sft", "rl", "eval")] == [budget] * 3
        assert budget > instruction_tokens(tokenizer, labels, Strategy.parse("definitions,uncertain")) + 24
        budgets[len(labels)] = budget
        # every strategy keeps the whole (already cut) text and both demonstrations
        for spec in ("naive", "definitions,uncertain,numeric", "icl=random,k=2,definitions,uncertain"):
            pool = [{**r, "label": list(labels)[i % len(labels)]} for i, r in enumerate(cut)]
            builder = PromptBuilder(tokenizer, labels, Strategy.parse(spec), train_examples=pool, max_prompt_tokens=budget)
            for row in pool:
                builder.messages(row)
                assert len(builder.demos(row)) == (2 if "icl" in spec else 0)
            assert builder.truncated == 0, spec
    assert budgets[20] > budgets[2] + 100  # long label lists raise the budget, not cut the text


def test_task_runner_by_flag():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.study import make_task_runner

    local = make_task_runner("local")
    assert isinstance(local, ThreadPoolTaskRunner) and local._max_workers == 1
    assert isinstance(make_task_runner("dask", "tcp://h:8786"), DaskTaskRunner)
    local_cluster = make_task_runner("dask", workers=2)
    assert local_cluster.cluster_kwargs["host"] == "127.0.0.1"  # scheduler, workers and dashboard: loopback only
    assert local_cluster.cluster_kwargs["dashboard_address"].startswith("127.0.0.1:")
    with pytest.raises(ValueError, match="local, dask"):
        make_task_runner("ray")


# ----------------------------------------------------------------------------- the flow
@pytest.fixture()
def project(tmp_path, monkeypatch):
    import torch

    from components.ops import tracking

    threads = torch.get_num_threads()  # the flow sets 1 thread per task (tiny model: no oversubscription)

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    for name in ("tinya", "tinyb"):
        write_dataset(tmp_path / "data", name)
    yield tmp_path
    torch.set_num_threads(threads)


def tiny_settings() -> dict:
    """Study settings + training configs that make every cell take seconds on the tiny model."""
    return {"train_size": 0, "val_size": 6, "test_size": 6, "eval.batch_size": 12, "icl_k": 1,
            "sft.eval_size": 0, "sft.batch_size": 4, "sft.max_steps": 1, "sft.save_steps": 10, "sft.logging_steps": 1,
            "sft.uncertain_max_scored": 8, "rl.eval_size": 0, "rl.num_generations": 2, "rl.batch_size": 2,
            "rl.max_steps": 1, "rl.max_completion_length": 4, "rl.save_steps": 10,
            "reasoning_rl.max_completion_length": 8}


def fast_retriever(monkeypatch, root):
    """Semantic demos by hashed bag of words instead of loading MiniLM in every evaluation (in-process only)."""
    from components.model import retrieval

    fake = root / "minilm"
    fake.mkdir(exist_ok=True)
    (fake / "config.json").write_text("{}")
    monkeypatch.setattr(retrieval, "minilm_path", lambda: fake)
    monkeypatch.setattr(retrieval, "sentence_transformer_encoder", lambda path, batch_size=64: retrieval.hashed_bow_encode)


def _cell_runs(client):
    exp = client.get_experiment_by_name("gencls-study")
    runs = client.search_runs([exp.experiment_id], "tags.`study.kind` = 'cell'", max_results=1000)
    return runs


def test_study_all_cells_resumes_after_fault_and_report_matches_mlflow(prefect_harness, project, tiny_model_dir,
                                                                       monkeypatch):
    import components.train.sft
    import flows.study as F
    from components.ops import registry, tracking
    from components.study import measure

    monkeypatch.setattr(components.train.sft, "require_valid_data", lambda *a, **k: None)  # speed: GX runs in its own tests
    fast_retriever(monkeypatch, project)
    calls = {"eval": [], "train": 0}
    real_eval, real_sft = measure.evaluate_cell, components.train.sft.train_sft

    def faulty_eval(ctx, cell, out, **kw):
        calls["eval"].append((ctx["dataset"], cell.name))
        if os.environ.get("STUDY_FAULT") == f"{ctx['dataset']}|{cell.name}":
            raise RuntimeError("injected fault")
        return real_eval(ctx, cell, out, **kw)

    def counting_sft(*a, **k):
        calls["train"] += 1
        return real_sft(*a, **k)

    monkeypatch.setattr(measure, "evaluate_cell", faulty_eval)
    monkeypatch.setattr(components.train.sft, "train_sft", counting_sft)
    fault = "tinyb|sft[numeric] -> naive"
    monkeypatch.setenv("STUDY_FAULT", fault)
    state = F.study(["tinya", "tinyb"], "cpu", "local", "all", str(tiny_model_dir), overrides=tiny_settings(),
                    torch_threads=1, return_state=True)
    assert state.is_failed() and "injected fault" in str(state.message)
    client = tracking.client()
    first = {r.data.tags["study.cell_key"]: r for r in _cell_runs(client)}
    finished = {k: r.info.run_id for k, r in first.items() if r.info.status == "FINISHED"}
    assert [r.data.tags["study.cell"] for r in first.values() if r.info.status == "FAILED"] == ["sft[numeric] -> naive"]
    partial = json.loads((project / "reports" / "study.json").read_text())
    assert partial["meta"]["failed"]  # the report of the failed run says so

    # re-run without the fault: only the failed cell is measured again, nothing is retrained
    monkeypatch.delenv("STUDY_FAULT")
    calls.update(eval=[], train=0)
    study = F.study(["tinya", "tinyb"], "cpu", "local", "all", str(tiny_model_dir), overrides=tiny_settings(),
                    torch_threads=1)
    assert calls["eval"] == [("tinyb", "sft[numeric] -> naive")] and calls["train"] == 0
    runs = _cell_runs(client)
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len({r.data.tags["study.cell_key"] for r in done}) == len(done)  # one FINISHED run per cell
    assert all(r.info.run_id == finished[r.data.tags["study.cell_key"]] for r in done
               if r.data.tags["study.cell_key"] in finished)

    # every configuration is filled, for both datasets
    on_disk = json.loads((project / "reports" / "study.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(study["summary"]))
    for name in ("tinya", "tinyb"):
        ds = on_disk["datasets"][name]
        assert all(ds["headline"][role] for role, _ in report.HEADLINE_ROWS), name
        assert all(ds["best_variants"].values())
        assert len(ds["grid"]["axis"]) == len(plan.INTERPLAY)
        assert all(v is not None for row in ds["grid"]["accuracy"] for v in row)
        assert len(ds["single_dims"]) == 3 * len(plan.TRAIN_DIMS) + len(plan.INFER_ONLY_DIMS)
        assert ds["best"]["source"] == "validation"
        assert {k: ds["subsample"]["sizes"][k] for k in ("trained", "val", "test")} == {"trained": 42, "val": 6, "test": 6}
        assert (project / "reports" / "study" / name / "interplay.png").is_file()
        assert ds["register"]["model"] == f"gencls-{name}"
        assert registry.current_champion(name) is not None
    assert on_disk["summary"]["mean_gain_over_naive_sft_points"] is not None
    assert (project / "reports" / "study" / "headline.png").is_file()

    # the report tables match the MLflow metrics of each cell run
    by_key = {r.data.tags["study.cell_key"]: r for r in done}
    md = (project / "reports" / "study.md").read_text()
    for name, ds in on_disk["datasets"].items():
        for cell in ds["cells"]:
            metrics = by_key[cell["key"]].data.metrics
            assert metrics["accuracy"] == pytest.approx(cell["accuracy"])
            assert metrics["macro_f1"] == pytest.approx(cell["macro_f1"])
            assert f"`{cell['key']}` | {100 * cell['accuracy']:.1f} |" in md
    study_run = client.get_run(on_disk["meta"]["study_run_id"])
    assert all(r.data.tags["mlflow.parentRunId"] == study_run.info.run_id for r in done)
    assert study_run.data.metrics["tinya/gencls/accuracy"] == pytest.approx(
        on_disk["datasets"]["tinya"]["headline"]["gencls"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(study_run.info.run_id)}
    assert {"study.json", "study.md", "plots"} <= artifacts


def test_two_cells_on_a_local_dask_cluster(prefect_harness, project, tiny_model_dir):
    from components.ops import tracking
    from flows.study import study

    out = study(["tinya"], "cpu", "dask", "headline", str(tiny_model_dir), workers=2, overrides=tiny_settings(),
                only=["tfidf"], register_model=False)  # role prefix: tfidf and tfidf_all
    cells = out["datasets"]["tinya"]["cells"]
    assert sorted(c["kind"] for c in cells) == ["tfidf", "tfidf_all"]
    assert all(c["worker"].rsplit(":", 1)[1] != str(os.getpid()) for c in cells)  # ran in Dask worker processes
    exp = tracking.client().get_experiment_by_name("gencls-study")
    runs = tracking.client().search_runs([exp.experiment_id], "tags.`study.kind` = 'cell'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
