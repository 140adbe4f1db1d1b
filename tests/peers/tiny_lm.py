"""A tiny, randomly initialised Qwen2 causal LM and a word-level tokenizer, built locally (no download),
saved with ``save_pretrained`` so that TRL can reload the reference model by path."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "the a cat dog sat on mat ran fast slow big small red blue green one two three".split()
SPECIAL = ["<pad>", "<eos>", "<unk>"]


def build(directory: Path, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> tuple[Path, object]:
    """(path, tokenizer): a Qwen2ForCausalLM of about 28k parameters and its tokenizer, both saved in
    ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {word: i for i, word in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory, tokenizer
