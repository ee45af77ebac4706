"""What a variant is: the `manifest.json` that makes a variant directory self-describing."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"


class ManifestError(ValueError):
    """A manifest is missing, unreadable or names fields it should not."""


@dataclass
class VariantManifest:
    """How a variant was made and what it measured.

    Figures carry their unit in the key (`size_bytes`, `ttft_ms`, ...) so a reader needs no schema.
    """

    name: str
    """Registry name, also the `model` id clients send."""
    base_model: str
    """The teacher this variant descends from (its own name for the teacher itself)."""
    method: str
    """How it was made: `none`, `bnb-int8`, `bnb-nf4`, `distill`, ..."""
    bits: int
    """Bits per weight of the linear layers (32 for fp32, 16 for bf16, 8, 4)."""
    parameters: int
    """Number of parameters, counting tied weights once."""
    size_bytes: int
    """Bytes of weight files on disk."""
    dtype: str
    """Storage dtype of the unquantized tensors (`float32`, `bfloat16`)."""
    family: str = ""
    """The family of variants this one belongs to; defaults to `base_model`."""
    runtimes: list[str] = field(default_factory=lambda: ["transformers"])
    """Runtimes that can load the directory as written (`transformers`, `vllm`)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Measured figures (perplexity, kl_to_teacher, decode_tok_s_b1, ...), filled by `slimserve eval`."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """The recipe or command that made it, the source file, tool versions."""
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def __post_init__(self) -> None:
        if not self.name:
            raise ManifestError("manifest: 'name' must not be empty")
        if self.bits <= 0:
            raise ManifestError(f"manifest {self.name!r}: 'bits' must be positive, got {self.bits}")
        if not self.family:
            self.family = self.base_model

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantManifest:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"manifest: unknown field(s) {unknown}; known fields are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a required field is missing
            raise ManifestError(f"manifest: {exc}") from exc

    @classmethod
    def read(cls, directory: Path) -> VariantManifest:
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{directory} is not a variant directory: no {MANIFEST_FILE}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path


def weights_size_bytes(directory: Path) -> int:
    """Bytes of weight files (safetensors or torch bins) in a variant directory."""
    directory = Path(directory)
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in {".safetensors", ".bin"})


CONFIG_FILE = "config.json"

BITS_BY_DTYPE = {"float32": 32, "bfloat16": 16, "float16": 16}


def describe_directory(directory: Path, name: str | None = None) -> VariantManifest:
    """A manifest for a plain Hugging Face directory (config.json, safetensors weights, tokenizer) that has
    none: what its files say, measured nothing. Pickled (`.bin`) weights are refused: loading them runs code."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ManifestError(f"{directory} is neither a variant directory nor a Hugging Face model: no {CONFIG_FILE}")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (it has {', '.join(pickled)}: pickled weights are never loaded; save them as safetensors)"
        raise ManifestError(f"{directory} holds no *.safetensors weights{hint if pickled else ''}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{config_path} is not valid JSON: {exc}") from exc
    text_config = config.get("text_config") or {}
    dtype = str(config.get("dtype") or config.get("torch_dtype") or text_config.get("dtype") or "float32")
    quantization = config.get("quantization_config") or {}
    bits = int(quantization.get("bits") or BITS_BY_DTYPE.get(dtype, 32))
    name = name or directory.resolve().name.lower()
    return VariantManifest(
        name=name,
        base_model=name,
        method=str(quantization.get("quant_method") or "none"),
        bits=bits,
        parameters=_safetensors_parameters(weights),
        size_bytes=weights_size_bytes(directory),
        dtype=dtype,
        provenance={"source": str(directory.resolve()), "architectures": config.get("architectures") or []},
    )


def _safetensors_parameters(files: list[Path]) -> int:
    """Parameters stored in safetensors files, from their headers (nothing is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle is not a mapping)
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total
