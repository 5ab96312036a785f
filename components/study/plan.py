"""The GenCLS++ study plan: the cell grid, the study profiles, and the choice of the best combination.

    gencls study --datasets trec6 movie-sentiment --profile cpu --cells headline
    # flows/study.py runs the cells; this module decides *which* cells (and, from the validation
    # results, the best combination); prepare.py subsamples, measure.py measures, report.py reports.

The study profiles (cpu, gpu) live in conf/params.yaml `profiles.<p>.study`.

A cell is one measured configuration of one dataset: (kind, train strategy, inference
strategy, rl on/off, profile, model). Its key is a stable hash of those fields plus the
dataset's settings fingerprint (subsample ids, resolved SFT config, evaluation settings; an RL
cell also the RL settings: measure.cell_key), so a changed budget never reuses an old number and a
new RL budget re-runs only the RL cells. Cells that share a training
strategy and rl switch share one trained adapter ("train once, evaluate many").

Cell kinds (registry; add an entry to add a kind):
    tfidf     TF-IDF (1-2 grams) + logistic regression on the same N training examples.
    tfidf_all the same on all training data (minus the validation slice).
    minilm    all-MiniLM-L6-v2 embeddings + logistic regression (C by CV) on the same N.
    zeroshot  the base model with an inference strategy, no training.
    trained   SFT with a training strategy (+ GRPO when rl), evaluated with an inference strategy.

Selections (``--cells``):
    headline  tfidf (N and all), MiniLM, zero-shot (generative and perplexity), naive SFT (generative and
              perplexity), the recipe's SFT and SFT + RL.
    ablation  naive SFT, each dimension alone at training, at inference and at both, the
              train x inference interplay grid, the recipe's SFT and SFT + RL, recipe + reasoning (+RL).
    all       both.
The recipe (one for the whole study) is chosen on the validation slices of the ablation datasets,
never on test, by RECIPE_RULE (``select_recipe``); every dataset's headline trains that recipe.
Without a complete ablation yet, `DEFAULT_BEST` is used and the report says so.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence


TRAIN_FLOOR = 20  # rare labels keep this many training examples (the strictest validation minimum, r8's)
NAIVE = "naive"
PERPLEXITY = "decoding=perplexity"
REASONING = "reasoning"
# strategy dimensions switched on alone at training time (and inference time); spec -> display name
TRAIN_DIMS = {"definitions": "definitions", "uncertain": "uncertain", "numeric": "numeric",
              "icl=random": "icl=random", "icl=semantic": "icl=semantic"}
INFER_ONLY_DIMS = {PERPLEXITY: "decoding=perplexity"}  # decoding has no training-time meaning
INTERPLAY = ("naive", "definitions", "icl=semantic", "numeric")  # train x inference grid (both axes)
DEFAULT_BEST = ("icl=semantic", "icl=semantic,decoding=perplexity")  # prior when no validation results exist
DEFAULT_BEST_WHY = ("(semantically retrieved demonstrations at training and inference, perplexity decoding: fixed "
                    "for every dataset, chosen from the paper's ablation and our earlier zero-shot trec6 figures, "
                    "not tuned per dataset)")
CELL_SETS = ("headline", "ablation", "all")
METRIC_KEYS = ("accuracy", "macro_f1", "invalid_rate", "abstention_rate", "answered_accuracy", "ece")

# ----------------------------------------------------------------------------- strategies
def canonical(spec: str, k: int | None = None) -> str:
    """Canonical slug of a strategy spec, with k set for in-context strategies.

    Example:
        >>> canonical("icl=semantic", k=2)
        'icl=semantic,k=2'
    """
    from components.model.prompts import Strategy

    strategy = Strategy.parse(spec)
    if k is not None and strategy.icl != "none":
        strategy = strategy.replace(k=k)
    return strategy.slug()


def combine(*specs: str, k: int | None = None) -> str:
    """Merge strategy specs: each spec's non-default dimensions switched on (later wins).

    Example:
        >>> combine("definitions", "numeric,decoding=perplexity")
        'definitions,numeric,decoding=perplexity'
    """
    from components.model.prompts import Strategy

    default = Strategy()
    merged: dict[str, Any] = {}
    for spec in specs:
        parsed = Strategy.parse(spec)
        for f in dataclasses.fields(Strategy):
            if getattr(parsed, f.name) != getattr(default, f.name):
                merged[f.name] = getattr(parsed, f.name)
    if merged.get("reasoning"):
        merged["decoding"] = "generative"  # reasoning is decoded generatively
    return canonical(Strategy(**merged).slug(), k)


def without_decoding(spec: str) -> str:
    """The training-time part of a strategy (decoding is inference-only)."""
    from components.model.prompts import Strategy

    return Strategy.parse(spec).replace(decoding="generative").slug()


# ----------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One measured configuration of a dataset (see module docstring)."""

    kind: str  # "tfidf" | "tfidf_all" | "minilm" | "zeroshot" | "trained"
    train: str  # training strategy slug ("-" when nothing is trained)
    infer: str  # inference strategy slug ("-" for tfidf)
    rl: bool
    profile: str
    model: str

    def key(self, settings_fp: str = "") -> str:
        """Stable 12-hex key of the cell's fields and the dataset's settings fingerprint."""
        from components.fingerprint import fingerprint

        return fingerprint({**dataclasses.asdict(self), "settings": settings_fp}, 12)

    @property
    def name(self) -> str:
        """Readable name, e.g. `sft[definitions] -> definitions,decoding=perplexity +RL`."""
        if self.train == "-" and self.infer == "-":
            return self.kind  # tfidf, tfidf_all, minilm
        if self.kind == "zeroshot":
            return f"zero-shot -> {self.infer}"
        return f"sft[{self.train}] -> {self.infer}{' +RL' if self.rl else ''}"

    @property
    def group(self) -> tuple[str, str, bool, str]:
        """Cells with the same group share one trained adapter (or none): (kind, train strategy, rl, select),
        select = the inference strategy an RL adapter's checkpoint is chosen with ("" for SFT)."""
        return (self.kind, self.train, self.rl, self.infer if self.rl else "")


def slug_dir(spec: str) -> str:
    """File-system friendly strategy name: `icl=semantic,k=2` -> `icl-semantic-k-2`."""
    import re

    return re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-") or NAIVE


def single_dim_cells(profile: str, model: str, k: int) -> list[tuple[str, Cell]]:
    """Each training dimension alone at training, at inference and at both; decoding at inference."""
    naive = NAIVE
    out: list[tuple[str, Cell]] = []
    for spec, title in TRAIN_DIMS.items():
        dim = canonical(spec, k)
        out += [(f"dim:{title}:both", Cell("trained", dim, dim, False, profile, model)),
                (f"dim:{title}:train", Cell("trained", dim, naive, False, profile, model)),
                (f"dim:{title}:inference", Cell("trained", naive, dim, False, profile, model))]
    for spec, title in INFER_ONLY_DIMS.items():
        out.append((f"dim:{title}:inference", Cell("trained", naive, canonical(spec), False, profile, model)))
    return out


def interplay_cells(profile: str, model: str, k: int) -> list[tuple[str, Cell]]:
    """The train x inference grid over INTERPLAY strategies."""
    axis = [canonical(s, k) for s in INTERPLAY]
    return [(f"grid:{t}|{i}", Cell("trained", t, i, False, profile, model)) for t in axis for i in axis]


def phase1_cells(selection: str, profile: str, model: str, k: int) -> list[tuple[str, Cell]]:
    """Cells that do not depend on the best combination, as (role, cell); a cell may appear under several roles."""
    if selection not in CELL_SETS:
        raise ValueError(f"cells {selection!r}: expected one of {', '.join(CELL_SETS)}")
    naive = Cell("trained", NAIVE, NAIVE, False, profile, model)
    out: list[tuple[str, Cell]] = [("naive_sft", naive)]
    if selection in ("headline", "all"):
        out += [("tfidf", Cell("tfidf", "-", "-", False, profile, model)),
                ("tfidf_all", Cell("tfidf_all", "-", "-", False, profile, model)),
                ("minilm", Cell("minilm", "-", "-", False, profile, model)),
                ("zeroshot", Cell("zeroshot", "-", NAIVE, False, profile, model)),
                ("zeroshot_perplexity", Cell("zeroshot", "-", PERPLEXITY, False, profile, model)),
                ("naive_sft_perplexity", Cell("trained", NAIVE, PERPLEXITY, False, profile, model))]
    if selection in ("ablation", "all"):
        out += [("baseline", naive)]  # the validation reference of the best-combination choice
        out += single_dim_cells(profile, model, k) + interplay_cells(profile, model, k)
    return out


def phase2_cells(selection: str, profile: str, model: str, best: tuple[str, str]) -> list[tuple[str, Cell]]:
    """Cells built on the best combination (train strategy, inference strategy)."""
    train, infer = best
    out = [("best_sft", Cell("trained", train, infer, False, profile, model)),
           ("gencls", Cell("trained", train, infer, True, profile, model))]
    if selection in ("ablation", "all"):
        reasoning_train = combine(train, REASONING)
        out += [("reasoning", Cell("trained", reasoning_train, combine(infer, REASONING), True, profile, model))]
    return out


def keep_roles(cells: list[tuple[str, Cell]], only: Sequence[str] | None) -> list[tuple[str, Cell]]:
    """The planned (role, cell) pairs whose role is in `only` or starts with one of its prefixes (all when None)."""
    if not only:
        return cells
    return [(role, cell) for role, cell in cells if any(role == o or role.startswith(o) for o in only)]


def needs_validation(roles: Sequence[str]) -> bool:
    """Whether a cell is also measured on the validation slice (it feeds the best-combination choice)."""
    return any(role in VALIDATED_ROLES or (role.startswith("dim:") and role.endswith((":both", f"{PERPLEXITY}:inference")))
               for role in roles)


VALIDATED_ROLES = ("naive_sft", "baseline", "naive_sft_perplexity", "best_sft", "gencls", "reasoning")


def dedupe(cells: Iterable[tuple[str, Cell]]) -> list[tuple[str, Cell]]:
    """Keep the first role of every distinct cell (order kept)."""
    seen: set[Cell] = set()
    out = []
    for role, cell in cells:
        if cell not in seen:
            seen.add(cell)
            out.append((role, cell))
    return out


def group_cells(cells: Sequence[Cell]) -> dict[tuple[str, str, bool, str], list[Cell]]:
    """Cells by shared adapter (Cell.group); insertion order kept."""
    groups: dict[tuple[str, str, bool, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    return groups


# ----------------------------------------------------------------------------- the recipe
RECIPE_RULE = ("on the validation slice of every ablation dataset, each dimension's gain over naive SFT is measured "
               "(matched train = inference cell; perplexity decoding on the naive adapter); a dimension is switched "
               "on when its mean gain over those datasets is positive (only the better of icl=random / "
               "icl=semantic); the combination is then confirmed on validation: if its mean gain is below the best "
               "single dimension's, that single dimension is the recipe instead. Test numbers are never read.")


def validation_gains(results: Sequence[dict], k: int, metric: str = "val_accuracy") -> tuple[float | None, dict]:
    """(naive SFT's validation score, {dimension title: gain over it}) of one dataset's cell results."""
    val = {(r["train"], r["infer"]): r.get(metric) for r in results
           if r.get("kind") == "trained" and not r.get("rl") and r.get(metric) is not None}
    base = val.get((NAIVE, NAIVE))
    gains: dict[str, float] = {}
    if base is None:
        return None, gains
    for spec, title in TRAIN_DIMS.items():
        dim = canonical(spec, k)
        if val.get((dim, dim)) is not None:
            gains[title] = val[(dim, dim)] - base
    for spec, title in INFER_ONLY_DIMS.items():
        if val.get((NAIVE, canonical(spec))) is not None:
            gains[title] = val[(NAIVE, canonical(spec))] - base
    return base, gains


def _combination(gains: dict[str, float], k: int) -> tuple[str, str]:
    """(train, infer) strategy of the dimensions with positive gain (the better icl only)."""
    chosen = [t for t in TRAIN_DIMS.values() if not t.startswith("icl=") and gains.get(t, 0) > 0]
    icl = max((t for t in TRAIN_DIMS.values() if t.startswith("icl=") and gains.get(t, 0) > 0),
              key=lambda t: gains[t], default=None)
    train_specs = chosen + ([icl] if icl else [])
    train = combine(*train_specs, k=k) if train_specs else NAIVE
    infer_extra = [t for t in INFER_ONLY_DIMS.values() if gains.get(t, 0) > 0]
    return train, (combine(train, *infer_extra, k=k) if infer_extra else train)


def _single(title: str, k: int) -> tuple[str, str]:
    """(train, infer) of one dimension alone (decoding: naive training)."""
    if title in INFER_ONLY_DIMS.values():
        return NAIVE, canonical(title)
    dim = canonical(title, k)
    return dim, dim


def select_recipe(results_by_dataset: dict[str, Sequence[dict]], k: int, metric: str = "val_accuracy") -> dict:
    """The one recipe of the study, chosen on validation over the ablation datasets (RECIPE_RULE).

    Args:
        results_by_dataset: {dataset: cell results}; datasets without single-dimension validation
            results are ignored (they get the recipe, they do not choose it).
        k: demonstrations per prompt for in-context strategies.

    Returns:
        {"train", "infer", "source": "validation"|"default", "datasets": [...], "gains": {dim: mean gain},
         "per_dataset": {dataset: {dim: gain}}, "confirmation": {...} | None, "rule"}.
    """
    per_dataset = {}
    for name, results in results_by_dataset.items():
        _, gains = validation_gains(results, k, metric)
        if len(gains) >= len(TRAIN_DIMS) + len(INFER_ONLY_DIMS):  # a complete ablation only
            per_dataset[name] = gains
    if not per_dataset:
        return {"train": canonical(DEFAULT_BEST[0], k), "infer": canonical(DEFAULT_BEST[1], k), "source": "default",
                "datasets": [], "gains": {}, "per_dataset": {}, "confirmation": None,
                "rule": f"no complete ablation on validation yet: DEFAULT_BEST prior {DEFAULT_BEST_WHY}"}
    titles = list(TRAIN_DIMS.values()) + list(INFER_ONLY_DIMS.values())
    mean = {t: sum(g[t] for g in per_dataset.values()) / len(per_dataset) for t in titles}
    train, infer = _combination(mean, k)
    confirmation = None
    best_single = max(titles, key=lambda t: mean[t])
    if mean[best_single] > 0 and (train, infer) != _single(best_single, k):
        combo = []
        for name, results in results_by_dataset.items():
            if name not in per_dataset:
                continue
            base, _ = validation_gains(results, k, metric)
            value = next((r.get(metric) for r in results if r.get("kind") == "trained" and not r.get("rl")
                          and (r["train"], r["infer"]) == (train, infer) and r.get(metric) is not None), None)
            combo.append(None if value is None or base is None else value - base)
        measured = None not in combo
        gain = sum(combo) / len(combo) if measured else None
        confirmation = {"combination": [train, infer], "mean_gain": gain, "best_single": best_single,
                        "best_single_gain": mean[best_single], "measured": measured}
        if measured and gain < mean[best_single]:
            train, infer = _single(best_single, k)
            confirmation["kept"] = "best single dimension"
        else:
            confirmation["kept"] = "combination" if measured else "combination (not yet confirmed)"
    return {"train": train, "infer": infer, "source": "validation", "datasets": sorted(per_dataset),
            "gains": mean, "per_dataset": per_dataset, "confirmation": confirmation, "rule": RECIPE_RULE}


def roles_by_cell(planned: Sequence[tuple[str, Cell]]) -> dict[Cell, list[str]]:
    """Every role of each cell (a cell can be both a grid point and a single-dimension point)."""
    out: dict[Cell, list[str]] = defaultdict(list)
    for role, cell in planned:
        if role not in out[cell]:
            out[cell].append(role)
    return dict(out)


def selection_roles(selection: str, only: Sequence[str] | None = None, k: int = 2) -> set[str]:
    """The role names a `--cells` selection measures (kept by `only`), whatever the recipe: which committed
    cells a re-run of that selection covers (`gencls study --verify --adopt`).

    >>> sorted(selection_roles("headline", ["naive_sft", "gencls"]))
    ['gencls', 'naive_sft', 'naive_sft_perplexity']
    >>> "grid:naive|naive" in selection_roles("ablation") and "tfidf" not in selection_roles("ablation")
    True
    """
    planned = phase1_cells(selection, "", "", k) + phase2_cells(selection, "", "", (NAIVE, NAIVE))
    return {role for role, _ in keep_roles(planned, only)}
