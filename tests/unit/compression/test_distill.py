from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from slimserve.compression.data import eval_text, train_texts
from slimserve.compression.distill import (
    DistillConfig,
    DistillError,
    corpus_texts,
    distill,
    lr_multiplier,
    training_progress,
)
from slimserve.compression.losses import distillation_loss, token_divergence
from slimserve.compression.quantize import method_config, quantize_variant
from slimserve.compression.student import (
    StudentError,
    StudentSpec,
    block_influence,
    build_student,
    choose_layers,
    mlp_channel_importance,
)
from slimserve.models import VariantManifest, VariantRegistry, load_variant
from tests.tiny import ARCHITECTURES, CORPUS, make_tiny_variant, tiny_model

SEQUENCES = [torch.randint(3, 250, (64,), generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.fixture
def registry(slimserve_home: Path) -> VariantRegistry:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "teacher", name="teacher", layers=4, hidden=64)
    return registry


def _config(**overrides: object) -> DistillConfig:
    base: dict[str, object] = {
        "teacher": "teacher",
        "name": "student",
        "student": StudentSpec(layers=2, calibration_tokens=512),
        "seq_len": 64,
        "batch_size": 2,
        "max_steps": 12,
        "checkpoint_every": 5,
        "lr": 3e-3,
    }
    base.update(overrides)
    return DistillConfig(**base)  # type: ignore[arg-type]


def test_divergences_vanish_on_equal_distributions_and_differ_otherwise() -> None:
    logits = torch.randn(3, 5, 50)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        assert token_divergence(logits, logits, divergence).abs().max() < 1e-5
    other = torch.randn(3, 5, 50)
    forward = token_divergence(other, logits, "forward_kl")
    reverse = token_divergence(other, logits, "reverse_kl")
    jsd = token_divergence(other, logits, "jsd", beta=0.5)
    assert (forward > 0).all() and (reverse > 0).all() and not torch.allclose(forward, reverse)
    assert (jsd <= torch.log(torch.tensor(2.0)) + 1e-5).all()  # JSD is bounded by log 2
    # alpha=1 is plain cross-entropy on the data and needs no teacher
    ids = torch.randint(0, 50, (3, 5))
    loss, parts = distillation_loss(other, None, ids, torch.ones_like(ids), alpha=1.0)
    expected = torch.nn.functional.cross_entropy(other[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"ce"}


def test_student_keeps_the_most_influential_blocks_and_still_generates() -> None:
    teacher = tiny_model(300, layers=6, hidden=64)
    student, report = build_student(teacher, StudentSpec(layers=3, mlp_ratio=0.5), SEQUENCES)
    kept = report["kept_layers"]
    influence = report["block_influence"]
    assert len(kept) == 3 and kept[0] == 0 and kept[-1] == 5
    dropped = [i for i in range(1, 5) if i not in kept]
    assert all(influence[kept[1]] >= influence[i] for i in dropped)
    assert student.config.num_hidden_layers == 3 and student.config.intermediate_size == 64
    assert report["parameters"] < report["teacher_parameters"]
    out = student.generate(SEQUENCES[0][None, :8], max_new_tokens=5, do_sample=False)  # cache indexed 0..2
    assert out.shape == (1, 13)
    # the teacher is untouched
    assert teacher.config.num_hidden_layers == 6 and len(teacher.model.layers) == 6


def test_width_pruning_keeps_each_blocks_most_active_mlp_channels() -> None:
    teacher = tiny_model(300, layers=2, hidden=64)
    student, report = build_student(teacher, StudentSpec(mlp_ratio=0.5), SEQUENCES)
    importance = mlp_channel_importance(teacher, SEQUENCES)
    assert report["intermediate_size"] == 64
    for source, pruned, scores in zip(teacher.model.layers, student.model.layers, importance, strict=True):
        keep = torch.sort(torch.topk(scores, 64).indices).values
        torch.testing.assert_close(pruned.mlp.gate_proj.weight, source.mlp.gate_proj.weight[keep])
        torch.testing.assert_close(pruned.mlp.up_proj.weight, source.mlp.up_proj.weight[keep])
        torch.testing.assert_close(pruned.mlp.down_proj.weight, source.mlp.down_proj.weight[:, keep])


def test_a_width_pruned_student_registers_loads_and_quantizes_to_int4(registry: VariantRegistry) -> None:
    spec = StudentSpec(layers=3, mlp_ratio=0.5, calibration_tokens=512)
    path = distill(_config(student=spec, max_steps=2), registry)
    loaded = load_variant(path, dtype="fp32", registry=registry)
    assert loaded.model.config.intermediate_size == 64
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.model.layers] == [64] * 3
    quantized = quantize_variant(str(path), method_config("int4-gptq", calibration_tokens=512), registry)
    model = load_variant(quantized, dtype="bf16", registry=registry).model
    out = model.generate(SEQUENCES[0][None, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_choose_layers_refuses_a_deeper_student() -> None:
    with pytest.raises(StudentError, match="more layers"):
        choose_layers([0.1] * 4, 5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_forward_kl_matches_its_definition_in_value_and_gradient(temperature: float) -> None:
    """The hand-written forward and backward are the KL itself and its gradient, for any upstream weights."""
    teacher = torch.randn(2, 7, 300)
    student = torch.randn(2, 7, 300, requires_grad=True)
    fused = token_divergence(student, teacher, "forward_kl", temperature=temperature)
    p = torch.log_softmax(teacher / temperature, dim=-1)
    q = torch.log_softmax(student / temperature, dim=-1)
    direct = (p.exp() * (p - q)).sum(dim=-1) * temperature**2
    torch.testing.assert_close(fused, direct)
    weights = torch.rand(2, 7)  # per-position upstream gradient, as the mask and token count give
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), student)
    (direct_grad,) = torch.autograd.grad((direct * weights).sum(), student)
    torch.testing.assert_close(fused_grad, direct_grad)


def test_frozen_embeddings_stay_the_teachers_while_the_blocks_learn(registry: VariantRegistry) -> None:
    path = distill(_config(max_steps=4, freeze_embeddings=True), registry)
    teacher = load_variant(registry.variants_dir / "teacher", dtype="fp32", registry=registry).model
    student = load_variant(path, dtype="fp32", registry=registry).model
    torch.testing.assert_close(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    torch.testing.assert_close(student.get_output_embeddings().weight, teacher.get_output_embeddings().weight)
    kept = VariantManifest.read(path).provenance["student"]["kept_layers"]
    moved = student.model.layers[0].mlp.up_proj.weight - teacher.model.layers[kept[0]].mlp.up_proj.weight
    assert moved.abs().max() > 1e-4


def test_kd_loss_decreases_and_the_student_is_registered(registry: VariantRegistry) -> None:
    path = distill(_config(), registry)
    manifest = VariantManifest.read(path)
    assert (
        manifest.method == "distill"
        and manifest.parameters < VariantManifest.read(registry.variants_dir / "teacher").parameters
    )
    assert manifest.provenance["steps"] == 12 and manifest.provenance["student"]["kept_layers"][0] == 0
    history = json.loads((registry.home / "runs" / "student" / "history.json").read_text())
    first, last = history[0]["kd"], sum(h["kd"] for h in history[-3:]) / 3
    assert last < first
    loaded = load_variant(path, dtype="fp32", registry=registry)
    assert loaded.model.config.num_hidden_layers == 2
    rates = [h["lr"] for h in history]
    assert rates[0] < max(rates) and rates[-1] < max(rates)  # warm-up, then decay


def test_a_wall_clock_budget_drives_the_learning_rate_decay() -> None:
    # 10 of 100000 steps but half of a 10-minute budget: half-way through the decay
    assert training_progress(10, 100_000, elapsed_s=300.0, budget_s=600.0) == 0.5
    assert training_progress(50, 100, elapsed_s=1.0, budget_s=600.0) == 0.5  # steps end it sooner
    assert training_progress(10, 100, elapsed_s=900.0, budget_s=600.0) == 1.0
    assert training_progress(10, 100, elapsed_s=900.0, budget_s=None) == 0.1
    assert lr_multiplier(0, 10, 0.0) == 0.1 and lr_multiplier(9, 10, 0.0) == 1.0
    assert lr_multiplier(20, 10, 0.5) == pytest.approx(0.55)
    assert lr_multiplier(20, 10, 1.0) == pytest.approx(0.1)


def test_resume_continues_from_the_latest_checkpoint(registry: VariantRegistry) -> None:
    path = distill(_config(max_steps=6, checkpoint_every=3), registry)
    shutil.rmtree(path)  # as if the run had been interrupted after its last checkpoint
    resumed = distill(_config(max_steps=9, checkpoint_every=3, resume=True), registry)
    provenance = VariantManifest.read(resumed).provenance
    assert provenance["steps"] == 9
    assert provenance["train_tokens"] == 9 * 2 * 64  # the first six steps' tokens are counted too
    history = json.loads((registry.home / "runs" / "student" / "history.json").read_text())
    assert [h["step"] for h in history] == [7, 8, 9]


def test_bad_requests_fail_before_any_training(registry: VariantRegistry, tmp_path: Path) -> None:
    with pytest.raises(DistillError, match="more layers"):
        distill(_config(student=StudentSpec(layers=9)), registry)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DistillError, match="no text"):
        distill(_config(data=[str(empty)]), registry)
    with pytest.raises(DistillError, match="does not exist"):
        _config(data=[str(tmp_path / "missing")])
    with pytest.raises(DistillError, match="builtin:docstrings"):
        _config(data=["builtin:wikipedia"])
    other_vocab = tmp_path / "student.json"
    config = json.loads((registry.variants_dir / "teacher" / "config.json").read_text())
    config["vocab_size"] += 7
    other_vocab.write_text(json.dumps(config))
    with pytest.raises(DistillError, match="tokenizer"):
        distill(_config(student_config=str(other_vocab)), registry)
    with pytest.raises(DistillError, match="divergence"):
        _config(divergence="l2")
    assert not (registry.home / "runs").exists() or not any((registry.home / "runs").rglob("step-*"))
    assert sorted(p.name for p in registry.variants_dir.iterdir()) == ["teacher"]


def test_builtin_corpora_add_library_docstrings_and_keep_out_the_held_out_text() -> None:
    pydoc = corpus_texts(["builtin:pydoc"])
    assert pydoc == train_texts() == corpus_texts([])
    both = corpus_texts(["builtin:pydoc", "builtin:docstrings"])
    docstrings = both[len(pydoc) :]
    # several times the pydoc training split, so a long run need not repeat its text
    assert sum(map(len, docstrings)) > 3 * sum(map(len, pydoc))
    held_out = eval_text()
    assert not any(doc[:200] in held_out for doc in docstrings)


def test_int4_qat_trains_on_exactly_the_grid_the_export_writes(registry: VariantRegistry) -> None:
    from slimserve.compression.qat import attach_fake_quantization
    from slimserve.compression.quantize import quantize_variant

    run = _config(qat="int4", qat_group_size=32, max_steps=4)
    path = distill(run, registry)
    assert VariantManifest.read(path).method == "distill-qat-int4"
    exported = quantize_variant(str(path), run.qat_export(), registry)

    trained = load_variant(path, dtype="fp32", registry=registry).model
    attach_fake_quantization(trained, "int4", 32)  # the forward the training saw
    quantized = load_variant(exported, dtype="fp32", registry=registry).model
    ids = SEQUENCES[0][None, :16]
    with torch.no_grad():
        expected, got = trained(ids).logits, quantized(ids).logits
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_student_is_cut_and_distilled_for_every_architecture(slimserve_home: Path, tmp_path: Path, arch: str) -> None:
    registry = VariantRegistry()
    make_tiny_variant(registry.variants_dir / "teacher", name="teacher", layers=4, arch=arch)
    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS * 3))
    spec = StudentSpec(layers=2, mlp_ratio=0.5, calibration_tokens=256)  # depth and width (Phi-3: fused gate/up)
    path = distill(_config(student=spec, max_steps=1, seq_len=32, data=[str(tmp_path / "corpus.txt")]), registry)
    manifest = VariantManifest.read(path)
    kept = manifest.provenance["student"]["kept_layers"]
    assert manifest.provenance["guard"]["top1_agreement"] >= manifest.provenance["guard"]["min_top1_agreement"]
    teacher = load_variant(registry.variants_dir / "teacher", dtype="fp32").model
    student = load_variant(path, dtype="fp32").model
    assert len(student.model.layers) == 2 and student.config.intermediate_size == 64
    if getattr(teacher.config, "layer_types", None):  # Gemma 3's kept blocks keep their kind
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept]
    out = student.generate(SEQUENCES[0][None, :12], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 16)


@pytest.mark.parametrize("arch", ["gemma3", "mistral"])
def test_block_influence_is_measured_on_what_each_block_really_computes(arch: str) -> None:
    """The input and output of every block in the model's own forward give the same influence."""
    model = tiny_model(300, layers=4, arch=arch)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        layer.register_forward_hook(
            lambda _m, args, kwargs, out: pairs.append((args[0] if args else kwargs["hidden_states"], out)),
            with_kwargs=True,
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        for ids in SEQUENCES:
            model(input_ids=ids[None], use_cache=False)
    for hook in hooks:
        hook.remove()
    expected = [0.0] * 4
    for index, (x, y) in enumerate(pairs):
        y = y[0] if isinstance(y, tuple) else y
        expected[index % 4] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())
    tokens = sum(s.numel() for s in SEQUENCES)
    assert block_influence(model, SEQUENCES) == pytest.approx([e / tokens for e in expected], rel=1e-4)
