"""Every quantization method on every tiny architecture: it matches the float model within its bound, or it
refuses before writing anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from slimserve.compression.quantize import METHODS, QuantizationError, method_config, quantize_variant
from slimserve.models import VariantManifest, VariantRegistry, load_variant
from slimserve.models.cpu_kernels import Int8TiedEmbedding, Int8WeightOnlyLinear, tie_int8_embedding
from tests.tiny import ARCHITECTURES, tiny_model
from tests.tiny_variants import shared_root, tiny_quantized, tiny_source

# two prompts longer than the sliding window of Mistral and Gemma 3, and one of random tokens
PROMPTS = torch.stack(
    [
        torch.arange(3, 27),
        torch.arange(100, 124),
        torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(0)),
    ]
)

BOUNDS = {
    "int8-weight": (0.05, 0.95),
    "int8-dynamic": (0.05, 0.95),
    "bnb-int8": (0.05, 0.95),
    "int8-static": (0.15, 0.95),
    "int4-gptq": (0.4, 0.85),
    "int4-rtn": (0.4, 0.85),
    "bnb-nf4": (0.4, 0.85),
    "bnb-fp4": (0.4, 0.85),
}
"""Per method: the largest logit change as a share of the float model's largest logit, and the lowest top-1
agreement on `PROMPTS`. Measured on these models: 8-bit at most 0.02 (static 0.08), 4-bit at most 0.29 (Gemma 3,
whose (1 + w) norms amplify weight error), agreement at least 0.93. Smoothing written for Llama's norms moved
Qwen2's logits by 0.21 and Gemma 3's by 0.34 of their range before any rounding."""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_root(tmp_path_factory)


def _logits(path: Path) -> torch.Tensor:
    with torch.inference_mode():
        return load_variant(path, dtype="fp32").model(PROMPTS).logits.float()


def test_every_method_has_a_bound() -> None:
    assert set(BOUNDS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_method_matches_the_float_model_on_every_architecture(root: Path, arch: str, method: str) -> None:
    if method.startswith("bnb-") and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    path = tiny_quantized(root, arch, method)
    reference, quantized = _logits(tiny_source(root, arch)), _logits(path)
    moved, agreement = BOUNDS[method]
    assert float((quantized - reference).abs().max()) <= moved * float(reference.abs().max())
    assert float((quantized.argmax(-1) == reference.argmax(-1)).float().mean()) >= agreement
    guard = VariantManifest.read(path).provenance["guard"]  # the registration check ran and passed
    assert guard["source"] == arch and guard["top1_agreement"] >= guard["min_top1_agreement"]


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


def test_an_int8_table_variant_of_gemma3_stays_close_end_to_end(root: Path) -> None:
    path = tiny_quantized(root, "gemma3", "int8-weight", embedding="int8")
    loaded = load_variant(path, dtype="fp32").model
    assert isinstance(loaded.get_input_embeddings(), Int8TiedEmbedding)
    reference, quantized = _logits(tiny_source(root, "gemma3")), _logits(path)
    assert float((quantized - reference).abs().max()) <= 0.05 * float(reference.abs().max())


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
        quantize_variant("olmo2", method_config(method, calibration_tokens=256), registry)
    assert [p.name for p in registry.variants_dir.iterdir()] == ["olmo2"]  # not even a staging directory


def test_the_int8_table_takes_the_scale_of_known_embeddings_and_refuses_others() -> None:
    from slimserve.models.cpu_kernels import embedding_scale

    assert embedding_scale(tiny_model(300, arch="llama").get_input_embeddings()) == 1.0
    assert embedding_scale(tiny_model(300, arch="gemma3").get_input_embeddings()) == pytest.approx(64**0.5)

    class Odd(torch.nn.Embedding):  # an embedding that may compute anything
        pass

    with pytest.raises(ValueError, match=r"Odd is neither nn\.Embedding nor a known scaled embedding"):
        embedding_scale(Odd(4, 4))
