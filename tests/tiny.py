"""Tiny randomly initialised Llama variants, built in seconds inside the tests (no download, no GGUF)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from slimserve.models.manifest import VariantManifest, weights_size_bytes

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Count from one to ten: one two three four five six seven eight nine ten.",
    "def add(a, b):\n    return a + b\n",
    "A quick brown fox jumps over the lazy dog, again and again.",
    "Hello! How can I help you today? I am a helpful assistant.",
] * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: any text encodes, special tokens as in SmolLM2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(
    vocab_size: int, layers: int = 2, hidden: int = 64, seed: int = 0, context: int = 256
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(config)
    # random init gives near-uniform logits; sharpen them so greedy decoding has clear winners
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def make_tiny_variant(
    directory: Path, name: str = "tiny-llama", layers: int = 2, hidden: int = 64, seed: int = 0, context: int = 256
) -> Path:
    """Write a complete variant directory (weights, config, tokenizer, manifest) and return it."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), layers=layers, hidden=hidden, seed=seed, context=context)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    VariantManifest(
        name=name,
        base_model=name,
        method="none",
        bits=32,
        parameters=sum(p.numel() for p in model.parameters()),
        size_bytes=weights_size_bytes(directory),
        dtype="float32",
    ).write(directory)
    return directory
