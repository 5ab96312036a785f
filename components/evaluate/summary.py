"""The summary table `make run` and the retrain flow print: zero-shot, naive SFT, GenCLS++ and TF-IDF + LR
(trained on SFT's own examples and on all training data) from reports/<dataset>/<row>/metrics.json, and the
paired-bootstrap interval of GenCLS++ minus naive SFT on the same test examples."""
from __future__ import annotations

import json
from components import config

SUMMARY_ROWS = (("zeroshot", "zero-shot"), ("sft", "naive SFT"), ("gencls", "GenCLS++ (SFT+RL)"),
                ("tfidf", "TF-IDF+LR same N"), ("tfidf_all", "TF-IDF+LR all data"))


def summary_table(dataset: str) -> list[dict]:
    """Rows (zero-shot, naive SFT, GenCLS++, TF-IDF) with accuracy, macro-F1 and invalid rate, from reports/."""
    rows = []
    for name, title in SUMMARY_ROWS:
        path = config.reports_dir() / dataset / name / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        rows.append({"row": title, "strategy": m.get("strategy"), "n": m.get("n"), "accuracy": m.get("accuracy"),
                     "macro_f1": m.get("macro_f1"), "invalid_rate": m.get("invalid_rate")})
    return rows


def summary_interval(dataset: str, a: str = "gencls", b: str = "sft") -> dict | None:
    """Row `a` minus row `b` (accuracy and macro-F1) with its paired-bootstrap 95% interval over the test
    examples both predicted (components.evaluate.stats); None when either row is missing."""
    from components.data.datasets import load_labels
    from components.evaluate.evaluation import read_predictions
    from components.evaluate.stats import paired_bootstrap

    root = config.reports_dir() / dataset
    files = [root / a / "predictions.jsonl", root / b / "predictions.jsonl"]
    if not all(f.is_file() for f in files):
        return None
    pa, pb = ({i: (gold, pred) for i, gold, pred in read_predictions(f)} for f in files)
    ids = [i for i in pa if i in pb]
    if not ids:
        return None
    diff = paired_bootstrap([pa[i][0] for i in ids], [pa[i][1] for i in ids], [pb[i][1] for i in ids],
                            list(load_labels(dataset)))
    return {"a": a, "b": b, **diff}


def format_interval(interval: dict | None) -> str:
    """One line: the difference in points with its interval, and what it means."""
    if not interval:
        return ""
    titles = dict(SUMMARY_ROWS)
    acc, f1 = interval["accuracy"], interval["macro_f1"]
    pts = lambda d: f"{100 * d['diff']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"  # noqa: E731
    verdict = lambda d: "better" if d["low"] > 0 else "worse" if d["high"] < 0 else "no clear difference"  # noqa: E731
    return (f"{titles[interval['a']]} - {titles[interval['b']]} (paired bootstrap 95%, n = {interval['n']}): "
            f"accuracy {pts(acc)} {verdict(acc)}; macro-F1 {pts(f1)} {verdict(f1)}")


def format_table(rows: list[dict], interval: dict | None = None) -> str:
    """A plain-text table of summary rows (and the interval line, when given)."""
    lines = [f"{'model':<20} {'strategy':<28} {'n':>5} {'accuracy':>9} {'macro-F1':>9} {'invalid':>8}"]
    for r in rows:
        fmt = lambda v: f"{v:9.3f}" if isinstance(v, (int, float)) else f"{'-':>9}"  # noqa: E731
        lines.append(f"{r['row']:<20} {str(r['strategy'])[:28]:<28} {str(r.get('n') or ''):>5} {fmt(r['accuracy'])} "
                     f"{fmt(r['macro_f1'])} {fmt(r['invalid_rate'])[1:]}")
    if interval:
        lines.append(format_interval(interval))
    return "\n".join(lines)
