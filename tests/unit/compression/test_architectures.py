"""Every architecture of the tiny matrix through the compression methods."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.compression.quantize import QuantizationError, QuantizeConfig, quantize_variant
from slimserve.models import VariantManifest, VariantRegistry
from slimserve.models.cpu_kernels import Int8TiedEmbedding, Int8WeightOnlyLinear, tie_int8_embedding
from tests.tiny import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_int8_table_reproduces_the_embedding_it_replaces(arch: str) -> None:
    """Gemma 3 multiplies looked-up rows by sqrt(hidden size); the shared int8 table must too."""
    model = tiny_model(300, arch=arch)
    head = model.get_output_embeddings()
    scales = head.weight.abs().amax(dim=1) / 127
    int8 = Int8WeightOnlyLinear(torch.round(head.weight / scales[:, None]).to(torch.int8), scales, None)
    ids = torch.tensor([[3, 50, 7, 299]])
    with torch.no_grad():
        original = model.get_input_embeddings()(ids)
        model.lm_head = int8
        tie_int8_embedding(model, torch.float32)
        assert isinstance(model.get_input_embeddings(), Int8TiedEmbedding)
        served = model.get_input_embeddings()(ids)
    # int8 per row: each value within half a step of its row's scale, times the embedding's own factor
    assert (served - original).abs().max() <= original.abs().max() / 127


def _olmo2_variant(registry: VariantRegistry) -> None:
    """A tiny OLMo 2: its norms follow attention and MLP (post-norm), a placement SmoothQuant has no rule for."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from tests.tiny import tiny_tokenizer

    directory = registry.variants_dir / "olmo2"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = Olmo2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    Olmo2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    VariantManifest("olmo2", "olmo2", "none", 32, 1, 1, "float32").write(directory)


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-static"])
def test_smoothing_refuses_an_architecture_it_has_no_rules_for_before_writing(
    slimserve_home: Path, method: str
) -> None:
    registry = VariantRegistry()
    _olmo2_variant(registry)
    with pytest.raises(QuantizationError, match=r"no rules for Olmo2ForCausalLM \(model_type 'olmo2'\)"):
        quantize_variant("olmo2", QuantizeConfig(method=method, calibration_tokens=256), registry)
    assert [p.name for p in registry.variants_dir.iterdir()] == ["olmo2"]  # not even a staging directory


def test_the_int8_table_takes_the_scale_of_known_embeddings_and_refuses_others() -> None:
    from slimserve.models.cpu_kernels import embedding_scale

    assert embedding_scale(tiny_model(300, arch="llama").get_input_embeddings()) == 1.0
    assert embedding_scale(tiny_model(300, arch="gemma3").get_input_embeddings()) == pytest.approx(64**0.5)

    class Odd(torch.nn.Embedding):  # an embedding that may compute anything
        pass

    with pytest.raises(ValueError, match=r"Odd is neither nn\.Embedding nor a known scaled embedding"):
        embedding_scale(Odd(4, 4))
