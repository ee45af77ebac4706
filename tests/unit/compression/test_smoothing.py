from __future__ import annotations

import copy

import pytest
import torch

from slimserve.compression.smoothing import (
    NORM_PLACEMENTS,
    SmoothingError,
    activation_maxima,
    check_unchanged,
    smooth_model,
)
from tests.tiny import ARCHITECTURES, tiny_model


def _untied(arch: str) -> torch.nn.Module:
    model = tiny_model(300, layers=2, hidden=64, arch=arch).float()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied, so it is smoothed too
    model.config.tie_word_embeddings = False
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_smoothing_leaves_the_float_model_unchanged_and_flattens_activations(arch: str) -> None:
    model = _untied(arch)
    first = model.model.layers[0]
    qkv = "self_attn.qkv_proj" if arch == "phi3" else "self_attn.q_proj"
    with torch.no_grad():  # an outlier channel, as real LLMs have (Gemma's norm scales by 1 + w)
        first.input_layernorm.weight[3] = 40.0
    ids = torch.randint(0, 300, (256,), generator=torch.Generator().manual_seed(0))
    before = activation_maxima(model, ids, window=64)
    smoothed = copy.deepcopy(model)
    per_layer = 4 if arch == "phi3" else 7  # Phi-3's q/k/v and gate/up are one Linear each
    assert smooth_model(smoothed, before, alpha=0.5) == 2 * per_layer + 1
    probe = torch.arange(3, 27).unsqueeze(0)  # longer than the sliding windows
    with torch.no_grad():
        torch.testing.assert_close(smoothed(probe).logits, model(probe).logits, atol=2e-4, rtol=2e-4)
    after = activation_maxima(smoothed, ids, window=64)
    name = f"model.layers.0.{qkv}"
    spread = lambda a: float(a.max() / a.median())  # noqa: E731
    assert spread(after[name]) < spread(before[name]) / 2


def test_value_biases_are_scaled_with_their_rows() -> None:
    """Qwen2's v_proj has a bias: o_proj's input channel is v's output plus its bias, so both take 1/s."""
    model = _untied("qwen2")
    v = model.model.layers[0].self_attn.v_proj
    assert v.bias is not None and v.bias.abs().min() > 0
    bias = v.bias.detach().clone()
    smooth_model(model, activation_maxima(model, torch.arange(3, 200), window=64), alpha=0.5)
    assert not torch.allclose(v.bias, bias)


def test_gemma_norms_are_smoothed_through_their_unit_offset() -> None:
    """Gemma's norm multiplies by (1 + w): the smoothed gain is (1 + w) / s, never w / s."""
    model = _untied("gemma3")
    norm, q = model.model.layers[0].input_layernorm, model.model.layers[0].self_attn.q_proj
    gain, columns = 1 + norm.weight.detach().clone(), q.weight.detach().clone()
    smooth_model(model, activation_maxima(model, torch.arange(3, 200), window=64), alpha=0.5)
    s = q.weight[0] / columns[0]  # what q's columns were multiplied by
    torch.testing.assert_close(1 + norm.weight, gain / s)
    # capped where 1 + w' would near 0: stored in bf16 (relative to |w'|), it keeps its error within two steps
    assert ((1 + norm.weight).abs() >= 1 / 3 - 1e-6).all()


def test_smoothing_refuses_architectures_without_rules() -> None:
    class NotADecoder(torch.nn.Module):
        config = copy.deepcopy(tiny_model(300).config)

    NotADecoder.config.model_type = "gpt2"
    with pytest.raises(SmoothingError, match=r"no rules for NotADecoder \(model_type 'gpt2'\)"):
        smooth_model(NotADecoder(), {}, alpha=0.5)
    assert set(NORM_PLACEMENTS) >= {"llama", "qwen2", "gemma3_text", "mistral", "phi3"}


def test_a_smoothing_that_moves_the_logits_is_caught() -> None:
    before = torch.randn(2, 5, 30)
    check_unchanged(before, before + 1e-6, "Tiny")
    with pytest.raises(SmoothingError, match="changed Tiny's float logits"):
        check_unchanged(before, before * 1.1, "Tiny")
