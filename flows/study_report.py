"""Where the study's results live and how its report is written (flows/study.py runs the cells).

    reports/study/cells/<profile>/<dataset>/<key>.json   one committed file per finished cell (cells_root)
    reports/study.md, study.json, study/plots/           the `cpu` profile's report (MAIN_PROFILE)
    reports/study-<profile>.md, .json, study/plots-<profile>/   any other profile's (report_paths)
    reports/study/verify-<profile>.json                  committed cells measured again (verify_path)

The main profile's report also carries the convergence check (components/study/convergence.py) when a longer
budget profile (LONGER_PROFILE) has measured naive SFT on some of its datasets.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from components.config import reports_dir
from components.ops import tracking
from components.study import convergence, markdown, measure, plots as figures, prepare, report
from components.study.adopt import REPLACED, STAGED

MAIN_PROFILE = "cpu"  # `gencls study`'s default profile: its report is reports/study.md
LONGER_PROFILE = "cpu-long"  # the main profile under a longer SFT budget rule (conf/params.yaml)
RECIPE_FILE = "recipe.json"


def study_root() -> Path:
    """reports/study/ (cell results, dataset views, plots)."""
    return reports_dir() / "study"


def cells_root(profile: str) -> Path:
    """reports/study/cells/<profile>/: one committed JSON per finished cell (result + predictions)."""
    return study_root() / "cells" / profile


def verify_path(profile: str) -> Path:
    """reports/study/verify-<profile>.json: the committed cells measured again (flows/study_verify.py)."""
    return study_root() / f"verify-{profile}.json"


def report_paths(profile: str) -> tuple[Path, Path, Path]:
    """(study.json, study.md, plots folder) of a profile's report: reports/study.* for the main profile,
    reports/study-<profile>.* for any other, so that a second profile never overwrites the main report."""
    stem, plots = ("study", "plots") if profile == MAIN_PROFILE else (f"study-{profile}", f"plots-{profile}")
    return reports_dir() / f"{stem}.json", reports_dir() / f"{stem}.md", study_root() / plots


def read_datasets(profile: str) -> dict[str, dict]:
    """{dataset: its record and cell files} of every dataset with a record under cells_root(profile)."""
    root = cells_root(profile)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith((STAGED, REPLACED))) \
        if root.is_dir() else []  # not the folders of an interrupted adoption
    return {folder.name: info for folder in folders if (info := measure.read_dataset(folder)) is not None}


def read_recipe(profile: str) -> dict | None:
    """The profile's recipe (chosen on validation), without the validation rows it was chosen from; for a profile
    with `recipe_from`, the source study's (None while that study has none: a report can still be written)."""
    try:
        inherited = inherited_recipe(profile)
    except ValueError:
        return None
    return inherited if inherited is not None else stored_recipe(profile)


def stored_recipe(profile: str, with_validation: bool = False) -> dict | None:
    """cells/<profile>/recipe.json as the profile's own study wrote it (never follows `recipe_from`)."""
    stored = measure.read_result(cells_root(profile) / RECIPE_FILE) or {}
    return {k: v for k, v in stored.items() if with_validation or k != "validation_results"} or None


def inherited_recipe(profile: str, overrides: dict | None = None, model: str | None = None) -> dict | None:
    """The recipe of the study named by the profile's `recipe_from` (cpu-long: cpu's, chosen on cpu's validation
    ablation; cpu-long changes only the SFT budget), marked `inherited_from`; None when the profile chooses its own.

    Raises:
        ValueError: `recipe_from` names the profile itself, or a study with no recipe yet, or (with `model`) one
            chosen for another model or other study settings than the source profile's with that model.
    """
    source = prepare.profile_settings(profile, overrides).get("recipe_from")
    if not source:
        return None
    source = str(source)
    if source == profile:
        raise ValueError(f"profile {profile}: recipe_from names the profile itself")
    recipe = stored_recipe(source, with_validation=True)
    if recipe is None or recipe.get("source") != "validation":
        raise ValueError(f"profile {profile}: recipe_from {source!r}, but {cells_root(source) / RECIPE_FILE} "
                         f"holds no recipe chosen on validation yet: run `gencls study --profile {source} --cells "
                         "ablation` first")
    if model is not None:
        config = prepare.recipe_config(source, model)
        if not any(v.get("config") == config for v in (recipe.get("validation_results") or {}).values()):
            raise ValueError(f"profile {profile}: the {source} study's recipe was chosen for another model or other "
                             f"study settings than {model!r} with the {source} settings: run that study's ablation "
                             "for this model first")
    return {**{k: v for k, v in recipe.items() if k != "validation_results"}, "inherited_from": source}


def rebuild_report(profile: str) -> dict:
    """study.json, study.md and the plots from the committed cell files alone (nothing trained or measured)."""
    meta = {"profile": profile, "machine": {}, "rebuilt_from_cells": True, "rebuilt_on": report.machine_info(),
            "settings": {k: v for k, v in prepare.profile_settings(profile, None).items() if not isinstance(v, dict)},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    previous = measure.read_result(report_paths(profile)[0]) or {}
    last = previous.get("meta") or {}
    if last.get("profile") == profile:  # keep what only a run knows (model, runs, notes, the run's machine)
        ran_here = not last.get("rebuilt_from_cells") or "rebuilt_on" in last  # older rebuilds wrote their own
        meta = {**meta, **{k: v for k, v in last.items() if k not in meta or (k == "machine" and ran_here)}}
    datasets = read_datasets(profile)
    if not meta.get("model"):  # no finished run wrote this profile's report (one stopped mid-way): the cells say
        cell = next((c["result"] for info in datasets.values() for c in info.get("cells") or []), {})
        settings = next((info["record"].get("settings") or {} for info in datasets.values()), {})
        meta["model"] = cell.get("model")
        for kind in ("sft", "rl"):
            meta[f"{kind}_config_summary"] = meta.get(f"{kind}_config_summary") or report.config_summary(
                settings.get(kind) or {})
    return write_report(profile, meta, None, datasets=datasets)


def write_report(profile: str, meta: dict, run_id: str | None, recipe: dict | None = None,
                 datasets: dict[str, dict] | None = None) -> dict:
    """The profile's study.json and study.md over every dataset with a record for it (`datasets`: read_datasets,
    when the caller has already read them), plus the plots (headline bars, interplay heatmaps, learning curves;
    report_paths); all logged to MLflow when `run_id` is given."""
    json_path, md_path, plots_dir = report_paths(profile)
    meta = {**meta, "plots": plots_dir.relative_to(reports_dir()).as_posix()}
    if "notes" not in meta:  # notes on how cells were measured outlive the runs that add cells
        notes = ((measure.read_result(json_path) or {}).get("meta") or {}).get("notes")
        meta.update({"notes": notes} if notes else {})
    recipe = recipe if recipe is not None else read_recipe(profile)
    datasets = read_datasets(profile) if datasets is None else datasets
    study = report.aggregate(datasets, meta, recipe)
    verified = measure.read_result(verify_path(profile))
    if verified:
        study["verification"] = verified
    if profile == MAIN_PROFILE and cells_root(LONGER_PROFILE).is_dir():
        longer = convergence.compare(datasets, read_datasets(LONGER_PROFILE), recipe, LONGER_PROFILE)
        if longer["datasets"] or longer["skipped"]:
            study["convergence"] = longer
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(study, indent=1, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown.render_markdown(study), encoding="utf-8")
    plots = [figures.plot_headline(study, plots_dir / "headline.png"), figures.plot_heatmap(
        study["summary"]["grid_mean"], plots_dir / "interplay-mean.png", f"mean train x inference accuracy ({profile})")]
    for name, info in study["datasets"].items():
        plots.append(figures.plot_heatmap(info["grid"], plots_dir / f"{name}-interplay.png",
                                          f"{name}: train x inference accuracy ({profile})"))
        plots.append(figures.plot_learning(info["training"], plots_dir / f"{name}-learning.png",
                                           f"{name}: SFT arms ({profile})"))
        plots.append(figures.plot_rl(info["training"], plots_dir / f"{name}-rl.png", f"{name}: GRPO ({profile})"))
    if profile == LONGER_PROFILE and cells_root(MAIN_PROFILE).is_dir():  # study.md's convergence check reads these cells
        rebuild_report(MAIN_PROFILE)
    if run_id is None:  # rebuilt from the committed cells only (`gencls study --report-only`)
        return study
    tracking.log_artifact(run_id, json_path)
    tracking.log_artifact(run_id, md_path)
    for plot in filter(None, plots):
        tracking.log_artifact(run_id, plot, "plots")
    flat = {}
    for role, row in study["summary"]["rows"].items():
        if row["mean_accuracy"] is not None:
            flat[f"mean/{role}/accuracy"] = row["mean_accuracy"]
    for name, info in study["datasets"].items():
        for role, row in info["headline"].items():
            if row:
                flat[f"{name}/{role}/accuracy"] = row["accuracy"]
                flat[f"{name}/{role}/macro_f1"] = row["macro_f1"]
    tracking.log_metrics(run_id, {k: v for k, v in flat.items() if v is not None})
    return study
