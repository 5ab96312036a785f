"""The GenCLS++ study: cell grid, best-combination rule, subsampling, report; the flow end to end,
resume after a fault, report vs MLflow, and two cells on a local Dask cluster (tiny model, tiny data)."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import yaml

from components.study import plan, plots, prepare, report

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


def _cell(key, roles, train, infer, correct, rl=False, kind="trained", n=100):
    """A cell file: `correct` of n test examples right (the first ones), the rest predicted "b" for gold "a"."""
    preds = [[str(i), "a", "a" if i < correct else "b"] for i in range(n)]
    result = {"key": key, "name": key, "roles": roles, "kind": kind, "train": train, "infer": infer, "rl": rl,
              "accuracy": correct / n, "macro_f1": 0.0, "invalid_rate": 0.0, "run_id": f"run-{key}"}
    return {"result": result, "predictions": {"test": preds}}


def test_aggregate_markdown_and_plots(tmp_path):
    from components.study import markdown

    recipe = {"train": "definitions", "infer": "definitions", "source": "validation", "gains": {}, "rule": "r",
              "per_dataset": {}, "confirmation": None}
    ds1 = [_cell("a", ["tfidf"], "-", "-", 80, kind="tfidf"), _cell("b", ["zeroshot"], "-", "naive", 20, kind="zeroshot"),
           _cell("c", ["naive_sft", "grid:naive|naive"], "naive", "naive", 60),
           _cell("d", ["grid:naive|numeric", "dim:numeric:inference"], "naive", "numeric", 30),
           _cell("e", [], "definitions", "definitions", 70, rl=True),  # recipe + RL: the gencls role comes from the recipe
           _cell("f", ["gencls"], "numeric", "numeric", 99, rl=True),  # an old recipe's cell: its stored role is ignored
           _cell("r", [], "definitions,reasoning", "definitions,reasoning", 65, rl=True)]  # the recipe + <think>
    ds2 = [_cell("g", ["naive_sft"], "naive", "naive", 50), _cell("h", [], "definitions", "definitions", 55, rl=True),
           _cell("i", [], "definitions", "definitions", 52),
           # measured by an ablation run: it is also the headline's naive SFT + perplexity (roles follow the cell)
           _cell("j", ["dim:decoding=perplexity:inference"], "naive", "decoding=perplexity", 51)]
    training = {"naive sft": {"kind": "sft", "train": "naive", "global_step": 4, "seconds": 60,
                              "loss_history": [{"step": s, "loss": 2.0 / s} for s in range(1, 5)],
                              "eval_history": [{"step": 2, "accuracy": 0.5}, {"step": 4, "accuracy": 0.6}],
                              "best": {"step": 4}},
                "definitions rl": {"kind": "rl", "train": "definitions", "global_step": 2, "seconds": 9,
                                   "train_history": [{"step": 1, "reward": 0.25, "zero_variance_groups": 0.5},
                                                     {"step": 2, "reward": 0.5, "zero_variance_groups": 0.0}],
                                   "eval_history": [{"step": 0, "accuracy": 0.6, "macro_f1": 0.5},
                                                    {"step": 2, "accuracy": 0.65, "macro_f1": 0.55}],
                                   "best": {"step": 2}}}
    study = report.aggregate({"ds1": {"cells": ds1, "labels": ["a", "b"], "record": {"training": training}},
                              "ds2": {"cells": ds2, "labels": ["a", "b"], "record": {}}},
                             {"profile": "cpu", "model": MODEL, "machine": report.machine_info()}, recipe)
    d1, d2 = study["datasets"]["ds1"], study["datasets"]["ds2"]
    assert d1["headline"]["gencls"]["key"] == "e" and d2["headline"]["gencls"]["key"] == "h"
    assert d2["headline"]["best_sft"]["key"] == "i" and d1["headline"]["best_sft"] is None
    assert d2["headline"]["naive_sft_perplexity"]["key"] == "j"
    assert [(r["dimension"], r["key"]) for r in d2["single_dims"]] == [("definitions", "i"), ("decoding=perplexity", "j")]
    gain = d1["headline"]["gencls"]["vs_naive_sft"]["accuracy"]
    assert gain["diff"] == pytest.approx(0.10) and 0 < gain["low"] <= gain["diff"] <= gain["high"]  # paired: 10 flips
    assert d1["headline"]["naive_sft"]["vs_naive_sft"] is None
    assert d1["single_dims"][0]["vs_naive_sft"]["accuracy"]["diff"] == pytest.approx(-0.30)
    assert d2["rl_vs_sft"]["accuracy"]["diff"] == pytest.approx(0.03) and d1["rl_vs_sft"] is None
    rl = study["summary"]["rl_vs_sft"]  # RL on its own, pooled: only ds2 has both SFT and SFT + RL of the recipe
    assert rl["datasets"] == ["ds2"] and rl["accuracy"]["diff"] == pytest.approx(0.03)
    assert rl["runs"] == {"ds1": {"steps": 2, "kept_step": 2, "zero_variance": 0.25}, "ds2": None}  # ds2: no record
    rows = study["summary"]["rows"]
    assert rows["gencls"]["mean_accuracy"] == pytest.approx(0.625) and rows["gencls"]["datasets"] == 2
    assert rows["gencls"]["vs_naive_sft"]["accuracy"]["diff"] == pytest.approx(0.075)
    assert rows["tfidf"]["datasets"] == 1 and rows["minilm"]["datasets"] == 0
    verdict = study["summary"]["verdict"]
    assert verdict["gain_points"] == pytest.approx(7.5) and verdict["datasets"] == 2 and not verdict["complete"]
    assert verdict["beats_tfidf_same_n"] == {"ds1": False} and verdict["beats_tfidf_met"] is False
    assert verdict["naive_rising"] == {"ds1": 10.0} and verdict["shared_adapter"] is False  # recipe trains definitions
    assert report.verdict(study["datasets"], rows, recipe_train="naive")["shared_adapter"] is True
    assert verdict["naive_weak"] == {"ds1": [0.6, 0.8]}  # 20 points under TF-IDF on the same N
    assert d1["reasoning"]["key"] == "r" and d1["reasoning_vs_direct"]["accuracy"]["diff"] == pytest.approx(-0.05)
    pooled_think = study["summary"]["reasoning_vs_direct"]
    assert pooled_think["datasets"] == ["ds1"] and pooled_think["accuracy"]["diff"] == pytest.approx(-0.05)
    grid = d1["grid"]
    assert grid["axis"] == ["naive", "numeric"] and grid["accuracy"] == [[0.6, 0.3], [None, None]]
    pooled = {(r["dimension"], r["on_at"]): r for r in study["summary"]["ablation"]}
    assert pooled[("numeric", "inference")]["datasets"] == ["ds1"]
    assert pooled[("numeric", "inference")]["vs_naive_sft"]["accuracy"]["diff"] == pytest.approx(-0.30)
    assert pooled[("definitions", "both")]["datasets"] == ["ds2"]
    assert study["summary"]["grid_mean"] == {"axis": [], "datasets": 0}  # ds1's grid is incomplete: no mean grid
    full = {"axis": ["naive", "numeric"], "accuracy": [[0.6, 0.2], [0.1, 0.8]], "macro_f1": [[0.5, 0.2], [0.1, 0.7]]}
    twice = report.mean_grid([full, {**full, "accuracy": [[0.8, 0.4], [0.3, 0.6]]}, grid])
    assert twice["datasets"] == 2 and [v for row in twice["accuracy"] for v in row] == pytest.approx([0.7, 0.3, 0.2, 0.7])
    text = markdown.render_markdown(study)
    assert "| GenCLS++ SFT + RL | 70.0 / 0.0<br>+10.0 [" in text and "INCOMPLETE" in text and "NOT met" in text
    assert "| numeric | inference | ds1 | -30.0 [" in text  # the ablation pooled over datasets
    assert "## RL on its own" in text and "ds1 2 of 2 (25%), ds2 - of -" in text
    assert "Mean over 1 datasets: accuracy +3.0 [" in text and "kept step 0 on all" not in text
    stayed = {**rl, "runs": {"ds1": {**rl["runs"]["ds1"], "kept_step": 0}, "ds2": None}}
    assert "GRPO kept step 0 on all 1 datasets with a record: at this budget RL does not help" in "\n".join(
        markdown._rl(stayed))
    assert "RL hurts" in "\n".join(markdown._rl({**rl, "accuracy": {"diff": -0.1, "low": -0.2, "high": -0.05}}))
    assert markdown._rl(None) == []
    assert "## Reasoning vs direct answer" in text and "mean over 1 datasets: -5.0 [" in text and "ds1 65.0 vs 70.0" in text
    assert "| naive sft | 4 | 1.0 | " in text and "| MiniLM + LR" not in text  # never measured: no row
    assert plots.plot_heatmap(grid, tmp_path / "h.png", "t").stat().st_size > 0
    assert plots.plot_headline(study, tmp_path / "b.png").stat().st_size > 0
    assert plots.plot_learning(training, tmp_path / "l.png", "t").stat().st_size > 0
    assert plots.plot_rl(training, tmp_path / "rl.png", "t").stat().st_size > 0
    assert plots.plot_rl({"naive sft": training["naive sft"]}, tmp_path / "none.png", "t") is None
    assert "| definitions rl | 2 | 0.1 | - | 0: 60.0, 2: 65.0 | 2 | 0.25 -> 0.50, 25% |" in text
    assert "`study/plots/ds1-rl.png`" in text
    assert "Not converged at the budget's end" in text and "naive sft (+10.0)" in text  # 50 -> 60 at the last step
    assert "still rising at the budget's end on ds1 (+10.0)" in text and "competent baseline" in text and "(60.0 vs 80.0)" in text
    assert "still rising at the budget's end on ds1 (+10.0)" in text and "GenCLS++ SFT is the naive SFT adapter" not in text
    shared = markdown.render_markdown({**study, "summary": {**study["summary"], "verdict": {**verdict, "shared_adapter": True}}})
    assert "GenCLS++ SFT is the naive SFT adapter" in shared
    assert report.last_gain([{"accuracy": 0.9}, {"accuracy": 0.8}]) == pytest.approx(-0.1)
    assert report.last_gain([{"accuracy": 0.9}]) is None
    assert report.still_rising([{"accuracy": 0.9}, {"accuracy": 0.905}]) is None  # half a point: not flagged
    assert plots.plot_heatmap({"axis": []}, tmp_path / "none.png", "t") is None


def test_convergence_check_compares_naive_sft_under_two_budget_rules():
    """cpu vs cpu-long: naive SFT's test difference with its interval, GenCLS++ SFT (the recipe without RL) under
    the longer rule, TF-IDF, the steps each rule ran; only datasets measured under both; one study.md section."""
    from components.study import convergence, markdown
    from flows.study_report import report_paths

    def info(naive, gencls, steps, max_steps, stopped):
        cells = [_cell("n", ["naive_sft"], "naive", "naive", naive), _cell("t", ["tfidf"], "-", "-", 70, kind="tfidf"),
                 _cell("p", [], "naive", "decoding=perplexity", gencls)]
        history = [{"step": s, "accuracy": a, "macro_f1": a} for s, a in ((2, 0.5), (steps - 2, 0.7), (steps, 0.6))]
        training = {"naive sft": {"kind": "sft", "global_step": steps, "max_steps": max_steps, "stopped_early": stopped,
                                  "best": {"step": steps - 2}, "eval_history": history, "seconds": 60}}
        return {"cells": cells, "labels": ["a", "b"], "record": {"training": training}}

    main, longer = {"ds": info(60, 61, 4, 4, False), "main-only": info(50, 50, 4, 4, False)}, {"ds": info(75, 80, 8, 12, True)}
    longer["ds"]["cells"].append(_cell("r", [], "naive", "decoding=perplexity", 72, rl=True))  # SFT + RL: 3 fewer right
    out = convergence.compare(main, longer, {"train": "naive", "infer": "decoding=perplexity"}, "cpu-long",
                              {"epochs": 6.0, "patience": 3, "min_epochs": 2.0, "eval_every_steps": 63, "learning_rate": 1})
    assert list(out["datasets"]) == ["ds"]
    assert out["rule"] == {"epochs": 6.0, "patience": 3, "min_epochs": 2.0, "eval_every_steps": 63}
    row = out["datasets"]["ds"]
    assert row["longer_vs_main"]["accuracy"]["diff"] == pytest.approx(0.15)
    assert row["longer_vs_main"]["accuracy"]["low"] > 0  # 15 of 100 examples turned right, none wrong
    assert row["gencls_sft_vs_naive"]["accuracy"]["diff"] == pytest.approx(0.05)
    assert row["tfidf"]["accuracy"] == 0.7 and row["gencls_sft"]["accuracy"] == 0.8
    assert row["longer"]["budget"]["steps"] == 8 and row["longer"]["budget"]["stopped_early"] is True
    assert out["mean"]["accuracy"]["diff"] == pytest.approx(0.15)
    assert row["gencls"]["accuracy"] == 0.72 and row["gencls_vs_naive"]["accuracy"]["diff"] == pytest.approx(-0.03)
    assert out["gencls_mean"]["datasets"] == 1 and out["gencls_mean"]["accuracy"]["diff"] == pytest.approx(-0.03)
    text = "\n".join(markdown._longer_budget(out, "cpu"))
    assert "minus naive SFT under the longer rule (the headline's comparison with a converged baseline): ds 72.0 " \
           "vs 75.0, -3.0 [" in text and "; mean over 1 dataset(s) -3.0 [" in text
    assert ("up to 6.0 epochs, held-out evaluation every 63 steps, stopped once 3 evaluations in a row after the first "
            "2.0 epochs") in text
    assert "| ds | 60.0 / 0.0 (4 of 4; kept 2) | 75.0 / 0.0 (8 of 12, stopped early; kept 6) | +15.0 [" in text
    assert "| 80.0 | +5.0 [" in text and "ds 2: 50.0, 6: 70.0, 8: 60.0" in text
    assert "- Better under the longer rule (test accuracy interval above zero): ds." in text
    assert "vs TF-IDF + LR on the same N (point estimates): ds at or above." in text
    # a dataset whose two profiles measured different test examples is named, not compared
    other = info(75, 80, 8, 12, True)
    other["cells"][0]["predictions"]["test"] = [[f"x{i}", "a", "a"] for i in range(100)]
    skipped = convergence.compare(main, {"ds": other}, {"train": "naive", "infer": "decoding=perplexity"}, "cpu-long")
    assert not skipped["datasets"] and "ids differ" in skipped["skipped"]["ds"] and skipped["mean"] is None
    assert "- Not compared: ds (cells measured on different examples" in "\n".join(markdown._longer_budget(skipped, "cpu"))
    assert markdown._longer_budget({"datasets": {}}, "cpu") == [] and markdown._longer_budget(None, "cpu") == []
    # the longer profile's own report never overwrites the main one
    assert [p.name for p in report_paths("cpu")] == ["study.json", "study.md", "plots"]
    assert [p.name for p in report_paths("cpu-long")] == ["study-cpu-long.json", "study-cpu-long.md", "plots-cpu-long"]


def _vals(gains, base=0.5, combo=None):
    rows = [_val("naive", "naive", base)]
    specs = {"definitions": "definitions", "uncertain": "uncertain", "numeric": "numeric",
             "icl=random": "icl=random,k=2", "icl=semantic": "icl=semantic,k=2"}
    for title, spec in specs.items():
        rows.append(_val(spec, spec, base + gains[title]))
    rows.append(_val("naive", "decoding=perplexity", base + gains["decoding=perplexity"]))
    if combo:
        rows.append(_val(*combo))
    return rows


def test_recipe_pools_validation_gains_over_ablation_datasets_and_is_confirmed():
    g1 = {"definitions": 0.04, "uncertain": -0.01, "numeric": -0.05, "icl=random": 0.02, "icl=semantic": 0.01,
          "decoding=perplexity": 0.02}
    g2 = {"definitions": -0.02, "uncertain": 0.03, "numeric": -0.01, "icl=random": -0.03, "icl=semantic": 0.02,
          "decoding=perplexity": 0.01}
    partial = [_val("naive", "naive", 0.5), _val("numeric", "numeric", 0.9)]  # no complete ablation: not a voter
    recipe = plan.select_recipe({"d1": _vals(g1), "d2": _vals(g2), "d3": partial}, k=2)
    assert recipe["source"] == "validation" and recipe["datasets"] == ["d1", "d2"]
    assert recipe["gains"]["definitions"] == pytest.approx(0.01) and recipe["gains"]["uncertain"] == pytest.approx(0.01)
    # definitions (+1) and uncertain (+1) on; icl: semantic (+1.5) beats random (-0.5); perplexity (+1.5) at inference
    assert recipe["train"] == "icl=semantic,k=2,definitions,uncertain"
    assert recipe["infer"] == "icl=semantic,k=2,definitions,uncertain,decoding=perplexity"
    assert recipe["confirmation"]["kept"] == "combination (not yet confirmed)"
    combo = (recipe["train"], recipe["infer"])
    worse = plan.select_recipe({"d1": _vals(g1, combo=(*combo, 0.49)), "d2": _vals(g2, combo=(*combo, 0.50))}, k=2)
    assert (worse["train"], worse["infer"]) == ("icl=semantic,k=2", "icl=semantic,k=2")  # best single (+1.5; first)
    assert worse["confirmation"]["kept"] == "best single dimension"
    better = plan.select_recipe({"d1": _vals(g1, combo=(*combo, 0.58)), "d2": _vals(g2, combo=(*combo, 0.55))}, k=2)
    assert (better["train"], better["infer"]) == combo and better["confirmation"]["kept"] == "combination"
    assert plan.select_recipe({"d3": partial}, k=2)["source"] == "default"


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

    def counting_sft(dataset, *a, **k):
        # a study killed now must already have every earlier adapter's learning curve in the committed record
        record = project / "reports" / "study" / "cells" / "cpu" / dataset / "dataset.json"
        trained = calls.setdefault(dataset, 0)
        assert sum(key.endswith(" sft") for key in json.loads(record.read_text())["training"]) >= trained
        calls["train"] += 1
        calls[dataset] += 1
        return real_sft(dataset, *a, **k)

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

    # every configuration is filled, for both datasets, from the committed cell files
    on_disk = json.loads((project / "reports" / "study.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(study["summary"]))
    assert on_disk["recipe"]["source"] == "validation" and on_disk["recipe"]["datasets"] == ["tinya", "tinyb"]
    plot_dir = project / "reports" / "study" / "plots"
    for name in ("tinya", "tinyb"):
        ds = on_disk["datasets"][name]
        assert all(ds["headline"][role] for role, _ in report.HEADLINE_ROWS), name
        assert all(ds["headline"][role]["vs_naive_sft"] for role, _ in report.HEADLINE_ROWS if role != "naive_sft")
        assert ds["rl_vs_sft"] and ds["reasoning_vs_direct"] and ds["reasoning"]
        assert (ds["headline"]["gencls"]["train"], ds["headline"]["gencls"]["infer"]) == \
            (on_disk["recipe"]["train"], on_disk["recipe"]["infer"])
        assert len(ds["grid"]["axis"]) == len(plan.INTERPLAY)
        assert all(v is not None for row in ds["grid"]["accuracy"] for v in row)
        assert len(ds["single_dims"]) == 3 * len(plan.TRAIN_DIMS) + len(plan.INFER_ONLY_DIMS)
        assert {k: ds["subsample"]["sizes"][k] for k in ("trained", "val", "test")} == {"trained": 42, "val": 6, "test": 6}
        assert {"naive sft", f"{on_disk['recipe']['train']} rl"} <= set(ds["training"])
        assert (plot_dir / f"{name}-interplay.png").is_file() and (plot_dir / f"{name}-learning.png").is_file()
        assert ds["register"]["model"] == f"gencls-{name}"
        assert registry.current_champion(name) is not None
        # each cell file holds the test predictions its accuracy was computed from
        for path in (project / "reports" / "study" / "cells" / "cpu" / name).glob("*.json"):
            if path.name in ("dataset.json", "recipe.json"):
                continue
            cell = json.loads(path.read_text())
            rows = cell["predictions"]["test"]
            assert len(rows) == 6 and cell["result"]["accuracy"] == pytest.approx(
                sum(g == p for _, g, p in rows) / len(rows))
    assert on_disk["summary"]["rows"]["gencls"]["vs_naive_sft"]["datasets"] == 2
    assert (plot_dir / "headline.png").is_file()
    # the report is rebuilt from the committed cell files alone: same numbers, same intervals
    from flows.study_report import rebuild_report

    (project / "reports" / "study.json").unlink()
    assert rebuild_report("cpu")["summary"] == on_disk["summary"]
    import platform

    assert on_disk["machines"] == {platform.platform(): ["tinya", "tinyb"]}  # every cell says where it was measured

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

    # a new RL budget re-trains the RL adapters and re-measures the RL cells only: every SFT adapter and every
    # other cell (and the recipe's validation results of the dataset not in this run) are reused
    import components.train.rl

    real_rl = components.train.rl.train_rl

    def counting_rl(dataset, *a, **k):
        calls["rl"] = calls.get("rl", 0) + 1
        return real_rl(dataset, *a, **k)

    monkeypatch.setattr(components.train.rl, "train_rl", counting_rl)
    calls.update(eval=[], train=0)
    again = F.study(["tinya"], "cpu", "local", "all", str(tiny_model_dir),
                    overrides={**tiny_settings(), "rl.max_steps": 2}, torch_threads=1)
    rl_cells = sorted(c["name"] for c in on_disk["datasets"]["tinya"]["cells"] if c["rl"])
    assert calls["train"] == 0 and calls["rl"] == len(rl_cells) == 2  # GenCLS++ and reasoning, each its own adapter
    assert sorted(name for _, name in calls["eval"]) == rl_cells
    assert again["recipe"]["datasets"] == ["tinya", "tinyb"]
    cells = again["datasets"]["tinya"]["cells"]
    assert len(cells) == len(on_disk["datasets"]["tinya"]["cells"])  # the old-budget RL cells are not reported
    assert {c["key"] for c in cells if not c["rl"]} == {c["key"] for c in on_disk["datasets"]["tinya"]["cells"]
                                                         if not c["rl"]}
    steps = {k: v["global_step"] for k, v in again["datasets"]["tinya"]["training"].items() if k.endswith(" rl")}
    assert steps and set(steps.values()) == {2}


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


def test_a_second_study_of_the_same_dataset_stops_with_one_line(tmp_path, monkeypatch):
    from flows.study import dataset_lock

    monkeypatch.setenv("GENCLS_ROOT", str(tmp_path))
    first = dataset_lock("cpu", "trec6")
    with pytest.raises(RuntimeError, match="another `gencls study` is running on trec6"):
        dataset_lock("cpu", "trec6")
    dataset_lock("cpu", "r8").release()  # other datasets are free
    first.release()
    dataset_lock("cpu", "trec6").release()  # free again once the first study ended


def test_cut_copies_are_dropped_as_the_build_drops_whole_copies():
    """Texts that begin alike become copies once cut (r8 headlines): one kept per split, none shared with train."""
    from components.study.prepare import drop_cut_duplicates

    train = [{"id": "a", "text": "Same headline ...", "label": "x"}, {"id": "b", "text": "Same  headline ...", "label": "y"},
             {"id": "c", "text": "other", "label": "x"}]
    test = [{"id": "t1", "text": "other", "label": "x"}, {"id": "t2", "text": "new", "label": "y"},
            {"id": "t3", "text": "new", "label": "y"}]
    kept_train, kept_test, dropped = drop_cut_duplicates(train, test)
    assert [r["id"] for r in kept_train] == ["a", "c"] and [r["id"] for r in kept_test] == ["t2"]
    assert dropped == {"train": 1, "test": 2}
    assert drop_cut_duplicates(kept_train, kept_test)[2] == {"train": 0, "test": 0}


def test_the_pipeline_trains_and_decodes_the_recipe_the_study_chose():
    """`make run`, `gencls retrain` and the deployment read conf/params.yaml: it must hold the recipe that
    reports/study/cells/cpu/recipe.json chose on validation (update params.yaml when the study moves it)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    recipe = json.loads((root / "reports/study/cells/cpu/recipe.json").read_text())
    if recipe.get("source") != "validation":
        pytest.skip("the study has not chosen a recipe on validation yet")
    params = yaml.safe_load((root / "conf/params.yaml").read_text())
    k = recipe.get("k")
    assert plan.canonical(params["sft"]["train_strategy"], k) == plan.canonical(recipe["train"], k)
    assert plan.canonical(params["evaluate"]["strategy"], k) == plan.canonical(recipe["infer"], k)


def test_recipe_section_says_when_a_switched_on_dimension_is_within_noise():
    """A dimension the rule switches on by less than two validation examples is flagged as noise."""
    from components.study import markdown

    gains = {"decoding=perplexity": 0.0025, "definitions": -0.03}
    recipe = {"source": "validation", "train": "naive", "infer": "decoding=perplexity", "rule": "r", "gains": gains,
              "per_dataset": {"a": gains}}
    assert "decoding=perplexity (+0.25): the rule's choice, within noise" in "\n".join(markdown._recipe(recipe, 200))
    strong = dict(recipe, gains={**gains, "decoding=perplexity": 0.05}, per_dataset={"a": gains})
    text = "\n".join(markdown._recipe(strong, 200))
    assert "One validation example is 0.5 points" in text and "within noise" not in text


def test_cpu_long_keeps_the_cpu_studys_recipe(tmp_path, monkeypatch):
    """cpu-long changes only the SFT budget: its GenCLS++ is the recipe cpu chose on validation, never re-chosen
    from cpu-long's own (ablation-free) cells, and a missing source recipe is one clear error."""
    from pathlib import Path

    from flows import study, study_report
    from components.study import markdown

    monkeypatch.setattr(study_report, "study_root", lambda: tmp_path)
    with pytest.raises(ValueError, match="recipe_from 'cpu'.*run `gencls study --profile cpu --cells ablation`"):
        study.update_recipe("cpu-long", {})
    chosen = {"source": "validation", "train": "numeric", "infer": "decoding=perplexity", "rule": "r", "k": 2,
              "gains": {"numeric": 0.01}, "validation_results": {"x": {"rows": []}}}
    (tmp_path / "cells" / "cpu").mkdir(parents=True)
    (tmp_path / "cells" / "cpu" / "recipe.json").write_text(json.dumps(chosen))
    for recipe in (study.update_recipe("cpu-long", {}), study_report.read_recipe("cpu-long")):
        assert (recipe["train"], recipe["infer"], recipe["inherited_from"]) == ("numeric", "decoding=perplexity", "cpu")
        assert "validation_results" not in recipe
    assert not (tmp_path / "cells" / "cpu-long" / "recipe.json").exists()  # nothing chosen, nothing written
    assert "the cpu study's, chosen on its validation ablation" in "\n".join(markdown._recipe(recipe))
    assert study_report.inherited_recipe("cpu") is None  # cpu chooses its own
    with pytest.raises(ValueError, match="chosen for another model"):  # cpu chose it for other settings/model
        study_report.inherited_recipe("cpu-long", None, "smollm2-135m")
    with pytest.raises(ValueError, match="names the profile itself"):
        study_report.inherited_recipe("cpu-long", {"recipe_from": "cpu-long"})
    (tmp_path / "cells" / "cpu" / "recipe.json").unlink()
    assert study_report.read_recipe("cpu-long") is None  # a report is still written, without a recipe
    assert Path(study_report.cells_root("cpu")) == tmp_path / "cells" / "cpu"


def test_a_rebuilt_report_names_the_machines_that_measured_the_cells_not_its_own():
    from components.study import markdown, report

    def cell(machine=None):
        return {"result": {"key": "k", **({"machine": machine} if machine else {})}}

    datasets = {"a": {"cells": [cell("Linux-fc-v857"), cell("Linux-fc-v857")]}, "b": {"cells": [cell("Linux-fc-v1045")]},
                "c": {"cells": [cell()]}}
    machines = report.cell_machines(datasets)
    assert machines == {"Linux-fc-v857": ["a"], "Linux-fc-v1045": ["b"], "not recorded": ["c"]}
    text = "\n".join(markdown._machines({"machines": machines, "meta": {"rebuilt_on": {"platform": "Linux-here"}}}))
    assert "Cells measured on: Linux-fc-v857 (a); Linux-fc-v1045 (b); not recorded by older cells (c)." in text
    assert "Rebuilt from the committed cells on Linux-here, which measured nothing here." in text
    study = {**report.aggregate({}, {"notes": ["paused 75 min for benchmarks"],
                                     "rebuilt_on": {"platform": "Linux-here"}}), "machines": machines}
    md = markdown.render_markdown(study)
    assert "- Note: paused 75 min for benchmarks" in md and "Cells measured on: Linux-fc-v857 (a)" in md
