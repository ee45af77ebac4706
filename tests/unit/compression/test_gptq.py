from __future__ import annotations

import pytest
import torch

from slimserve.compression.gptq import (
    IntGrid,
    gptq,
    group_size_for,
    layer_inputs,
    quantize_layers_sequentially,
    round_to_nearest,
)
from tests.tiny import ARCHITECTURES, tiny_model


def _correlated_inputs(rows: int, k: int) -> torch.Tensor:
    """Activations like a transformer's: low-rank structure plus a few large channels."""
    torch.manual_seed(0)
    x = torch.randn(rows, 16) @ torch.randn(16, k) + 0.1 * torch.randn(rows, k)
    x[:, :3] *= 20
    return x


def _check_codes(result: object, grid: IntGrid) -> None:
    codes, scales, zeros = result.codes, result.scales, result.zero_points  # type: ignore[attr-defined]
    assert codes.dtype == torch.int8 and grid.qmin <= int(codes.min()) and int(codes.max()) <= grid.qmax
    g = grid.group_size
    rebuilt = (codes.float() - zeros.repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
    torch.testing.assert_close(rebuilt, result.dequantized)  # type: ignore[attr-defined]


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_moves_layer_outputs_far_less_than_round_to_nearest(act_order: bool) -> None:
    weight = 0.05 * torch.randn(64, 256)
    x = _correlated_inputs(2048, 256)
    hessian = 2 * x.T @ x / x.shape[0]
    grid = IntGrid(4, 64)
    rtn, calibrated = round_to_nearest(weight, grid), gptq(weight, hessian, grid, act_order=act_order)
    for result in (rtn, calibrated):
        _check_codes(result, grid)  # contiguous groups either way: the saved format holds exactly this
    error = lambda w: float(((x @ (w - weight).T) ** 2).mean())  # noqa: E731
    assert error(calibrated.dequantized) < 0.2 * error(rtn.dequantized)


def test_clip_search_never_increases_rounding_error() -> None:
    weight = torch.randn(32, 128)
    weight[:, 5] = 8.0  # one outlier column widens every row's min..max
    plain = round_to_nearest(weight, IntGrid(4, 128))
    clipped = round_to_nearest(weight, IntGrid(4, 128, clip_search=True))
    per_row = lambda r: ((r.dequantized - weight) ** 2).sum(dim=1)  # noqa: E731
    assert (per_row(clipped) <= per_row(plain) + 1e-6).all()
    assert per_row(clipped).sum() < per_row(plain).sum()


def test_group_size_halves_until_it_divides_the_layer() -> None:
    assert group_size_for(1536, 128) == 128
    assert group_size_for(576, 128) == 64  # SmolLM2-135M's hidden size: 4.5 groups of 128
    assert group_size_for(96, 128) == 32
    with pytest.raises(ValueError, match="divides"):
        group_size_for(100, 128)


def test_sequential_gptq_tracks_the_float_model_better_than_round_to_nearest() -> None:
    torch.manual_seed(1)
    sequences = [torch.randint(3, 300, (96,)) for _ in range(4)]
    reference = tiny_model(300, hidden=128)
    with torch.no_grad():
        target = torch.cat([reference(s[None]).logits for s in sequences])

    def quantized_error(calibrated: bool) -> float:
        model = tiny_model(300, hidden=128)
        plan = {
            name: IntGrid(4, 32)
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in name
        }
        results = quantize_layers_sequentially(model, sequences, plan, calibrated=calibrated)
        assert set(results) == set(plan) and len(plan) == 14
        with torch.no_grad():
            logits = torch.cat([model(s[None]).logits for s in sequences])
        return float(((logits - target) ** 2).mean())

    assert quantized_error(calibrated=True) < quantized_error(calibrated=False)


def _real_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """What every block receives in the model's own forward."""
    seen: list[tuple[tuple, dict]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _m, a, k: seen.append((a, k)), with_kwargs=True)
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return seen


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_block_is_fed_what_it_really_sees(arch: str) -> None:
    """GPTQ and block influence replay the blocks one by one: each must get its own mask and position
    embeddings (Gemma 3's sliding blocks have their own window and RoPE base) and its predecessor's output."""
    model = tiny_model(300, layers=4, arch=arch)
    ids = torch.arange(3, 27).unsqueeze(0)  # longer than the sliding window, so the masks differ
    real = _real_inputs(model, ids)
    (captured,) = layer_inputs(model, [ids[0]])
    hidden = captured.hidden
    for index, (layer, (real_args, real_kwargs)) in enumerate(zip(model.model.layers, real, strict=True)):
        args, kwargs = captured.arguments(index, hidden)
        assert _same(args[0], real_args[0] if real_args else real_kwargs["hidden_states"])
        for key in ("attention_mask", "position_embeddings"):
            assert _same(kwargs.get(key), real_kwargs.get(key)), (index, key)
        with torch.no_grad():
            out = layer(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    if arch == "gemma3":  # what reusing block 0's arguments for every block got wrong
        local, global_ = real[0][1], real[1][1]
        assert not _same(local["position_embeddings"], global_["position_embeddings"])
        assert not _same(local["attention_mask"], global_["attention_mask"])
