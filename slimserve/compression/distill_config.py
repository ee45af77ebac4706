"""What one distillation run is asked to do (`DistillConfig`, whose fields are `slimserve distill`'s flags
and a recipe's distill step keys), beside the loop that runs it (`distill.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimserve.compression.data import BUILTIN_CORPORA
from slimserve.compression.losses import DIVERGENCES
from slimserve.compression.quantize_config import Int4Config, QuantizationError, QuantizeConfig, method_config
from slimserve.compression.student import StudentSpec
from slimserve.models.loader import native_bf16


class DistillError(ValueError):
    """A distillation request that cannot run; raised before any training starts."""


@dataclass
class DistillConfig:
    """One distillation run, end to end."""

    teacher: str
    """Teacher variant (name or directory); must be a float variant."""
    name: str
    """Registry name of the student."""
    student: StudentSpec = field(default_factory=StudentSpec)
    """How the student is cut from the teacher (its fields are flags of their own: --layers, --mlp-ratio...)."""
    student_config: str | None = None
    """A config.json for a fresh student (same tokenizer) instead of cutting one from the teacher."""
    divergence: str = "forward_kl"
    """forward_kl, reverse_kl or jsd (GKD's generalised JSD with `beta`)."""
    beta: float = 0.5
    """jsd: mixture weight (GKD's beta)."""
    temperature: float = 1.0
    """Softmax temperature of both distributions in the divergence."""
    alpha: float = 0.0
    """Weight of cross-entropy on the data (0: pure KD, 1: plain language-model training)."""
    data: list[str] = field(default_factory=list)
    """Text files or directories (*.txt, *.md) and built-in corpora (`builtin:pydoc`, the training split of
    Python's pydoc_data topics; `builtin:docstrings`, the standard library's docstrings); default: builtin:pydoc."""
    generated: int = 0
    """Teacher answers to this many built-in prompts added to the data (sequence-level KD)."""
    generation_tokens: int = 96
    """Most tokens the teacher generates for each `generated` prompt."""
    on_policy: float = 0.0
    """GKD's lambda: share of steps whose sequences the student samples itself (scored by the teacher)."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak AdamW learning rate (linear warm-up, then cosine decay to a tenth of it)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Optimizer steps of linear learning-rate warm-up."""
    max_steps: int = 200
    """Optimizer steps to train."""
    max_minutes: float | None = None
    """Wall-clock budget; the run stops (checkpointed) at whichever of this and max_steps comes first."""
    dtype: str = "fast"
    """Autocast dtype of the forward passes: `bf16`, `fp32` (no autocast) or `fast`: bf16 where the machine
    runs it natively (a GPU, an AVX-512 CPU), else fp32: emulated bf16 makes a training step many times
    slower (`native_bf16`)."""
    freeze_embeddings: bool = False
    """Keep the (tied) token embedding and output head at the teacher's values: on a 49k-token vocabulary
    they are a third of a small student's weights, and their gradient a sizeable share of each step."""
    lora_rank: int = 0
    """> 0: train LoRA adapters of this rank (peft) instead of all weights, merged at the end."""
    qat: str | None = None
    """int4 or int8: fake-quantized weights during training, then export through the quantization stage."""
    qat_group_size: int | None = None
    """Weights per quantization group of int4 QAT and of its exported variant [default: int4-rtn's
    --group-size]."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints."""
    resume: bool = False
    """Continue from the run's latest checkpoint."""
    seed: int = 0
    """Seed of data order, sampling and any random initialisation."""
    output_dir: str | None = None
    """Where checkpoints go; default `$SLIMSERVE_HOME/runs/<name>`."""

    def qat_export(self) -> QuantizeConfig:
        """The quantization stage's config that writes the grid QAT trains on (`--qat` only)."""
        from slimserve.compression.qat import export_config

        if self.qat is None:
            raise DistillError("qat_export: this run has no --qat")
        return method_config(**export_config(self.qat, self.qat_grid))

    @property
    def qat_grid(self) -> int:
        """Weights per group of int4 QAT: `qat_group_size`, else int4's `--group-size` default."""
        return self.qat_group_size if self.qat_group_size is not None else Int4Config.group_size

    def autocast_dtype(self) -> str:
        """`bf16` or `fp32`: what `dtype` means on this machine."""
        if self.dtype == "fast":
            return "bf16" if native_bf16() else "fp32"
        return self.dtype

    def __post_init__(self) -> None:
        if isinstance(self.student, dict):
            try:
                self.student = StudentSpec(**self.student)
            except TypeError as exc:
                raise DistillError(f"student: {exc}") from exc
        if self.divergence not in DIVERGENCES:
            raise DistillError(f"unknown divergence {self.divergence!r}; choose one of {', '.join(DIVERGENCES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise DistillError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise DistillError(f"on_policy must be in [0, 1], got {self.on_policy}")
        if self.temperature <= 0:
            raise DistillError(f"temperature must be positive, got {self.temperature}")
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise DistillError(f"jsd needs beta in (0, 1), got {self.beta}")
        if min(self.seq_len, self.batch_size, self.grad_accum, self.max_steps) < 1:
            raise DistillError("seq_len, batch_size, grad_accum and max_steps must be positive")
        if self.qat is not None and self.qat not in ("int4", "int8"):
            raise DistillError(f"qat must be int4 or int8, got {self.qat!r}")
        if self.qat_group_size is not None and self.qat != "int4":
            given = self.qat or "none"
            raise DistillError(f"--qat-group-size applies only with --qat int4 (this run's --qat: {given})")
        if self.qat is not None:
            try:
                self.qat_export()  # the export's own checks, before any training
            except QuantizationError as exc:
                raise DistillError(f"--qat {self.qat}: {exc}") from exc
        if self.dtype not in ("fast", "bf16", "fp32"):
            raise DistillError(f"dtype must be fast, bf16 or fp32, got {self.dtype!r}")
        for item in self.data:
            if item.startswith("builtin:") and item not in BUILTIN_CORPORA:
                raise DistillError(f"unknown corpus {item!r}; built-in ones are {', '.join(BUILTIN_CORPORA)}")
            if item not in BUILTIN_CORPORA and not Path(item).exists():
                raise DistillError(f"data {item} does not exist")
