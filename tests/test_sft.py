"""SFT: loss mask, adapter-only updates, end-to-end tiny run, resume, configs, data slices."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from components.train.configs import (
    SFTConfig,
    load_config,
    parse_overrides,
)
from components.train.sampling import (
    rebalance,
    split_train_eval,
    stratified_sample,
)

LABELS = {"positive": "The text praises something.", "negative": "The text criticises something."}
POS = ["great film , loved it", "good movie", "loved the acting", "great plot", "good fun", "loved it"]
NEG = ["terrible plot and bad acting", "bad movie", "terrible film", "bad plot", "awful acting", "bad fun"]


def make_toy_data(root: Path, name: str = "toy", copies: int = 3) -> Path:
    """data/<name>/{train,test}.jsonl + labels.yaml with two labels (the on-disk dataset layout)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"{t} {i}", "label": lb} for i in range(copies) for lb, ts in (("positive", POS), ("negative", NEG))
            for t in ts]
    for i, row in enumerate(rows):
        row["id"] = f"t{i:04d}"
    test = [{"id": f"s{i}", "text": t, "label": lb} for i, (t, lb) in enumerate([(POS[0], "positive"), (NEG[0], "negative")])]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (folder / "labels.yaml").write_text(yaml.safe_dump(LABELS, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return make_toy_data(tmp_path_factory.mktemp("data"))


def tiny_config(model_dir: Path, **changes) -> SFTConfig:
    base = dict(model=str(model_dir), train_size=16, eval_size=4, batch_size=4, max_steps=2, eval_every_steps=2,
                eval_batch_size=8, save_steps=2, logging_steps=1, learning_rate=1e-2, uncertain_max_scored=8,
                max_prompt_tokens=128)
    base.update(changes)
    return SFTConfig(**base)


def _rows(model_dir, toy_data, n=4, strategy="naive"):
    from components.model.models import load_model
    from components.model.prompts import Strategy
    from components.train.sft import build_sft_rows, load_data, make_builder

    model, tok = load_model(str(model_dir))
    labels, train, held, pool = load_data("toy", toy_data, n, 0, 0)
    builder = make_builder(tok, labels, Strategy.parse(strategy), pool, 128, 0)
    return model, tok, builder, train, build_sft_rows(builder, train)


def test_loss_mask_covers_exactly_the_label_and_eos(tiny_model_dir, toy_data, tmp_path):
    from components.train.sft import build_trainer

    model, tok, builder, train, rows = _rows(tiny_model_dir, toy_data)
    trainer = build_trainer(model, tok, rows, tiny_config(tiny_model_dir), tmp_path / "t")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    prefix = batch["prefix_ids"][0].tolist()  # the batch's shared prompt prefix, run once
    assert len(prefix) > 0
    for i, ex in enumerate(train):
        keep = batch["attention_mask"][i].bool()
        labels = [-100] * len(prefix) + batch["labels"][i][keep].tolist()
        ids = prefix + batch["input_ids"][i][keep].tolist()
        supervised = [t for t in labels if t != -100]
        # expected: the answer tokens then one <|im_end|>; prompt and padding are -100
        assert supervised == tok(ex["label"], add_special_tokens=False)["input_ids"] + [im_end]
        start = labels.index(supervised[0])
        assert all(t == -100 for t in labels[:start])
        assert tok.decode(ids[:start]) == rows[i]["prompt"]


def test_one_step_changes_only_adapter_and_lowers_loss(tiny_model_dir, toy_data, tmp_path):
    import torch

    from components.train.engine import answer_loss
    from components.train.sft import build_trainer

    model, tok, builder, train, rows = _rows(tiny_model_dir, toy_data)
    config = tiny_config(tiny_model_dir, max_steps=1, warmup_ratio=0.0, lora_dropout=0.0)
    trainer = build_trainer(model, tok, rows, config, tmp_path / "t")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    peft_model = trainer.model
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    with torch.no_grad():
        loss_before = answer_loss(peft_model, batch)[0].item()
    trainer.train()
    peft_model.eval()
    with torch.no_grad():
        loss_after = answer_loss(peft_model, batch)[0].item()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing was trained"
    assert all("lora_" in n for n in changed)  # base weights identical
    assert any("lora_" in n for n in changed)
    assert loss_after < loss_before


def test_train_sft_end_to_end_writes_checkpoint(tiny_model_dir, toy_data, tmp_path):
    from components.model.models import load_model
    from components.train.sft import train_sft

    logged = []
    out = train_sft("toy", tiny_config(tiny_model_dir), out_dir=tmp_path / "sft",
                    log_fn=lambda m, s: logged.append((s, m)), data_dir=toy_data)
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "gencls_config.json",
                 "metrics.json", "loss_curve.png"):
        assert (out / name).exists(), name
    info = json.loads((out / "gencls_config.json").read_text())
    assert info["base_model"] == str(tiny_model_dir) and info["strategy"] == "naive"
    assert info["config"]["learning_rate"] == 1e-2 and "trl" in info["libraries"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["truncated_rows"] == 0
    best = metrics["best"]
    assert set(best["per_label_f1"]) == set(LABELS) and 0 <= best["macro_f1"] <= 1
    keys = {k for _, m in logged for k in m}
    assert {"sft/loss", "sft/eval_macro_f1", "sft/eval_accuracy", "sft/eval_f1_positive"} <= keys
    model, _ = load_model(None, adapter=out)  # the base model comes from gencls_config.json
    assert hasattr(model, "peft_config")


def test_early_stopping_ends_sft_once_patience_evaluations_bring_no_new_best(tiny_model_dir, toy_data, tmp_path, capsys):
    from components.train.sft import train_sft

    # learning rate 0: the held-out macro-F1 never changes, ties keep the earliest step (2) as the best, so with
    # patience 2 the evaluations at steps 4 and 6 bring nothing new and training ends at 6 of 20 steps
    config = tiny_config(tiny_model_dir, max_steps=20, eval_every_steps=2, save_steps=2, learning_rate=0.0, patience=2)
    out = train_sft("toy", config, out_dir=tmp_path / "sft", data_dir=toy_data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["max_steps"] == 20 and metrics["stopped_early"] is True
    assert [h["step"] for h in metrics["eval_history"]] == [2, 4, 6] and metrics["best"]["step"] == 2
    assert "stopping early: held-out macro-F1 has not improved for 2 evaluations (patience 2); best step 2" in \
        capsys.readouterr().out
    # patience 0 (the default) is left out of the config dict, so keys made before the field existed stay valid
    from components.train.configs import asdict_config

    assert "patience" not in asdict_config(tiny_config(tiny_model_dir)) and asdict_config(config)["patience"] == 2
    # killed after the stop, before the output was written: the rerun resumes checkpoint-6 and trains nothing more
    # (the Trainer would train a step before it looks at a stop, and evaluate it)
    again = train_sft("toy", config, out_dir=tmp_path / "sft", data_dir=toy_data)
    rerun = json.loads((again / "metrics.json").read_text())
    assert "nothing left to train" in capsys.readouterr().out
    assert rerun["global_step"] == 6 and rerun["stopped_early"] is True and rerun["eval_history"] == metrics["eval_history"]
    # a budget whose last evaluation reaches the patience ran in full: not an early stop
    whole = train_sft("toy", tiny_config(tiny_model_dir, max_steps=6, eval_every_steps=2, learning_rate=0.0, patience=2),
                      out_dir=tmp_path / "whole", data_dir=toy_data)
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["stopped_early"] is False
    # min_epochs: evaluations count only after it (16 rows / 4 per step = 4 steps an epoch): stops at 8, not 6
    late = train_sft("toy", tiny_config(tiny_model_dir, max_steps=20, eval_every_steps=2, learning_rate=0.0, patience=2,
                                        min_epochs=1.0), out_dir=tmp_path / "late", data_dir=toy_data)
    assert json.loads((late / "metrics.json").read_text())["global_step"] == 8
    with pytest.raises(ValueError, match="sft.patience=2 needs held-out evaluations"):
        train_sft("toy", tiny_config(tiny_model_dir, eval_every_steps=0, patience=2), out_dir=tmp_path / "x",
                  data_dir=toy_data)


class Interrupt(Exception):
    pass


def test_resume_after_interruption(tiny_model_dir, toy_data, tmp_path):
    from components.train.sft import train_sft

    config = tiny_config(tiny_model_dir, max_steps=4, save_steps=2, eval_every_steps=0)

    def crash(metrics, step):
        if step >= 3:
            raise Interrupt  # killed after checkpoint-2 was written

    with pytest.raises(Interrupt):
        train_sft("toy", config, out_dir=tmp_path / "sft", log_fn=crash, data_dir=toy_data)
    checkpoint = tmp_path / "sft" / "trainer" / "checkpoint-2"
    assert checkpoint.is_dir()
    # the checkpoint carries the seconds spent so far; the resumed run's seconds add them (set large here so
    # the sum cannot pass for the second attempt's own time)
    from components.train.checkpoints import CLOCK_FILE

    assert json.loads((checkpoint / CLOCK_FILE).read_text())["seconds"] > 0
    (checkpoint / CLOCK_FILE).write_text(json.dumps({"seconds": 1000.0}))
    out = train_sft("toy", config, out_dir=tmp_path / "sft", data_dir=toy_data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    assert 1000 < json.loads((out / "run.json").read_text())["seconds"] < 1600
    assert (out / "adapter_model.safetensors").exists()
    # a different config does not resume from these checkpoints
    other = train_sft("toy", tiny_config(tiny_model_dir, max_steps=1, save_steps=1, eval_every_steps=0, seed=1),
                      out_dir=tmp_path / "sft", data_dir=toy_data)
    assert json.loads((other / "metrics.json").read_text())["resumed_from_step"] == 0


def test_uncertain_margin_rule_relabels_a_capped_share(tiny_model_dir, toy_data):
    from components.model.prompts import UNCERTAIN
    from components.train.sft import build_sft_rows, select_uncertain

    model, tok, builder, train, _ = _rows(tiny_model_dir, toy_data, n=20, strategy="uncertain")
    config = tiny_config(tiny_model_dir, uncertain_max_share=0.25, uncertain_max_scored=0, uncertain_margin=99.0)
    ids, stats = select_uncertain(model, tok, builder, train, config)
    assert len(ids) == 5 and stats["uncertain_share"] == 0.25  # margin < 99 always: the cap binds
    rows = build_sft_rows(builder, train, ids)
    assert sum(r["completion"] == UNCERTAIN + "<|im_end|>" for r in rows) == 5
    none, _ = select_uncertain(model, tok, builder, train, tiny_config(tiny_model_dir, uncertain_margin=-99.0))
    assert none == set()


def test_load_config_layers_and_overrides():
    params = {"sft": {"learning_rate": 1e-3, "unknown_key": 1}, "profiles": {"quick": {"sft": {"epochs": 3}}}}
    with pytest.warns(UserWarning, match="unknown_key"):
        cfg = load_config("sft", "quick", params=params, overrides=parse_overrides(["sft.lora_r=4", "rl.beta=0", "sft.warmup_ratio=1e-1"]))
    assert cfg.warmup_ratio == 0.1
    assert (cfg.learning_rate, cfg.epochs, cfg.lora_r) == (1e-3, 3.0, 4)
    assert load_config("sft", "full", params={}).train_size == 0  # all data on a GPU
    rl = load_config("rl", "quick", params={}, overrides={"beta": "0", "rl.num_generations": "2"})
    assert rl.beta == 0.0 and rl.num_generations == 2
    with pytest.raises(ValueError, match="valid:"):
        load_config("sft", "quick", params={}, overrides={"lerning_rate": "1"})
    with pytest.raises(ValueError, match="choices|expected one of"):
        load_config("sft", "quick", params={}, overrides={"uncertain_policy": "maybe"})
    assert load_config("sft", "quick", params={}, overrides={"target_modules": "q_proj,v_proj"}).target_modules == [
        "q_proj", "v_proj"]


def test_stratified_subsample_and_rebalance():
    examples = [{"id": str(i), "label": "a" if i < 80 else "b", "text": str(i)} for i in range(100)]
    sample = stratified_sample(examples, 10, seed=0)
    assert Counter(e["label"] for e in sample) == {"a": 8, "b": 2}
    assert sample == stratified_sample(examples, 10, seed=0)  # seeded
    train, held = split_train_eval(examples, 20, 10, seed=0)
    assert not {e["id"] for e in train} & {e["id"] for e in held} and len(train) == 20
    counts = Counter(e["label"] for e in rebalance(examples, seed=0))
    assert counts == {"a": 50, "b": 50}  # balanced instead of 80/20


@pytest.mark.slow
def test_real_smollm2_few_sft_steps(tmp_path):
    from components.train.sft import train_sft

    make_toy_data(tmp_path / "data")
    config = SFTConfig(train_size=8, eval_size=4, batch_size=4, max_steps=2, eval_every_steps=2, save_steps=2,
                       logging_steps=1, uncertain_max_scored=8)
    out = train_sft("toy", config, out_dir=tmp_path / "sft", data_dir=tmp_path / "data")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["loss_history"]
    assert (out / "adapter_model.safetensors").exists()


def test_stratified_sample_floor_keeps_rare_labels():
    from collections import Counter

    from components.train.sampling import stratified_sample

    rows = [{"id": f"a{i}", "label": "common"} for i in range(950)] + [{"id": f"r{i}", "label": "rare"} for i in range(50)]
    plain = Counter(ex["label"] for ex in stratified_sample(rows, 100, seed=0))
    floored = Counter(ex["label"] for ex in stratified_sample(rows, 100, seed=0, min_per_label=20))
    assert plain == {"common": 95, "rare": 5}  # proportional
    assert floored == {"common": 80, "rare": 20}  # floor taken from the largest label, total kept
    assert sum(Counter(ex["label"] for ex in stratified_sample(rows, 10, 0, min_per_label=20)).values()) == 10


KILL_DURING_SAVE = """
import dataclasses, json, os, sys
import transformers
from components.train.sft import train_sft
from components.train.configs import SFTConfig

original = transformers.Trainer._save_optimizer_and_scheduler

def killed(self, output_dir):
    if self.state.global_step == 3:  # checkpoint-3's weights are written, its optimizer not yet
        os._exit(9)                   # what kill -9 does: no cleanup, no exception handlers
    return original(self, output_dir)

transformers.Trainer._save_optimizer_and_scheduler = killed
config, out_dir, data_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
train_sft("toy", SFTConfig(**config), out_dir=out_dir, data_dir=data_dir)
"""


def test_kill_during_a_save_leaves_no_checkpoint_and_resume_uses_the_last_good_one(tiny_model_dir, toy_data,
                                                                                   tmp_path):
    import dataclasses
    import subprocess
    import sys

    from components.train.sft import train_sft

    config = tiny_config(tiny_model_dir, max_steps=4, save_steps=1, eval_every_steps=0)
    out = tmp_path / "sft"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, json.dumps(dataclasses.asdict(config)), str(out),
                           str(toy_data)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    trainer = out / "trainer"
    names = sorted(p.name for p in trainer.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-1", "checkpoint-2"]  # the interrupted save never became checkpoint-3
    assert (trainer / ".saving").is_dir()
    done = train_sft("toy", config, out_dir=out, data_dir=toy_data)
    metrics = json.loads((done / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    assert not (trainer / ".saving").exists()


def test_resume_skips_a_truncated_checkpoint_for_the_previous_one(tiny_model_dir, toy_data, tmp_path, capsys):
    from components.train.sft import train_sft

    config = tiny_config(tiny_model_dir, max_steps=5, save_steps=1, eval_every_steps=0)

    def crash(metrics, step):
        if step >= 4:
            raise Interrupt  # killed after checkpoint-3 was written (logs come before a step's save)

    with pytest.raises(Interrupt):
        train_sft("toy", config, out_dir=tmp_path / "sft", log_fn=crash, data_dir=toy_data)
    newest = tmp_path / "sft" / "trainer" / "checkpoint-3"
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a disk that filled up mid-write
    out = train_sft("toy", config, out_dir=tmp_path / "sft", data_dir=toy_data)
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 2
    assert f"skipping {newest}: optimizer.pt unreadable" in capsys.readouterr().out


def test_training_logs_are_one_short_line_per_step(tiny_model_dir, toy_data, tmp_path, capsys):
    """In a file (no terminal) a run prints a few one-line summaries, not a dict per step."""
    from components.train.sft import train_sft
    from components.train.callbacks import format_step

    train_sft("toy", tiny_config(tiny_model_dir, max_steps=20, save_steps=100, eval_every_steps=0, logging_steps=1),
              out_dir=tmp_path / "sft", data_dir=toy_data)
    import re

    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"\[sft \d+/\d+\]", line)]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("[sft 20/20] loss ")  # ~ every tenth, and the end
    assert all(len(line) < 100 and "{" not in line for line in lines)
    assert format_step("rl", 3, 16, {"reward": 0.5, "zero_variance_groups": 0.25, "kl": 0.001, "x": 1}) == \
        "[rl 3/16] reward 0.5  no-signal 0.25  kl 0.001"


def test_profiles_are_defined_once_in_params_yaml():
    """quick/full/cpu/gpu come from conf/params.yaml through one loader; no profile table lives in code."""
    import ast
    from pathlib import Path

    import yaml

    from components.study.prepare import profile_settings

    repo = Path(__file__).resolve().parent.parent
    table = yaml.safe_load((repo / "conf" / "params.yaml").read_text())["profiles"]
    assert set(table) == {"quick", "full", "cpu", "cpu-long", "gpu"}
    # cpu-long is cpu (YAML merge keys) with a longer SFT rule: the convergence check changes nothing else
    cpu, longer = profile_settings("cpu", None), profile_settings("cpu-long", None)
    assert {k: v for k, v in longer.items() if k not in ("sft", "recipe_from")} == \
        {k: v for k, v in cpu.items() if k != "sft"}
    assert longer["recipe_from"] == "cpu" and "recipe_from" not in cpu  # and it keeps cpu's recipe
    assert longer["sft"] == {**cpu["sft"], "epochs": 6.0, "patience": 3, "min_epochs": 2.0}
    for profile in ("quick", "full"):
        for kind in ("sft", "rl"):
            cfg = load_config(kind, profile, params={})
            assert all(getattr(cfg, key) == pytest.approx(value) for key, value in table[profile][kind].items())
    assert profile_settings("gpu", None)["train_size"] == table["gpu"]["study"]["train_size"]
    with pytest.raises(ValueError, match="defines no sft settings; profiles that do: quick, full"):
        load_config("sft", "cpu", params={})
    with pytest.raises(ValueError, match="defines no study settings"):
        profile_settings("quick", None)
    tables = [f"{path.relative_to(repo)}: {node.targets[0].id}" for path in (repo / "components").rglob("*.py")
              for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Assign)
              and isinstance(node.targets[0], ast.Name) and node.targets[0].id.endswith("PROFILES")]
    tables += [f"{path.relative_to(repo)}: {node.target.id}" for path in (repo / "components").rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.AnnAssign)
               and isinstance(node.target, ast.Name) and node.target.id.endswith("PROFILES")]
    assert not tables, tables


def test_a_resumed_run_reports_the_mean_loss_of_every_logged_step():
    """The Trainer's training_loss covers only its last train() call: 0.0 for a run resumed at its last step."""
    from types import SimpleNamespace

    from components.train.checkpoints import run_loss

    trainer = SimpleNamespace(state=SimpleNamespace(log_history=[{"loss": 1.0, "step": 5}, {"eval_accuracy": 0.9},
                                                                 {"loss": 0.5, "step": 10}]))
    assert run_loss(trainer, SimpleNamespace(training_loss=0.0), resumed=True) == 0.75
    assert run_loss(trainer, SimpleNamespace(training_loss=0.6)) == 0.6  # a run in one go: the Trainer's own
    assert run_loss(trainer) == 0.75  # nothing trained in this call (stopped early before the kill)
