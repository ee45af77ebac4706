from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from slimserve.compression.qat import export_config
from slimserve.compression.quantize import (
    GPTQConfig,
    Int4Config,
    QuantizationError,
    QuantizeConfig,
    method_config,
    quantize_variant,
)
from slimserve.models import VariantManifest, VariantRegistry, load_variant
from tests.tiny import make_tiny_variant
from tests.tiny_variants import shared_root, tiny_quantized, tiny_source

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])


@pytest.fixture
def registry(slimserve_home: Path) -> VariantRegistry:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "tiny", name="tiny", hidden=128)
    return registry


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared tiny variants (tests/tiny_variants.py): these tests only read them."""
    return shared_root(tmp_path_factory)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(PROMPT).logits.float()[0]


@pytest.mark.parametrize(("method", "bits"), [("bnb-int8", 8), ("bnb-nf4", 4), ("bnb-fp4", 4)])
def test_bnb_variant_is_registered_close_and_reloads_identically(
    registry: VariantRegistry, method: str, bits: int
) -> None:
    path = quantize_variant("tiny", QuantizeConfig(method=method, compute_dtype="fp32"), registry)
    manifest = VariantManifest.read(path)
    assert path == registry.variants_dir / f"tiny-{method}"
    assert (manifest.method, manifest.bits, manifest.base_model) == (method, bits, "tiny")
    assert "vllm" in manifest.runtimes
    assert manifest.size_bytes < VariantManifest.read(registry.variants_dir / "tiny").size_bytes

    reference = _logits(load_variant("tiny", dtype="fp32", registry=registry).model)
    reloaded = _logits(load_variant(path, dtype="fp32", registry=registry).model)
    similarity = torch.nn.functional.cosine_similarity(reference.flatten(), reloaded.flatten(), dim=0)
    assert similarity > (0.99 if bits == 8 else 0.9)

    # what was saved is exactly what quantizing in memory gives
    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=method.split("-")[1],
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=["lm_head"],
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    in_memory = AutoModelForCausalLM.from_pretrained(
        registry.variants_dir / "tiny", quantization_config=config, dtype=torch.float32, device_map="cpu"
    )
    torch.testing.assert_close(_logits(in_memory), reloaded)


def test_bad_requests_fail_before_writing_anything(registry: VariantRegistry, tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="bnb-nf4"):
        QuantizeConfig(method="int3-magic")
    with pytest.raises(QuantizationError, match="does not exist"):
        method_config("int4-gptq", calibration=str(tmp_path / "missing.txt"))
    with pytest.raises(QuantizationError, match="group-size"):
        method_config("int4-rtn", group_size=100)

    quantize_variant("tiny", QuantizeConfig(method="bnb-nf4"), registry)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_variant("tiny-bnb-nf4", QuantizeConfig(method="bnb-int8"), registry)
    with pytest.raises(QuantizationError, match="already exists"):
        quantize_variant("tiny", QuantizeConfig(method="bnb-nf4"), registry)


def test_a_failing_method_leaves_no_half_written_variant(registry: VariantRegistry) -> None:
    (registry.variants_dir / "tiny" / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, nothing may remain
        quantize_variant("tiny", QuantizeConfig(method="bnb-nf4"), registry)
    assert sorted(p.name for p in registry.variants_dir.iterdir()) == ["tiny"]


def test_int8_weight_is_compressed_tensors_and_runs_on_the_int8_kernel(root: Path) -> None:
    from slimserve.models.cpu_kernels import Int8WeightOnlyLinear

    path = tiny_quantized(root, "llama", "int8-weight")
    manifest = VariantManifest.read(path)
    assert (manifest.method, manifest.bits) == ("int8-weight", 8)
    config = (path / "config.json").read_text()
    assert '"quant_method": "compressed-tensors"' in config and '"pack-quantized"' in config

    float_model = load_variant(tiny_source(root, "llama"), dtype="fp32").model
    loaded = load_variant(path, dtype="fp32")
    fast = [m for m in loaded.model.modules() if isinstance(m, Int8WeightOnlyLinear)]
    assert len(fast) == 2 * 7  # every Linear of both layers; lm_head stays float by default
    assert not isinstance(loaded.model.lm_head, Int8WeightOnlyLinear)

    # the kernel computes exactly the dequantized matmul, and int8 per-channel stays close to float
    layer = loaded.model.model.layers[0].mlp.up_proj
    for rows in (3, 40):  # the fused kernel (few rows) and dequantize-then-GEMM (many) agree
        x = torch.randn(rows, layer.in_features)
        torch.testing.assert_close(layer(x), x @ layer.dequantized_weight().T, atol=1e-4, rtol=1e-4)
    original = float_model.model.layers[0].mlp.up_proj.weight
    assert (layer.dequantized_weight() - original).abs().max() <= original.abs().max() / 127
    similarity = torch.nn.functional.cosine_similarity(
        _logits(float_model).flatten(), _logits(loaded.model).flatten(), dim=0
    )
    assert similarity > 0.999


def test_int8_weight_can_quantize_the_tied_head_too(registry: VariantRegistry) -> None:
    from slimserve.models.cpu_kernels import Int8WeightOnlyLinear

    path = quantize_variant("tiny", QuantizeConfig(method="int8-weight", keep=[], name="tiny-all-int8"), registry)
    loaded = load_variant(path, dtype="bf16", registry=registry)
    assert isinstance(loaded.model.lm_head, Int8WeightOnlyLinear)
    assert loaded.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(loaded.model)).all()


def test_int8_dynamic_smooths_quantizes_activations_per_token_and_stays_close(root: Path) -> None:
    from slimserve.models.cpu_kernels import Int8DynamicLinear

    path = tiny_quantized(root, "llama", "int8-dynamic")
    manifest = VariantManifest.read(path)
    assert manifest.provenance["smoothquant"]["alpha"] == 0.5
    assert '"int-quantized"' in (path / "config.json").read_text()
    float_model = load_variant(tiny_source(root, "llama"), dtype="fp32").model
    loaded = load_variant(path, dtype="fp32")
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8DynamicLinear)]
    assert len(layers) == 2 * 7
    similarity = torch.nn.functional.cosine_similarity(
        _logits(float_model).flatten(), _logits(loaded.model).flatten(), dim=0
    )
    assert similarity > 0.99

    layer = layers[0]
    reference = lambda x: x @ layer.dequantized_weight().T  # noqa: E731
    one, many = torch.randn(1, layer.in_features), torch.randn(5, layer.in_features)
    # one row (fbgemm) and many rows (per-token int8 GEMM) both track the dequantized matmul
    for x in (one, many):
        error = (layer(x) - reference(x)).abs().max()
        assert error < 0.05 * reference(x).abs().max()
    # per-token: a row's result does not depend on the other rows of the call
    torch.testing.assert_close(layer(many)[1:2], layer(torch.cat([many[1:2], 100 * many[2:]]))[0:1])


def test_smoothing_alpha_is_validated() -> None:
    with pytest.raises(QuantizationError, match="smoothing-alpha"):
        method_config("int8-dynamic", smoothing_alpha=1.5)


def test_each_method_takes_its_own_options_and_names_an_option_of_another() -> None:
    assert type(method_config("int4-gptq")) is GPTQConfig and type(method_config("bnb-nf4")) is QuantizeConfig
    assert method_config("int8-dynamic").smoothing_alpha == 0.5
    assert method_config("int8-static").smoothing_alpha == 0.75
    with pytest.raises(QuantizationError, match=r"--damp does not apply to --method int8-weight \(only to int4-gptq\)"):
        method_config("int8-weight", damp=0.1)
    with pytest.raises(QuantizationError, match="--calibration-tokens does not apply to --method int4-rtn"):
        method_config("int4-rtn", calibration_tokens=512)
    with pytest.raises(QuantizationError, match="--group-size does not apply to --method bnb-nf4"):
        method_config("bnb-nf4", group_size=64)
    with pytest.raises(QuantizationError, match=r"unknown key.*group_sise"):
        method_config("int4-rtn", group_sise=64)
    with pytest.raises(QuantizationError, match="--method int4-gptq takes a GPTQConfig"):
        QuantizeConfig(method="int4-gptq")


def test_qat_exports_through_the_config_of_the_method_it_trained_for() -> None:
    assert method_config(**export_config("int8", 64)) == QuantizeConfig(method="int8-weight")
    exported = method_config(**export_config("int4", 64))
    assert isinstance(exported, Int4Config) and (exported.group_size, exported.clip_search) == (64, False)


def test_int8_static_uses_one_calibrated_scale_per_layer(root: Path) -> None:
    from slimserve.models.cpu_kernels import Int8StaticLinear

    path = tiny_quantized(root, "llama", "int8-static")
    assert VariantManifest.read(path).provenance["smoothquant"]["alpha"] == 0.75
    float_model = load_variant(tiny_source(root, "llama"), dtype="fp32").model
    loaded = load_variant(path, dtype="fp32")
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8StaticLinear)]
    assert len(layers) == 2 * 7 and all(float(m.input_scale) > 0 for m in layers)
    similarity = torch.nn.functional.cosine_similarity(
        _logits(float_model).flatten(), _logits(loaded.model).flatten(), dim=0
    )
    assert similarity > 0.95
    layer = layers[0]
    limit = 127 * float(layer.input_scale)
    x = torch.full((1, layer.in_features), 0.5 * limit)
    # inputs beyond the calibrated range are clipped: doubling an already-clipped input changes nothing
    torch.testing.assert_close(layer(4 * x), layer(8 * x))


@pytest.mark.parametrize("method", ["int4-gptq", "int4-rtn"])
def test_int4_is_group_wise_compressed_tensors_on_the_int4_kernel(root: Path, method: str) -> None:
    from slimserve.models.cpu_kernels import Int4WeightOnlyLinear

    path = tiny_quantized(root, "llama", method)
    manifest = VariantManifest.read(path)
    assert (manifest.bits, manifest.provenance["algorithm"]) == (
        4,
        "gptq" if method == "int4-gptq" else "round-to-nearest",
    )
    assert "vllm" in manifest.runtimes
    config = (path / "config.json").read_text()
    assert '"pack-quantized"' in config and '"group_size": 128' in config

    float_model = load_variant(tiny_source(root, "llama"), dtype="fp32").model
    loaded = load_variant(path, dtype="bf16")
    layers = [m for m in loaded.model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    assert len(layers) == 2 * 7
    layer = layers[0]
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    reference = x.float() @ layer.dequantized_weight().T
    assert (layer(x).float() - reference).abs().max() < 0.02 * reference.abs().max()
    logits = _logits(loaded.model)
    similarity = torch.nn.functional.cosine_similarity(_logits(float_model).flatten(), logits.flatten(), dim=0)
    assert similarity > 0.95
    # fp32 compute (evaluation) takes the dequantized path and agrees with the bf16 kernel
    in_fp32 = _logits(load_variant(path, dtype="fp32").model)
    assert torch.nn.functional.cosine_similarity(in_fp32.flatten(), logits.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("method", ["int8-weight", "int4-gptq"])
def test_int8_embedding_stores_one_table_for_embedding_and_head(root: Path, method: str) -> None:
    from safetensors import safe_open

    from slimserve.models.cpu_kernels import Int8TiedEmbedding, Int8WeightOnlyLinear

    path = tiny_quantized(root, "llama", method, embedding="int8")
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" not in keys and "lm_head.weight_packed" in keys
    manifest = VariantManifest.read(path)
    assert manifest.runtimes == ["slimserve-cpu-kernels"]
    assert manifest.size_bytes < VariantManifest.read(tiny_quantized(root, "llama", method)).size_bytes

    float_model = load_variant(tiny_source(root, "llama"), dtype="fp32").model
    loaded = load_variant(path, dtype="fp32").model
    assert isinstance(loaded.lm_head, Int8WeightOnlyLinear)
    embedding = loaded.get_input_embeddings()
    assert isinstance(embedding, Int8TiedEmbedding)
    ids = torch.tensor([[3, 50, 7]])
    original = float_model.get_input_embeddings()(ids)
    assert (embedding(ids) - original).abs().max() <= original.abs().max() / 127 + 1e-6
    similarity = torch.nn.functional.cosine_similarity(_logits(float_model).flatten(), _logits(loaded).flatten(), dim=0)
    assert similarity > (0.99 if method == "int8-weight" else 0.95)


def test_int8_embedding_is_refused_where_it_cannot_hold(registry: VariantRegistry) -> None:
    with pytest.raises(QuantizationError, match="weight-only"):
        quantize_variant("tiny", QuantizeConfig(method="bnb-nf4", embedding="int8"), registry)
    with pytest.raises(QuantizationError, match="keep lm_head"):
        QuantizeConfig(method="int8-weight", embedding="int8", keep=["lm_head"])
    untied = make_tiny_variant(registry.variants_dir / "untied", name="untied", hidden=128)
    text = (untied / "config.json").read_text().replace('"tie_word_embeddings": true', '"tie_word_embeddings": false')
    (untied / "config.json").write_text(text)
    with pytest.raises(QuantizationError, match="tied"):
        quantize_variant("untied", QuantizeConfig(method="int8-weight", embedding="int8"), registry)
    assert not [p for p in registry.variants_dir.iterdir() if p.name.startswith(("untied-", ".untied", "tiny-"))]


def test_the_one_row_int8_kernel_stays_exact_enough_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without VNNI, fbgemm sums pairs of u8 x s8 products in int16, which saturates for 8-bit activations
    (measured on an AVX2-only CPU: 11% of the output range off); 7-bit activations keep it within 2%."""
    import slimserve.models.cpu_kernels as kernels

    monkeypatch.setattr(kernels, "cpu_has_vnni", lambda: False)
    torch.manual_seed(0)
    weight = torch.randn(256, 128)
    scales = weight.abs().amax(dim=1, keepdim=True) / 127
    layer = kernels.Int8DynamicLinear(torch.round(weight / scales).to(torch.int8), scales, None)
    x = torch.randn(1, 128)
    reference = x @ layer.dequantized_weight().T
    assert (layer(x) - reference).abs().max() < 0.02 * reference.abs().max()


@pytest.mark.parametrize("native", [False, True])
def test_many_int8_rows_multiply_in_fp32_where_bf16_is_emulated(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """A prefill through int8 weight-only layers in bf16 multiplies in fp32 on a CPU without native bf16
    (1.9 s for 128 tokens of the int8 teacher in bf16 on an AVX2-only CPU), and in bf16 where it is native."""
    import slimserve.models.cpu_kernels as kernels

    monkeypatch.setattr(kernels, "native_bf16", lambda: native)
    torch.manual_seed(0)
    weight = torch.randn(256, 128)
    scales = weight.abs().amax(dim=1, keepdim=True) / 127
    layer = kernels.Int8WeightOnlyLinear(torch.round(weight / scales).to(torch.int8), scales, None)
    x = torch.randn(64, 128).to(torch.bfloat16)  # more rows than the fused kernel takes
    in_fp32 = torch.nn.functional.linear(x.float(), layer.dequantized_weight()).to(torch.bfloat16)
    in_bf16 = torch.nn.functional.linear(x, layer.weight_int8.to(torch.bfloat16) * scales.to(torch.bfloat16))
    assert not torch.equal(in_fp32, in_bf16)  # the two paths are told apart by their rounding
    assert torch.equal(layer(x), in_bf16 if native else in_fp32)
