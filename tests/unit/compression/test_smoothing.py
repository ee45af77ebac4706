from __future__ import annotations

import copy

import pytest
import torch

from slimserve.compression.smoothing import SmoothingError, activation_maxima, smooth_llama
from tests.tiny import tiny_model


def test_smoothing_leaves_the_float_model_unchanged_and_flattens_activations() -> None:
    model = tiny_model(300, layers=2, hidden=64).float()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied, so it is smoothed too
    model.config.tie_word_embeddings = False
    with torch.no_grad():  # an outlier channel, as real LLMs have
        model.model.layers[0].input_layernorm.weight[3] = 40.0
    ids = torch.randint(0, 300, (256,))
    before = activation_maxima(model, ids, window=64)
    smoothed = copy.deepcopy(model)
    assert smooth_llama(smoothed, before, alpha=0.5) == 2 * 7 + 1
    probe = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(smoothed(probe).logits, model(probe).logits, atol=2e-4, rtol=2e-4)
    after = activation_maxima(smoothed, ids, window=64)
    name = "model.layers.0.self_attn.q_proj"
    spread = lambda a: float(a.max() / a.median())  # noqa: E731
    assert spread(after[name]) < spread(before[name]) / 2


def test_smoothing_rejects_unknown_architectures() -> None:
    class NotADecoder(torch.nn.Module):
        config = tiny_model(300).config

    with pytest.raises(SmoothingError, match="Llama-style"):
        smooth_llama(NotADecoder(), {}, alpha=0.5)
