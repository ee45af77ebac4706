"""Tiny randomly initialised models of several architectures, built in seconds inside the tests (no download,
no GGUF): Llama, Qwen2 with non-zero q/k/v biases, Gemma 3 (sliding and global layers, a scaled embedding,
(1 + w) norms), Mistral with a sliding window and Phi-3 (q/k/v and gate/up fused in the checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

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


ARCHITECTURES = ("llama", "qwen2", "gemma3", "mistral", "phi3")
"""Every architecture `tiny_model` builds; tests that must hold for any causal LM run over all of them."""

SLIDING_WINDOW = 8
"""The tiny sliding-window models attend to this many tokens, so a test prompt of a few dozen exceeds it."""


def _config(
    arch: str, vocab_size: int, layers: int, hidden: int, context: int = 256
) -> tuple[type[PreTrainedModel], object]:
    common = dict(
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
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(**common)
    if arch == "mistral":
        return MistralForCausalLM, MistralConfig(**common, sliding_window=SLIDING_WINDOW)
    if arch == "phi3":
        return Phi3ForCausalLM, Phi3Config(**common)
    if arch == "gemma3":
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        config = Gemma3TextConfig(
            **common,
            head_dim=hidden // 4,
            query_pre_attn_scalar=hidden // 4,
            sliding_window=SLIDING_WINDOW,
            layer_types=layer_types,
        )
        return Gemma3ForCausalLM, config
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


def tiny_model(
    vocab_size: int, layers: int = 2, hidden: int = 64, seed: int = 0, arch: str = "llama", context: int = 256
) -> PreTrainedModel:
    """A random `arch` model whose weights are not the neutral init: biases, norm weights and the head are
    perturbed, so a method that mishandles any of them changes the output."""
    torch.manual_seed(seed)
    model_class, config = _config(arch, vocab_size, layers, hidden, context)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # zero biases and unit norms would hide their handling
                param.add_(torch.randn_like(param) * 0.2)
        # random init gives near-uniform logits; sharpen them so greedy decoding has clear winners
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def make_tiny_variant(
    directory: Path,
    name: str = "tiny-llama",
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    arch: str = "llama",
    context: int = 256,
) -> Path:
    """Write a complete variant directory (weights, config, tokenizer, manifest) and return it."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), layers=layers, hidden=hidden, seed=seed, arch=arch, context=context)
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
