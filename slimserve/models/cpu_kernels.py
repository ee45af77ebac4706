"""Fast CPU execution of integer weights saved in compressed-tensors format.

transformers loads a compressed-tensors checkpoint by decompressing the weights on every forward,
which is slower than the float model. On CPU, torch ships fused weight-only kernels
(`_weight_int8pack_mm`: int8 weights, per-channel scales, bf16/fp32 activations), so a quantized
Linear is swapped for a module that keeps its int8 weights and calls that kernel.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Up to this many rows the fused kernel beats dequantize-then-GEMM (a 1536x576 layer on 2 cores; the fp32
# kernel falls behind after a few rows).
FUSED_KERNEL_MAX_ROWS = {torch.bfloat16: 16, torch.float32: 4}


@functools.cache
def cpu_has_vnni() -> bool:
    """True on an x86 CPU with VNNI (AVX512-VNNI or AVX-VNNI), which fbgemm's int8 GEMMs need to
    accumulate u8 x s8 products exactly.

    Without it fbgemm adds pairs of products in int16 (vpmaddubsw), which saturates for full-range 8-bit
    activations (errors of a tenth of the output range on an AVX2-only CPU, ten times those of 7-bit
    activations). That is why PyTorch's own x86 quantization defaults to `reduce_range`."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_vnni", "avx_vnni"))


@functools.cache
def native_bf16() -> bool:
    """True where bf16 matmuls run on native instructions: a CUDA GPU, or a CPU that oneDNN gives a bf16
    path (AVX-512 or AMX on x86, BF16 on Arm).

    Why it matters: where bf16 is only emulated (AVX2) it decodes slower than fp32 and trains many times
    slower; where it is native, bf16 decodes about twice as fast as fp32 (docs/BENCHMARKS.md, "Compute dtype
    and speed")."""
    if torch.cuda.is_available():
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Int8WeightOnlyLinear(nn.Module):
    """y = x @ (W_int8 * scale).T + b, computed by torch's fused CPU kernel without materializing W."""

    weight_int8: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ValueError(f"expected a 2-D int8 weight, got {weight_int8.dtype} {tuple(weight_int8.shape)}")
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("scales", scales.reshape(-1).float())
        self.register_buffer("bias", bias)
        self._scales_by_dtype: dict[torch.dtype, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        scales = self._scales_by_dtype.get(x.dtype)
        if scales is None:
            scales = self._scales_by_dtype.setdefault(x.dtype, self.scales.to(x.dtype))
        rows = x.reshape(-1, shape[-1])  # (M, K)
        if rows.shape[0] <= FUSED_KERNEL_MAX_ROWS.get(x.dtype, 0):
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, scales)  # (M, N)
        elif x.dtype == torch.bfloat16 and not native_bf16():
            # the same in fp32 where bf16 GEMMs are emulated (about 3x faster than the emulated bf16 GEMM)
            weight = self.weight_int8.float() * self.scales[:, None]
            y = torch.nn.functional.linear(rows.float(), weight).to(x.dtype)
        else:  # prefill and wide batches: one dequantization, then a regular GEMM, is faster
            y = torch.nn.functional.linear(rows, self.weight_int8.to(x.dtype) * scales[:, None])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int4WeightOnlyLinear(nn.Module):
    """Group-wise asymmetric int4 weights run by torch's fused CPU kernel (`_weight_int4pack_mm_for_cpu`).

    The kernel computes w = (q - 8) * scale + zero per group with q in [0, 15], so compressed-tensors'
    signed q' in [-8, 7] with integer zero point z maps to q = q' + 8 and zero = -z * scale. Against a bf16
    GEMM it is about 2x faster for one row, on par at 8, about 2x slower at 128 (prefill pays that; decoding
    is what the format is for).
    """

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_int4: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor | None,
        group_size: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int4.shape
        groups = self.in_features // group_size
        if self.in_features % group_size or scales.shape != (self.out_features, groups):
            raise ValueError(
                f"int4 weight {tuple(weight_int4.shape)} does not match group size {group_size} "
                f"and scales {tuple(scales.shape)}"
            )
        self.group_size = group_size
        unsigned = (weight_int4.to(torch.int32) + 8).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1))
        zeros = -(zero_points.float() * scales.float()) if zero_points is not None else torch.zeros_like(scales)
        self.register_buffer(
            "scales_and_zeros", torch.stack([scales.float().t(), zeros.float().t()], dim=-1).contiguous()
        )  # (groups, N, 2)
        self.register_buffer("bias", bias)
        self._by_dtype: dict[torch.dtype, torch.Tensor] = {}
        self._float_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        rows = x.reshape(-1, shape[-1]).contiguous()
        if x.dtype == torch.float32 and rows.shape[0] > FUSED_KERNEL_MAX_ROWS[torch.float32]:
            # the fp32 kernel is ~70x slower than bf16 at 512 rows; fp32 compute is for evaluation, where a
            # cached float copy of the weight is affordable
            if self._float_weight is None:
                self._float_weight = self.dequantized_weight()
            y = torch.nn.functional.linear(rows, self._float_weight)
        else:
            sz = self._by_dtype.get(x.dtype)
            if sz is None:
                sz = self._by_dtype.setdefault(x.dtype, self.scales_and_zeros.to(x.dtype))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, sz)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    @classmethod
    def stacked(
        cls, parts: list[Int4WeightOnlyLinear], bias: torch.Tensor | None = None
    ) -> Int4WeightOnlyLinear | None:
        """One module computing the parts' outputs side by side, plus `bias` (their biases end to end); None if
        their inputs or groups differ.

        The packed layout keeps blocks of `INT4_PACK_ROWS` output rows apart, so where every part but the last
        fills whole blocks the packed rows and their scales are concatenated as they are: the joined kernel's
        outputs equal the parts' bit for bit. Otherwise None: a part of 32 rows put a half block in the middle
        and the joined output differed by whole units."""
        first = parts[0]
        if any(p.in_features != first.in_features or p.group_size != first.group_size for p in parts):
            return None
        if any(p.out_features % INT4_PACK_ROWS for p in parts[:-1]):
            return None
        joined = cls.__new__(cls)
        nn.Module.__init__(joined)
        joined.out_features, joined.in_features = sum(p.out_features for p in parts), first.in_features
        joined.group_size = first.group_size
        joined.register_buffer("packed", torch.cat([p.packed for p in parts]))
        joined.register_buffer("scales_and_zeros", torch.cat([p.scales_and_zeros for p in parts], dim=1))
        joined.register_buffer("bias", bias)
        joined._by_dtype, joined._float_weight = {}, None
        return joined

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight (N, K), read back through the bf16 kernel (so rounded to bf16, like bf16 weights)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        sz = self.scales_and_zeros.to(torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, sz).t().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


TIED_INT8_EMBEDDING = "int8 rows of lm_head"
"""Manifest `provenance.embedding` of variants that store no embedding table: the int8 head serves as one."""


class Int8TiedEmbedding(nn.Module):
    """Embedding lookups read the int8 output head: row i of the table is q[i] * scale[i] * `embed_scale`.

    A tied embedding/head table stored once in int8 with one scale per row (per vocabulary entry) is a
    quarter of its fp32 size and serves both ends of the model. `embed_scale` is what the model's own
    embedding multiplies its rows by (Gemma's sqrt(hidden size), 1 elsewhere: `embedding_scale`).
    """

    def __init__(self, head: Int8WeightOnlyLinear, dtype: torch.dtype, embed_scale: float = 1.0) -> None:
        super().__init__()
        self.head = [head]  # a list: share the buffers without registering the head twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype
        self.embed_scale = float(embed_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        rows = torch.nn.functional.embedding(ids, head.weight_int8)
        return (rows.float() * (head.scales[ids] * self.embed_scale).unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        scaled = f", x {self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows shared with the output head{scaled}"


def embedding_scale(embedding: nn.Module) -> float:
    """The factor an input embedding multiplies its looked-up rows by, so the int8 head's rows can stand in.

    A plain `nn.Embedding` looks rows up as they are; Gemma's `*ScaledWordEmbedding` multiplies them by
    `scalar_embed_scale` (sqrt(hidden size)). Any other embedding class may compute something else, so it
    is refused by name rather than served as a plain lookup.
    """
    if type(embedding) is nn.Embedding:
        return 1.0
    scale = getattr(embedding, "scalar_embed_scale", None)
    if type(embedding).__name__.endswith("ScaledWordEmbedding") and isinstance(scale, int | float):
        return float(scale)
    raise ValueError(
        f"a shared int8 embedding table replaces the input embedding, but {type(embedding).__name__} is neither "
        "nn.Embedding nor a known scaled embedding"
    )


class Int8DynamicLinear(nn.Module):
    """W8A8: each row of x is quantized to int8 with its own scale, then an int8 x int8 -> int32 GEMM.

    Several rows (prefill, batched decode) go through `torch._int_mm` with one scale per row: torch's
    eager dynamic kernels use one scale per call, which costs quality when a call holds many tokens.
    A single row (decode at batch 1) goes through fbgemm's fused dynamic kernel, about 2x faster than a
    bf16 GEMV there; with one row its scale is per token too.
    Without VNNI its activations keep 7 bits (`reduce_range`, `cpu_has_vnni`): 8 would saturate.
    """

    weight_t: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_t", weight_int8.t().contiguous())  # (K, N)
        self.register_buffer("scales", scales.reshape(1, -1).float())  # (1, N)
        self.register_buffer("bias", bias)
        self._packed: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        rows = x.reshape(-1, shape[-1]).float()  # (M, K)
        if rows.shape[0] == 1:  # decode of one sequence: fbgemm's fused dynamic kernel, one scale = per token
            y = torch.ops.quantized.linear_dynamic(rows, self._fbgemm_weight(), not cpu_has_vnni())
            return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127  # (M, 1)
        quantized = torch.round(rows / row_scale).to(torch.int8)
        y = torch._int_mm(quantized, self.weight_t).float() * row_scale * self.scales  # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _fbgemm_weight(self) -> Any:
        """fbgemm's prepacked copy of the same int8 weights (built once, on the compute thread)."""
        if self._packed is None:
            zero_points = torch.zeros(self.out_features, dtype=torch.long)
            weight = torch._make_per_channel_quantized_tensor(
                self.weight_t.t().contiguous(), self.scales.reshape(-1).double(), zero_points, 0
            )
            self._packed = torch.ops.quantized.linear_prepack(weight, self.bias)
        return self._packed

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_t.t().float() * self.scales.t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights and activations"


class Int8StaticLinear(Int8DynamicLinear):
    """W8A8 with one activation scale per layer, fixed from calibration (values beyond it are clipped)."""

    input_scale: torch.Tensor

    def __init__(
        self, weight_int8: torch.Tensor, scales: torch.Tensor, input_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__(weight_int8, scales, bias)
        self.register_buffer("input_scale", input_scale.reshape(()).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., K)
        rows = x.reshape(-1, shape[-1]).float()  # (M, K)
        quantized = torch.round(rows / self.input_scale).clamp(-127, 127).to(torch.int8)
        y = torch._int_mm(quantized, self.weight_t).float() * (self.input_scale * self.scales)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _is(value: Any, name: str) -> bool:
    return str(value).lower().endswith(name)


def _kernel_for(module: nn.Module) -> str | None:
    """Which CPU kernel runs this compressed-tensors Linear: `int8-weight` (W8A16 per channel),
    `int8-token` / `int8-tensor` (W8A8, dynamic per-token or static per-layer activations),
    `int4-group` (W4A16 group-wise); None for any other scheme (left to transformers)."""
    scheme = getattr(module, "quantization_scheme", None)
    weights = getattr(scheme, "weights", None)
    acts = getattr(scheme, "input_activations", None)
    if weights is None or not _is(weights.type, "int"):
        return None
    if weights.num_bits == 4 and _is(weights.strategy, "group") and acts is None:
        shape = getattr(module, "weight_shape", None)
        fits = shape is not None and int(shape[0]) % INT4_KERNEL_ROW_MULTIPLE == 0
        return "int4-group" if hasattr(module, "weight_packed") and fits else None
    if not (weights.num_bits == 8 and _is(weights.strategy, "channel") and weights.symmetric):
        return None
    if acts is None:
        return "int8-weight" if hasattr(module, "weight_packed") else None
    int8_weight = getattr(module, "weight", None) is not None and module.weight.dtype == torch.int8
    if acts.num_bits != 8 or not acts.symmetric or not int8_weight:
        return None
    if _is(acts.strategy, "token") and acts.dynamic:
        return "int8-token"
    if _is(acts.strategy, "tensor") and not acts.dynamic:
        return "int8-tensor"
    return None


def _unpacked(module: Any, bits: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    rows, columns = (int(d) for d in module.weight_shape)
    packed = module.weight_packed.data  # (rows, packed columns): rows are packed independently
    out = torch.empty(rows, columns, dtype=torch.int8)
    # a block of rows at a time: unpacking widens to int32/int64, which for a 49152-row head would
    # briefly take several hundred MB and stay in the process's peak RSS
    for start in range(0, rows, UNPACK_ROWS):
        block = packed[start : start + UNPACK_ROWS]
        out[start : start + block.shape[0]] = unpack_from_int32(block, bits, torch.Size((block.shape[0], columns)))
    return out


UNPACK_ROWS = 4096


def _int4_linear(module: Any, bias: torch.Tensor | None) -> Int4WeightOnlyLinear:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    weight = _unpacked(module, 4)
    scales = module.weight_scale.data.float()  # (N, groups)
    zero_points = getattr(module, "weight_zero_point", None)
    zeros: torch.Tensor | None = None
    if zero_points is not None and not module.quantization_scheme.weights.symmetric:
        zeros = zero_points.data
        if zeros.dtype == torch.int32 and zeros.shape != scales.shape:  # packed 8 per int32 along dim 0
            zeros = unpack_from_int32(zeros, 4, scales.shape, packed_dim=0)
    group_size = int(module.quantization_scheme.weights.group_size)
    return Int4WeightOnlyLinear(weight, scales, zeros, group_size, bias)


INT4_KERNEL_ROW_MULTIPLE = 16
"""torch's int4 CPU packing needs the output size to be a multiple of 16."""

INT4_PACK_ROWS = 64
"""torch's int4 CPU packing lays output rows out in blocks of this many (`Int4WeightOnlyLinear.stacked`)."""


def accelerate_compressed_linears(model: nn.Module) -> int:
    """Swap compressed-tensors int8/int4 Linears for CPU-kernel modules; returns how many were swapped.

    W8A16 (`pack-quantized`) -> `Int8WeightOnlyLinear`; W4A16 group-wise (`pack-quantized`) ->
    `Int4WeightOnlyLinear`; W8A8 (`int-quantized`) with per-token dynamic activations ->
    `Int8DynamicLinear`, with a calibrated per-layer scale -> `Int8StaticLinear`.
    """
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            linear: Any = child
            bias = linear.bias.data if getattr(linear, "bias", None) is not None else None
            fast: nn.Module
            kind = _kernel_for(linear)
            if kind == "int8-weight":
                fast = Int8WeightOnlyLinear(_unpacked(linear, 8), linear.weight_scale.data, bias)
            elif kind == "int4-group":
                fast = _int4_linear(linear, bias)
            elif kind == "int8-token":
                fast = Int8DynamicLinear(linear.weight.data, linear.weight_scale.data, bias)
            elif kind == "int8-tensor":
                fast = Int8StaticLinear(linear.weight.data, linear.weight_scale.data, linear.input_scale.data, bias)
            else:
                continue
            setattr(parent, child_name, fast)
            replaced += 1
    return replaced


def tie_int8_embedding(model: Any, dtype: torch.dtype) -> None:
    """Point the input embedding at the int8 output head (variants saved with one shared int8 table)."""
    head = model.get_output_embeddings()
    if not isinstance(head, Int8WeightOnlyLinear):
        raise ValueError(f"a tied int8 embedding needs an int8 weight-only head, found {type(head).__name__}")
    model.set_input_embeddings(Int8TiedEmbedding(head, dtype, embedding_scale(model.get_input_embeddings())))


def is_compressed_tensors(config: Any) -> bool:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return False
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return str(method) in {"compressed-tensors", "QuantizationMethod.COMPRESSED_TENSORS"}
