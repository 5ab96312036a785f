"""The served model: an MLflow pyfunc that holds a LoRA adapter and names its base model.

    export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow/mlflow.db
    mlflow models serve -m models:/gencls-trec6@champion --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["text"], "data": [["Who wrote Hamlet?"]]}}'
    # {"predictions": [{"label": "human", "probs": {"description": 0.01, ..., "human": 0.93, ...}}]}

What is logged per run: the adapter folder (safetensors + tokenizer + gencls_config.json),
labels.yaml, the demo pool when the strategy uses in-context examples, and a model_config
naming the base model by registry name, package, version and sha256
(`components.model.models.model_provenance`) — never a copy of the base weights. At load time
the base model is materialised offline by `components.model.models.load_model` (from the
package cache, converting once) and the adapter is applied. Prediction uses perplexity
decoding so every answer comes with a probability for each label.

Bad requests (no `text` column, no rows, non-string or empty texts) raise
``MlflowException(error_code=INVALID_PARAMETER_VALUE)``, which the scoring server turns
into HTTP 400 with the message.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # components/, shipped with the model as code_paths
MAX_BATCH = 256  # rows per request by default; more is a 400 (GENCLS_SERVE_MAX_ROWS / gencls serve --max-rows)
MAX_ROWS_ENV = "GENCLS_SERVE_MAX_ROWS"
SERVE_TIMEOUT_S = 120  # gencls serve's request timeout: MAX_BATCH rows at ~0.1 s each (2 cores, trec6) fit in it
SERVE_WORKERS_ENV = "GENCLS_SERVE_WORKERS"  # uvicorn workers of `gencls serve`; each takes cores // workers threads
PINNED = ("mlflow", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy",
          "pandas", "pyyaml", "gguf", "filelock")  # what load_context and predict import


def _bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def pip_requirements(extra: tuple[str, ...] = ()) -> list[str]:
    """The model's runtime deps pinned to the versions installed here (no torchvision)."""
    out = []
    for name in PINNED + extra:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


class GenclsClassifier(mlflow.pyfunc.PythonModel):
    """DataFrame with a `text` column -> DataFrame with `label` and `probs` per row."""

    def load_context(self, context: Any) -> None:
        """Load the base model named in model_config, apply the adapter, build the prompt builder."""
        import yaml

        from components.model.models import load_model
        from components.model.prompts import PromptBuilder, Strategy
        from components.threads import apply_thread_policy

        harden_scoring_server()
        # each scoring-server worker takes its share of the cores (gencls serve passes SERVE_WORKERS_ENV)
        self.threads = apply_thread_policy(workers=int(os.environ.get(SERVE_WORKERS_ENV, "1") or 1))
        cfg = dict(context.model_config or {})
        adapter = context.artifacts["adapter"]
        labels = yaml.safe_load(Path(context.artifacts["labels"]).read_text(encoding="utf-8"))
        order = cfg.get("label_order")
        if order:  # the order the evaluated prompts listed the labels in
            labels = {label: labels[label] for label in order}
        self.model, self.tokenizer = load_model(cfg["base_model"], adapter=adapter, device=cfg.get("device", "auto"))
        # exactly the evaluated inference strategy (train/serve parity); probabilities are real with
        # perplexity decoding, one-hot on the parsed answer with generative decoding
        strategy = Strategy.parse(cfg.get("strategy", "decoding=perplexity"))
        demos: list[dict] = []
        if strategy.icl != "none" and "demos" in context.artifacts:
            with open(context.artifacts["demos"], encoding="utf-8") as fh:
                demos = [json.loads(line) for line in fh if line.strip()]
        retriever = None
        if strategy.icl == "semantic":
            from components.model.retrieval import Retriever

            retriever = Retriever(demos)
        self.builder = PromptBuilder(self.tokenizer, labels, strategy, demos, retriever=retriever,
                                     max_prompt_tokens=int(cfg.get("max_prompt_tokens", 384)),
                                     seed=int(cfg.get("seed", 0)))
        self.batch_size = int(cfg.get("batch_size", 16))

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 (MLflow reads type hints as a schema)
        """Classify each row's `text`; 400 (MlflowException) on empty or malformed input."""
        import pandas as pd
        import torch

        from components.model.decoding import predict

        torch.set_num_threads(self.threads)  # the server may call from a thread torch has not configured
        texts = validate_input(model_input)
        examples = [{"id": str(i), "text": text, "label": None} for i, text in enumerate(texts)]
        records = predict(self.model, self.tokenizer, self.builder, examples, batch_size=self.batch_size,
                          progress=False)
        labels = list(self.builder.space.labels)
        probs = [rec.get("probs") or {lab: float(lab == rec["pred"]) for lab in labels} for rec in records]
        return pd.DataFrame({"label": [rec["pred"] for rec in records], "probs": probs})


def harden_scoring_server() -> None:
    """Make MLflow's scoring server answer 400, not 500, to JSON nested too deeply to parse.

    `json.loads` raises RecursionError on a body like `[[[[...]]]]` (thousands deep); MLflow's
    request parser catches only JSON syntax errors. The model is loaded inside the server's
    worker, so its `load_context` wraps the parser there (idempotent; no-op outside a server).
    """
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc import scoring_server
    except ImportError:
        return
    parse = scoring_server._parse_json_data
    if getattr(parse, "_gencls_hardened", False):
        return

    def parse_json_data(*args: Any, **kwargs: Any) -> Any:
        try:
            return parse(*args, **kwargs)
        except RecursionError:
            raise MlflowException.invalid_parameter_value(
                "request JSON is nested too deeply; expected {\"dataframe_split\": {\"columns\": [\"text\"], "
                "\"data\": [[\"...\"]]}}") from None

    parse_json_data._gencls_hardened = True
    scoring_server._parse_json_data = parse_json_data


def max_rows() -> int:
    """The per-request row cap: GENCLS_SERVE_MAX_ROWS (set by `gencls serve --max-rows`) or MAX_BATCH."""
    try:
        return max(1, int(os.environ.get(MAX_ROWS_ENV, MAX_BATCH)))
    except ValueError:
        return MAX_BATCH


def validate_input(model_input: Any) -> list[str]:
    """The texts of a request, or an MlflowException(INVALID_PARAMETER_VALUE) saying what is wrong."""
    import pandas as pd

    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    elif isinstance(model_input, list):
        model_input = pd.DataFrame({"text": model_input}) if all(isinstance(x, str) for x in model_input) else pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise _bad_request(f"expected a table with a 'text' column, got {type(model_input).__name__}")
    if "text" not in model_input.columns:
        raise _bad_request(f"request needs a 'text' column; got columns {list(model_input.columns)}. "
                           'Example: {"dataframe_split": {"columns": ["text"], "data": [["Who wrote Hamlet?"]]}}')
    if len(model_input) == 0:
        raise _bad_request("request has no rows: send at least one text")
    cap = max_rows()
    if len(model_input) > cap:
        raise _bad_request(f"request has {len(model_input)} rows; at most {cap} per request")
    texts = model_input["text"].tolist()
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise _bad_request(f"row(s) {bad[:10]}: 'text' must be a non-empty string")
    return texts


def signature() -> Any:
    """Explicit signature: text (string) -> label (string), probs (map label -> probability)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "text")]),
                          outputs=Schema([ColSpec(DataType.string, "label"), ColSpec(Map(DataType.double), "probs")]))


def adapter_fingerprint(adapter_dir: str | Path, settings: dict) -> str:
    """sha256 of what a served model is: the adapter's weight files and the prompt settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(Path(adapter_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def base_model_reference(adapter_dir: str | Path, base_model: str | None = None) -> dict:
    """Provenance of the adapter's base model (registry name + package + version + sha256).

    A base given as a local folder (tests, user models) is recorded by path: it is
    not copied into the logged model either.
    """
    from components.model.models import model_provenance, read_adapter_config

    config = read_adapter_config(adapter_dir)
    base = base_model or config.get("base_model") or config.get("model")
    if not base:
        raise ValueError(f"{adapter_dir}: gencls_config.json names no base model; pass base_model")
    info = model_provenance(str(base))
    info["base_model"] = str(base)
    return info


def log_model(run_id: str, adapter_dir: str | Path, labels_path: str | Path, strategy: str,
              base_model: str | None = None, demos_path: str | Path | None = None,
              input_text: str = "What is the capital of France?", artifact_path: str = "model",
              validate: bool = True, max_prompt_tokens: int = 384, seed: int = 0, batch_size: int = 16) -> Any:
    """Log the adapter as a pyfunc model in ``run_id`` (explicit signature, pip deps, an input example if `validate`).

    Args:
        run_id: MLflow run to log into.
        adapter_dir: PEFT adapter folder (checkpoints/<d>/rl).
        labels_path: the dataset's labels.yaml.
        strategy: inference strategy spec (perplexity decoding is used for probabilities).
        base_model: override the base named in the adapter's gencls_config.json.
        demos_path: JSONL demo pool, logged only when the strategy uses in-context examples.
        input_text: text of the input example.
        artifact_path: name of the model inside the run.
        validate: log an input example, which MLflow checks by loading the model and scoring it (~12 s for
            SmolLM2 on 2 cores; a failure there is only a warning). The registry's gate, which loads the
            registered model and scores the validation slice (raising on failure), makes it redundant.
        max_prompt_tokens, seed, batch_size: the prompt settings of the evaluation that measured the
            model; saved in model_config (with the label order) so serving builds the same prompts.

    Returns:
        The ModelInfo (``model_uri`` and ``model_id``).
    """
    import mlflow
    import pandas as pd

    from components.model.prompts import Strategy

    parsed = Strategy.parse(strategy)
    provenance = base_model_reference(adapter_dir, base_model)
    import yaml

    label_order = list(yaml.safe_load(Path(labels_path).read_text(encoding="utf-8")))
    model_config = {**provenance, "strategy": parsed.slug(), "device": "cpu", "max_prompt_tokens": int(max_prompt_tokens),
                    "seed": int(seed), "batch_size": int(batch_size), "label_order": label_order}
    staging = Path(tempfile.mkdtemp(prefix="gencls-adapter-"))
    for path in Path(adapter_dir).iterdir():  # the final adapter only: no trainer checkpoints, curves
        if path.is_file() and path.suffix not in (".png",) and path.name != "README.md":
            shutil.copy2(path, staging / path.name)
    artifacts = {"adapter": str(staging), "labels": str(labels_path)}
    if parsed.icl != "none" and demos_path:
        artifacts["demos"] = str(demos_path)
    extra = ("sentence-transformers",) if parsed.icl == "semantic" else ()
    from components.ops import tracking

    tracking.configure()  # the fluent API may still point at another store (tests, long-lived workers)
    try:
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")  # validate=False: on purpose
            return mlflow.pyfunc.log_model(
                name=artifact_path,
                python_model=GenclsClassifier(),
                artifacts=artifacts,
                model_config=model_config,
                code_paths=[str(PACKAGE_DIR)],
                pip_requirements=pip_requirements(extra),
                signature=signature(),
                input_example=pd.DataFrame({"text": [input_text]}) if validate else None,
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


PREDICT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}


def _read_table(path: Path) -> Any:
    """A CSV, JSONL or Parquet file as a DataFrame (ValueError naming the file otherwise)."""
    import pandas as pd

    kind = PREDICT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; expected .csv, .jsonl or .parquet")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except Exception as exc:  # pandas and pyarrow raise many unrelated types for a bad file
        raise ValueError(f"{path}: not readable as {kind} ({' '.join(str(exc).split())[:200]})") from None


def _write_table(frame: Any, path: Path) -> None:
    """Write `frame` in the format of `path`'s extension, atomically (tmp file + rename)."""
    kind = PREDICT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r}; expected .csv, .jsonl or .parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if kind == "csv":
        frame.to_csv(tmp, index=False)
    elif kind == "jsonl":
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def predict_file(model_uri: str, input_path: str | Path, output_path: str | Path, text_col: str = "text",
                 batch_size: int = 64, progress: bool = True) -> dict:
    """Classify every row of a CSV/JSONL/Parquet file with a registered model (as served).

    The output holds the input's columns plus `label` and one `prob_<label>` column per label.
    Rows are sent to the model's own `predict` (the code the scoring server runs) in chunks of
    `batch_size`, so labels equal the served model's. Bad input (unknown column, empty texts)
    raises ValueError naming the file and rows before the model loads; nothing is written then.

    Returns:
        {"rows", "output", "labels": counts per predicted label, "seconds"}.
    """
    import time

    import mlflow.pyfunc
    import pandas as pd
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.suffix.lower() not in PREDICT_FORMATS:
        raise ValueError(f"{output_path}: unsupported extension {output_path.suffix!r}; expected .csv, .jsonl or .parquet")
    frame = _read_table(input_path)
    if text_col not in frame.columns:
        raise ValueError(f"{input_path}: no column {text_col!r}; found {', '.join(map(str, frame.columns))} "
                         "(choose one with --text-col)")
    if frame.empty:
        raise ValueError(f"{input_path}: no rows to classify")
    texts = frame[text_col].tolist()
    bad = [i + 1 for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{input_path}: row(s) {', '.join(map(str, bad[:10]))}: column {text_col!r} must be a "
                         "non-empty text")
    size = max(1, min(int(batch_size), max_rows()))
    started = time.time()
    model = mlflow.pyfunc.load_model(model_uri)
    parts = []
    for start in tqdm(range(0, len(texts), size), desc=f"predict {input_path.name}", unit="batch",
                      disable=None if progress else True):  # None: a bar in a terminal, none in a file
        parts.append(model.predict(pd.DataFrame({"text": texts[start:start + size]})))
    result = pd.concat(parts, ignore_index=True)
    labels = sorted({label for probs in result["probs"] for label in probs})
    out = frame.copy()
    out["label"] = result["label"].tolist()
    for label in labels:
        out[f"prob_{label}"] = [float(probs.get(label, 0.0)) for probs in result["probs"]]
    _write_table(out, output_path)
    return {"rows": len(out), "output": str(output_path), "labels": out["label"].value_counts().to_dict(),
            "seconds": round(time.time() - started, 1)}
