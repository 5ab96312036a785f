"""Re-measurement check: a dataset's committed study cells against the same cells measured again from scratch.

Pure comparison of two cell folders' contents (``measure.read_dataset`` output). The orchestration that
re-runs the cells in a scratch project is flows/study_verify.py (`gencls study --verify`).

A cell is keyed by its settings (measure.cell_key), so the same key on both sides is the same experiment:
same examples, prompts, budgets and seed. Per cell the check reports both figures, the share of test
examples predicted alike, the paired-bootstrap interval of re-run minus committed accuracy and the
two-sided exact McNemar test on the examples only one of the two gets right. It sorts each cell into:

* ``identical``: every test prediction is the same;
* ``within noise``: predictions differ, but not significantly (McNemar p >= 0.05);
* ``differs``: one of the two is right significantly more often (p < 0.05).

(The verdict uses the exact test because the bootstrap interval is too narrow when a handful of
predictions all move one way: 4 of 500 give [-1.6, -0.2], p = 0.125.)

Training on CPU is deterministic for one engine and machine, but engines that are equal to 1e-4 (the
packed shared-prefix SFT against the padded one, for example) are not bitwise equal. A few hundred
optimizer steps then end at another adapter. So ``within noise`` is the expected verdict when the cells
come from an older engine, and ``identical`` when both runs used the same engine.
"""
from __future__ import annotations

from typing import Any

from components.evaluate.stats import mcnemar_p

VERDICTS = ("identical", "within noise", "differs")
ALPHA = 0.05
ABOUT = ("Each committed cell measured again from scratch with the same settings key (same examples, prompts, budgets "
         "and seed). identical: every test prediction the same; within noise: predictions differ but neither side is "
         "right significantly more often (two-sided exact McNemar test, p >= 0.05); differs: p < 0.05. `difference` "
         "is re-run minus committed with its paired-bootstrap 95% interval.")


def _by_key(info: dict | None) -> dict[str, dict]:
    return {cell["result"]["key"]: cell for cell in (info or {}).get("cells") or []}


def compare_cell(committed: dict, rerun: dict, labels: list[str]) -> dict:
    """One cell measured twice: both figures, prediction agreement and the interval of re-run - committed."""
    from components.evaluate import stats

    a, b = committed["result"], rerun["result"]
    rows_a = (committed.get("predictions") or {}).get("test") or []
    rows_b = (rerun.get("predictions") or {}).get("test") or []
    row = {"key": a["key"], "name": a.get("name", a["key"]),
           "committed": {"accuracy": a.get("accuracy"), "macro_f1": a.get("macro_f1"),
                         "machine": a.get("machine") or "not recorded"},
           "rerun": {"accuracy": b.get("accuracy"), "macro_f1": b.get("macro_f1"),
                     "machine": b.get("machine") or "not recorded"}}
    if not rows_a or not rows_b:
        return {**row, "verdict": None, "note": "test predictions missing on one side"}
    gold, pred_a, pred_b = stats.align(rows_a, rows_b)
    agree = sum(x == y for x, y in zip(pred_a, pred_b)) / len(gold)
    diff = stats.paired_bootstrap(gold, pred_b, pred_a, labels)  # re-run - committed
    p, only_rerun, only_committed = mcnemar_p([x == g for x, g in zip(pred_b, gold)],
                                              [x == g for x, g in zip(pred_a, gold)], alternative="two-sided")
    verdict = "identical" if agree == 1.0 else "within noise" if p >= ALPHA else "differs"
    return {**row, "n": len(gold), "agreement": agree, "difference": diff, "verdict": verdict,
            "mcnemar": {"p": p, "only_rerun_right": only_rerun, "only_committed_right": only_committed}}


def compare_dataset(committed: dict | None, rerun: dict | None) -> dict:
    """Every cell key on either side: compared where both have it, listed where one lacks it (both fingerprints
    are equal, so a key only in the re-run is a cell the committed study never measured: listed, not a failure).

    Args:
        committed, rerun: ``measure.read_dataset`` of the committed and of the re-run cell folder.
    """
    if not committed:
        raise ValueError("no committed cells to compare with")
    if rerun:
        for name in ("fingerprint", "rl_fingerprint"):
            if rerun["record"].get(name) != committed["record"].get(name):
                raise ValueError(f"the re-run was measured under other settings ({name} "
                                 f"{rerun['record'].get(name)} vs committed {committed['record'].get(name)})")
    labels = list(committed.get("labels") or [])
    ours, theirs = _by_key(committed), _by_key(rerun)
    cells = [compare_cell(ours[k], theirs[k], labels) for k in sorted(ours) if k in theirs]
    counts = {v: sum(c.get("verdict") == v for c in cells) for v in VERDICTS}
    diffs = [abs(c["difference"]["accuracy"]["diff"]) for c in cells if c.get("difference")]
    return {"fingerprint": committed["record"].get("fingerprint"), "cells": cells, "counts": counts,
            "max_abs_accuracy_diff": max(diffs) if diffs else None,
            "not_rerun": sorted(k for k in ours if k not in theirs),
            "only_in_rerun": sorted(k for k in theirs if k not in ours),
            "reproduced": bool(cells) and all(c.get("verdict") in VERDICTS[:2] for c in cells)}


def uncovered(committed: dict, roles: set[str]) -> list[str]:
    """Names of the committed cells none of whose roles is in `roles` (``plan.selection_roles``): cells a re-run
    of that selection leaves out, which adopting its cells would leave from another code version.

    >>> uncovered({"cells": [{"result": {"name": "tfidf", "roles": ["tfidf"]}},
    ...                      {"result": {"name": "sft[numeric] -> naive", "roles": ["grid:numeric|naive"]}}]}, {"tfidf"})
    ['sft[numeric] -> naive']
    """
    return sorted(c["result"].get("name") or c["result"]["key"] for c in committed.get("cells") or []
                  if not set(c["result"].get("roles") or []) & roles)


def _figures(c: dict) -> tuple[str, ...]:
    """(committed, re-run, agreement, re-run - committed [95%], McNemar p, verdict) of a compared cell, as text."""
    acc = c["difference"]["accuracy"]
    return (f"{100 * c['committed']['accuracy']:.1f}", f"{100 * c['rerun']['accuracy']:.1f}", f"{100 * c['agreement']:.1f}%",
            f"{100 * acc['diff']:+.1f} [{100 * acc['low']:+.1f}, {100 * acc['high']:+.1f}]", f"{c['mcnemar']['p']:.2f}",
            c["verdict"])


def table(dataset: str, result: dict) -> list[str]:
    """Console lines: one per compared cell, then the dataset's summary."""
    lines = [f"{dataset}: {'committed':>40} {'re-run':>7} {'agree':>6}  re-run - committed [95%]  verdict (McNemar)"]
    for c in result["cells"]:
        if not c.get("difference"):
            lines.append(f"  {c['name'][:44]:44} {c.get('note', '')}")
            continue
        committed, rerun, agree, diff, p, verdict = _figures(c)
        lines.append(f"  {c['name'][:44]:44} {committed:>5} {rerun:>7} {agree:>6}  {diff:>18}  {verdict} (p {p})")
    lines.append(f"  {len(result['cells'])} cell(s) compared: {count_text(result['counts'])}"
                 + (f"; not re-run: {len(result['not_rerun'])}" if result["not_rerun"] else ""))
    return lines


def summary(results: dict[str, Any]) -> dict:
    """Over datasets: cells compared, verdict counts, the largest accuracy difference, reproduced or not."""
    cells = [c for r in results.values() for c in r["cells"]]
    diffs = [r["max_abs_accuracy_diff"] for r in results.values() if r["max_abs_accuracy_diff"] is not None]
    return {"datasets": sorted(results), "cells": len(cells),
            "counts": {v: sum(c.get("verdict") == v for c in cells) for v in VERDICTS},
            "max_abs_accuracy_diff": max(diffs) if diffs else None,
            "reproduced": bool(results) and all(r["reproduced"] for r in results.values())}


def count_text(counts: dict) -> str:
    """"10 identical, 3 within noise" in the verdicts' order (a JSON round trip sorts the keys)."""
    return ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts.get(v)) or "none"


def markdown_lines(verified: dict | None) -> list[str]:
    """study.md's section on the committed cells measured again (reports/study/verify-<profile>.json)."""
    if not verified or not verified.get("datasets"):
        return []
    s = verified["summary"]
    counts = count_text(s["counts"])
    lines = ["## Committed cells measured again from scratch", "",
             f"`gencls study --verify` trained and measured {s['cells']} committed cells again ({', '.join(s['datasets'])}): "
             f"{counts}; {'reproduced' if s['reproduced'] else '**not reproduced**'}. {verified.get('about', ABOUT)} "
             "The intervals elsewhere in this report resample test examples only: they leave out training randomness, "
             "which this re-run measures for the trained cells.", "",
             "| dataset | cell | committed | re-run | agree | re-run - committed [95%] | McNemar p | verdict | re-run on |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, info in sorted(verified["datasets"].items()):
        meta = info.get("meta") or {}
        where = f"{(meta.get('machine') or {}).get('platform', '?')}, {str(meta.get('commit') or '?')[:7]}"
        for c in info["cells"]:
            figures = _figures(c) if c.get("difference") else ("", "", "", c.get("note", ""), "", "")
            lines.append("| " + " | ".join((name, c["name"], *figures, where)) + " |")
    notes = [f"- {name}: {info['meta']['note']}" for name, info in sorted(verified["datasets"].items())
             if (info.get("meta") or {}).get("note")]
    for name, info in sorted(verified["datasets"].items()):
        if (info.get("adopted") or {}).get("state", "done") == "done" and info.get("adopted"):
            a = info["adopted"]
            extra = f"; {len(a['not_adopted'])} cell(s) only the re-run measured were not adopted" if a.get("not_adopted") else ""
            code = ", ".join(a["code"]) if a.get("code") else f"of commit {str(a.get('commit') or '?')[:7]}"
            notes.append(f"- {name}: adopted on {a['date']} (`--adopt`, cells measured by code {code}): "
                         f"the re-run's {a['cells']} cells and its training record replaced the committed ones{extra}, so "
                         "every table above shows the re-run; `committed` in this table is the cells they replaced (in git "
                         "history).")
        elif info.get("adopted_earlier"):
            notes.append(f"- {name}: its committed cells were adopted from a re-run on {info['adopted_earlier']['date']}; "
                         "this comparison is against them.")
    return lines + ([""] + notes if notes else []) + [""]
