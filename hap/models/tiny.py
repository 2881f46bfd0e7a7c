"""Tiny random models built from a config in code, for tests and quick trials.

``tiny-llama`` (GQA: 4 query heads in 2 key/value groups) and ``tiny-gpt2``
are seeded, so the same name always gives the same weights. Their tokenizer is
word-level and built in code from ``tiny_vocab``: nothing is downloaded.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..settings import TINY_MODELS  # noqa: F401 (re-exported)
from .tiny_vocab import tiny_vocabulary


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace/punctuation split, one token per known word."""
    vocab = {word: i for i, word in enumerate(tiny_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )


def tiny_config(name: str, vocab_size: int, special: dict[str, int]) -> GPT2Config | LlamaConfig:
    """The transformers config of a tiny model (small enough for a CPU unit test)."""
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **special,
        )
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=64, n_layer=3, n_head=4, **special)
    raise KeyError(name)


def build_tiny_model(name: str, seed: int = 0) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A seeded random tiny model and its tokenizer; the global RNG is left untouched."""
    tokenizer = tiny_tokenizer()
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = tiny_config(name, len(tokenizer), special)
    model_class = LlamaForCausalLM if name == "tiny-llama" else GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model, tokenizer
