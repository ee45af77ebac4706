"""What one post-training quantization run is asked to do (`QuantizeConfig`, with one subclass per method
family that has options of its own), what every method provides (`QuantMethod`), and the calibration
tokens they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from slimserve.compression.data import read_text, train_texts
from slimserve.models.loader import parse_dtype
from slimserve.models.registry import RegisteredVariant


class QuantizationError(ValueError):
    """A quantization request that cannot be honoured; raised before any file is written."""


@dataclass
class QuantizeConfig:
    """One post-training quantization run: the options every method takes. A method with options of its own
    has a subclass (`QuantMethod.config`: `W8A8DynamicConfig`, `W8A8StaticConfig`, `Int4Config`,
    `GPTQConfig`); `int8-weight` and `bnb-*` take this class as it is. `method_config` (or
    `configs.from_mapping`) builds the method's class and names any option that belongs to another method."""

    choice_field: ClassVar[str] = "method"
    """The field whose value picks the config class (`configs.chosen_class`)."""

    method: str
    """The quantization method (`METHODS`); the options only some methods take are grouped below."""
    name: str | None = None
    """Registry name of the result; default `<source>-<method>`."""
    keep: list[str] | None = None
    """Module names kept in high precision; default `lm_head` (none with `embedding="int8"`)."""
    embedding: str = "float"
    """`float`: the embedding table stays in `compute_dtype` (tied to a float head, the portable form);
    `int8`: one int8 table with a scale per row serves as both the embedding and the output head (a
    quarter of the fp32 size; only slimserve's loader reads it; weight-only methods)."""
    compute_dtype: str = "bf16"
    """Dtype the dequantized matmuls run in."""

    @classmethod
    def choices(cls) -> dict[str, type[QuantizeConfig]]:
        """Each method's config class."""
        from slimserve.compression.quantize import METHODS

        return {name: method.config for name, method in METHODS.items()}

    def __post_init__(self) -> None:
        from slimserve.compression.quantize import INT8_EMBEDDING_METHODS, METHODS

        if self.method not in METHODS:
            raise QuantizationError(f"unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        wanted = METHODS[self.method].config
        if type(self) is not wanted:
            raise QuantizationError(
                f"--method {self.method} takes a {wanted.__name__}, not a {type(self).__name__} "
                "(`method_config` picks the class)"
            )
        if self.embedding not in ("float", "int8"):
            raise QuantizationError(f"--embedding must be 'float' or 'int8', got {self.embedding!r}")
        if self.embedding == "int8" and self.method not in INT8_EMBEDDING_METHODS:
            raise QuantizationError(
                f"--embedding int8 needs a weight-only method ({', '.join(INT8_EMBEDDING_METHODS)}), not {self.method}"
            )
        if self.embedding == "int8" and "lm_head" in (self.keep or []):
            raise QuantizationError("--embedding int8 stores the output head in int8: do not --keep lm_head")
        parse_dtype(self.compute_dtype)

    @property
    def kept(self) -> list[str]:
        """Module names left in high precision."""
        if self.keep is not None:
            return list(self.keep)
        return ["lm_head"] if self.embedding == "float" else []


@dataclass
class CalibrationConfig(QuantizeConfig):
    """The calibration text of the methods that calibrate (a base, not a method's config)."""

    calibration: str | None = None
    """Text file for calibration; default: the training split of Python's `pydoc_data` topics."""
    calibration_tokens: int = 8192
    """Tokens of calibration text used by methods that calibrate."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calibration_tokens < 256:
            raise QuantizationError(f"--calibration-tokens must be at least 256, got {self.calibration_tokens}")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise QuantizationError(f"calibration file {self.calibration} does not exist")


@dataclass
class W8A8DynamicConfig(CalibrationConfig):
    """int8-dynamic: SmoothQuant on calibration text, then int8 weights and per-token int8 activations."""

    smoothing_alpha: float = 0.5
    """SmoothQuant migration strength (0: none into the weights, 1: all)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.smoothing_alpha < 1.0:
            raise QuantizationError(f"--smoothing-alpha must be in (0, 1), got {self.smoothing_alpha}")


@dataclass
class W8A8StaticConfig(W8A8DynamicConfig):
    """int8-static: as int8-dynamic, with one activation scale per layer fixed from calibration."""

    smoothing_alpha: float = 0.75
    """SmoothQuant migration strength (0: none into the weights, 1: all); static scales do best with more
    (the best of 0.3-0.9 on the default teacher)."""
    activation_quantile: float = 1.0
    """int8-static: the layer's scale covers this quantile of per-token input maxima; larger values clip."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.5 <= self.activation_quantile <= 1.0:
            raise QuantizationError(f"--activation-quantile must be in [0.5, 1], got {self.activation_quantile}")


@dataclass
class Int4Config(QuantizeConfig):
    """int4-rtn: group-wise int4 weights rounded to nearest (no calibration)."""

    group_size: int = 128
    """Weights per quantization group for group-wise 4-bit methods (halved for layers it does not divide)."""
    clip_search: bool = True
    """int4: per group, shrink the min..max range (down to 0.75x) where that lowers the rounding error."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size not in (32, 64, 128, 256):
            raise QuantizationError(f"--group-size must be 32, 64, 128 or 256, got {self.group_size}")


@dataclass
class GPTQConfig(CalibrationConfig, Int4Config):
    """int4-gptq: group-wise int4 weights chosen by GPTQ on calibration text (compression/gptq.py)."""

    damp: float = 0.01
    """GPTQ: Hessian dampening as a fraction of its mean diagonal."""
    act_order: bool = True
    """GPTQ: visit columns by decreasing Hessian diagonal, with each group's grid fixed beforehand (lower
    perplexity than column order on the default teacher)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.damp < 1.0:
            raise QuantizationError(f"--damp must be in (0, 1), got {self.damp}")


def method_config(method: str, **options: Any) -> QuantizeConfig:
    """The config of `method` with `options`; an option of another method is an error naming it."""
    from slimserve.configs import ConfigError, from_mapping

    try:
        config: QuantizeConfig = from_mapping(QuantizeConfig, {"method": method, **options})
    except ConfigError as exc:
        raise QuantizationError(str(exc)) from exc
    return config


class QuantMethod(Protocol):
    name: str
    bits: int
    runtimes: list[str]
    """Runtimes that load what `apply` writes."""
    config: type[QuantizeConfig]
    """The class of this method's options; `check` and `apply` are given one of it."""

    def check(self, model: Any, config: Any) -> None:
        """Raise `QuantizationError` if this method cannot be applied correctly to `model` (a skeleton on the
        meta device: structure, no weights)."""
        ...

    def apply(self, source: RegisteredVariant, staging: Path, config: Any) -> dict[str, Any]:
        """Write the quantized model (weights + config) into `staging`; return provenance details."""
        ...


CALIBRATION_SEQUENCE = 512
"""Tokens per calibration sequence fed through the model."""


def calibration_text(config: CalibrationConfig) -> str:
    return read_text(config.calibration) if config.calibration else "\n\n".join(train_texts())


def calibration_ids(tokenizer: Any, config: CalibrationConfig) -> torch.Tensor:
    """The first `calibration_tokens` token ids (T,) of the calibration text.

    Only as much text as those tokens need is tokenised (the whole default text takes seconds); a prefix's
    last token may be cut, so a few more are asked for than kept."""
    text = calibration_text(config)
    wanted = config.calibration_tokens + 16
    chars = 8 * wanted
    while True:
        ids = tokenizer(text[:chars], return_tensors="pt")["input_ids"][0]
        if ids.numel() >= wanted or chars >= len(text):
            return ids[: config.calibration_tokens]
        chars *= 2


def require_linears(model: Any, method: str) -> None:
    """A `QuantMethod.check` helper: the model must have Linear layers to quantize."""
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        raise QuantizationError(f"{type(model).__name__} has no Linear layers that {method} can quantize")
