"""The summary table `make run` and the retrain flow print: zero-shot, naive SFT and GenCLS++ rows
from reports/<dataset>/<row>/metrics.json."""
from __future__ import annotations

import json

from components import config

SUMMARY_ROWS = (("zeroshot", "zero-shot"), ("sft", "naive SFT"), ("gencls", "GenCLS++ (SFT+RL)"))


def summary_table(dataset: str) -> list[dict]:
    """Rows (zero-shot, naive SFT, GenCLS++) with accuracy, macro-F1 and invalid rate, from reports/."""
    rows = []
    for name, title in SUMMARY_ROWS:
        path = config.reports_dir() / dataset / name / "metrics.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        rows.append({"row": title, "strategy": m.get("strategy"), "n": m.get("n"), "accuracy": m.get("accuracy"),
                     "macro_f1": m.get("macro_f1"), "invalid_rate": m.get("invalid_rate")})
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of summary rows."""
    lines = [f"{'model':<20} {'strategy':<28} {'n':>5} {'accuracy':>9} {'macro-F1':>9} {'invalid':>8}"]
    for r in rows:
        fmt = lambda v: f"{v:9.3f}" if isinstance(v, (int, float)) else f"{'-':>9}"  # noqa: E731
        lines.append(f"{r['row']:<20} {str(r['strategy'])[:28]:<28} {str(r.get('n') or ''):>5} {fmt(r['accuracy'])} "
                     f"{fmt(r['macro_f1'])} {fmt(r['invalid_rate'])[1:]}")
    return "\n".join(lines)
