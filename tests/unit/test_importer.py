"""Bring your own model: a plain Hugging Face directory is served as it is and registered by `slimserve import`;
whatever cannot be loaded safely is refused before anything is registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimserve.cli import main
from slimserve.models import ManifestError, VariantRegistry, load_variant
from slimserve.models.gguf import tokenizer_flags
from slimserve.models.importer import import_model
from tests.tiny import tiny_model, tiny_tokenizer


def _plain_directory(directory: Path, arch: str = "gemma3") -> Path:
    """What a user brings: weights, config and tokenizer as transformers saves them; no manifest."""
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer), arch=arch).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_plain_directory_is_served_as_it_is(tmp_path: Path) -> None:
    directory = _plain_directory(tmp_path / "My-Gemma")
    variant = VariantRegistry(tmp_path / "home").resolve(directory)
    assert variant.manifest.name == "my-gemma" and variant.manifest.bits == 32
    expected = sum(p.numel() for p in tiny_model(len(tiny_tokenizer()), arch="gemma3").parameters())
    assert variant.manifest.parameters == expected  # counted from the safetensors headers, tied table once
    loaded = load_variant(directory, dtype="fp32")
    assert loaded.model.config.model_type == "gemma3_text"
    assert not (directory / "manifest.json").exists()  # served as it is: nothing written into the user's folder


def test_import_registers_a_copy_with_its_manifest(tmp_path: Path) -> None:
    directory = _plain_directory(tmp_path / "src", arch="qwen2")
    registry = VariantRegistry(tmp_path / "home")
    variant = import_model(directory, name="my-qwen", registry=registry)
    assert variant.path == registry.variants_dir / "my-qwen"
    assert [v.name for v in registry.list()] == ["my-qwen"]
    manifest = json.loads((variant.path / "manifest.json").read_text())
    assert manifest["base_model"] == manifest["family"] == "my-qwen"
    assert manifest["provenance"]["source"] == str(directory.resolve())
    with torch.inference_mode():
        ours = load_variant(variant.path, dtype="fp32").model(torch.tensor([[5, 6, 7]])).logits
        theirs = load_variant(directory, dtype="fp32").model(torch.tensor([[5, 6, 7]])).logits
    assert torch.equal(ours, theirs)


def test_import_refuses_pickled_weights_and_remote_code_and_registers_nothing(tmp_path: Path) -> None:
    registry = VariantRegistry(tmp_path / "home")
    pickled = _plain_directory(tmp_path / "pickled", arch="llama")
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ManifestError, match="pickled weights are never loaded"):
        import_model(pickled, registry=registry)

    remote = _plain_directory(tmp_path / "remote", arch="llama")
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "m.Model"}}))
    with pytest.raises(ManifestError, match="remote code"):
        import_model(remote, registry=registry)
    assert registry.list() == []
    assert [p.name for p in registry.variants_dir.iterdir()] == []  # no staging left behind


def test_import_keeps_an_existing_variant_unless_told_to_overwrite(tmp_path: Path) -> None:
    registry = VariantRegistry(tmp_path / "home")
    directory = _plain_directory(tmp_path / "src", arch="llama")
    import_model(directory, name="mine", registry=registry)
    with pytest.raises(FileExistsError, match="--overwrite"):
        import_model(directory, name="mine", registry=registry)
    import_model(directory, name="mine", registry=registry, overwrite=True)
    assert [v.name for v in registry.list()] == ["mine"]


def test_import_command_reports_bad_input_and_names(
    tmp_path: Path, slimserve_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["import", str(tmp_path / "missing")]) == 2
    assert "no model at" in capsys.readouterr().err
    directory = _plain_directory(tmp_path / "src", arch="mistral")
    assert main(["import", str(directory), "--name", "Bad/Name"]) == 2
    assert "variant name" in capsys.readouterr().err
    assert main(["import", str(directory), "--name", "tiny-mistral"]) == 0
    assert "imported tiny-mistral" in capsys.readouterr().out
    assert (slimserve_home / "variants" / "tiny-mistral" / "manifest.json").is_file()


def test_gguf_tokenizer_flags_are_read_from_the_file(tmp_path: Path) -> None:
    """transformers' GGUF loader drops `add_bos_token`; the converter reads it from the file itself."""
    from gguf import GGUFWriter

    path = tmp_path / "flags.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert tokenizer_flags(path) == {"add_bos_token": True, "add_eos_token": False}
