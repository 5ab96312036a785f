"""A tiny Llama-shaped causal LM with a real chat-template tokenizer, built from a config.

Unit tests train and decode with it in well under a second per step. It has the same
architecture and chat format as SmolLM2 (ChatML `<|im_start|>` / `<|im_end|>`), so code
that works on it works on the real model.

    python -c "from components.model.tiny_model import build_tiny_model; print(build_tiny_model('/tmp/tiny'))"
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

# SmolLM2-Instruct's chat template (ChatML), without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_BASE_CORPUS = [
    "Classify the text into exactly one of these categories: positive, negative, uncertain.",
    "Category definitions: Reply with the category only. If you cannot tell, reply uncertain.",
    "First think briefly inside <think> and </think>, then give the category alone on the last line.",
    "You are a precise text classifier. Text: Category: Examples: 0 1 2 3 4 5 6 7 8 9 10 11 12",
    "The text fits the definition of what who where when how why number location human entity",
    "system user assistant ham spam sports business politics tech entertainment good bad movie",
]


def build_tokenizer(texts: Iterable[str] = (), vocab_size: int = 600):
    """Train a byte-level BPE tokenizer on `texts` plus prompt boilerplate.

    Returns:
        A transformers PreTrainedTokenizerFast with ChatML special tokens and chat template;
        pad token = eos token = `<|im_end|>` (as in SmolLM2-Instruct).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(_BASE_CORPUS) + list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str] = (),
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised tiny LlamaForCausalLM + tokenizer to `out_dir`.

    Args:
        out_dir: destination folder (created).
        texts: extra texts to fit the tokenizer to (e.g. a fixture dataset).
        hidden_size: model width (32-64 keeps a training step in milliseconds).
        num_layers: decoder layers.
        seed: torch seed for the random weights.

    Returns:
        out_dir, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
