"""Knowledge distillation of a teacher into a student, as one accelerate training loop.

The same loop runs on a 2-core CPU and, through `accelerate launch`, on several GPUs: accelerate owns
devices, mixed precision, gradient accumulation and checkpoint state; this module owns the data, the
student, the loss and the budget. The result is registered as a float variant that the quantization
stage can take next (`--qat` exports the quantized variant directly).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slimserve.compression.data import BUILTIN_CORPORA, PROMPTS, eval_text, read_text, train_texts
from slimserve.compression.distill_config import DistillConfig, DistillError
from slimserve.compression.losses import distillation_loss
from slimserve.compression.student import StudentError, build_student
from slimserve.models.loader import native_bf16
from slimserve.models.manifest import VariantManifest, weights_size_bytes
from slimserve.models.registry import VariantRegistry

log = logging.getLogger(__name__)


def corpus_texts(paths: list[str]) -> list[str]:
    """Texts of the given built-in corpora, files and directories (recursively: *.txt, *.md), or the
    default split."""
    if not paths:
        return train_texts()
    texts: list[str] = []
    for name in paths:
        if name in BUILTIN_CORPORA:
            texts += BUILTIN_CORPORA[name]()
            continue
        item = Path(name)
        files = sorted(p for p in item.rglob("*") if p.suffix in (".txt", ".md")) if item.is_dir() else [item]
        for file in files:
            try:
                texts.append(read_text(str(file)))
            except ValueError:  # an empty file adds nothing; an empty corpus is refused below
                continue
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DistillError(f"the corpus {paths} holds no text")
    held_out = eval_text()
    leaked = [t[:60] for t in texts if len(t) > 200 and t[:200] in held_out]
    if leaked:
        raise DistillError(f"training text overlaps the held-out evaluation text: {leaked[:2]}")
    return texts


def chunk_tokens(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    """All texts tokenised (separated by EOS) and cut into rows of `seq_len` tokens."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + ([eos] if eos is not None else [])
    rows = len(ids) // seq_len
    if rows == 0:
        raise DistillError(f"the corpus has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


@torch.no_grad()
def teacher_generations(teacher: Any, tokenizer: Any, count: int, max_new_tokens: int, seed: int) -> list[str]:
    """The teacher's answers to `count` built-in prompts, as chat transcripts (sequence-level KD data)."""
    texts: list[str] = []
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    torch.manual_seed(seed)
    for start in tqdm(range(0, count, 8), desc="teacher generations", unit="batch", leave=False):
        batch = prompts[start : start + 8]
        chats = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in batch
        ]
        tokenizer.padding_side = "left"
        encoded = tokenizer(chats, return_tensors="pt", padding=True)
        out = teacher.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=0.7,
            top_p=0.95,
            pad_token_id=tokenizer.pad_token_id,
        )
        for chat, row in zip(chats, out[:, encoded["input_ids"].shape[1] :], strict=True):
            texts.append(chat + tokenizer.decode(row, skip_special_tokens=True))
    return texts


def training_progress(step: int, max_steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far along the run is, in [0, 1]: by steps, or by wall clock when that budget ends it sooner.

    A wall-clock run cannot know its step count in advance; scheduling by time lets its learning rate
    decay to the end of the budget instead of staying at its peak (a max_steps of 100000 never arrives).
    """
    progress = step / max_steps
    if budget_s:
        progress = max(progress, elapsed_s / budget_s)
    return min(1.0, progress)


def lr_multiplier(step: int, warmup_steps: int, progress: float, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from the peak to `floor` x peak over the run's progress."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Distiller:
    """Builds the student and data, runs the loop, saves checkpoints and the final variant."""

    def __init__(self, config: DistillConfig, registry: VariantRegistry | None = None) -> None:
        self.config = config
        self.registry = registry or VariantRegistry()
        self.run_dir = Path(config.output_dir) if config.output_dir else self.registry.home / "runs" / config.name

    def validate(self) -> Any:
        """Every check that can fail before training; returns the resolved teacher."""
        config = self.config
        teacher = self.registry.resolve(config.teacher)
        if teacher.manifest.bits < 16:
            raise DistillError(f"teacher {teacher.name!r} is quantized ({teacher.manifest.method}); use a float one")
        if self.registry.exists(config.name) and (self.registry.variants_dir / config.name).exists():
            raise DistillError(f"variant {config.name!r} already exists; choose another name")
        if config.student_config is not None and not Path(config.student_config).is_file():
            raise DistillError(f"student config {config.student_config} does not exist")
        return teacher

    def run(self) -> Path:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = self.config
        teacher_ref = self.validate()
        texts = corpus_texts(config.data)
        set_seed(config.seed)
        precision = config.autocast_dtype()
        if precision == "bf16" and not native_bf16():
            log.warning("bf16 autocast on a CPU without native bf16 (no AVX-512): expect steps many times slower")
        log.info("distill %s: forward passes in %s (dtype=%s)", config.name, precision, config.dtype)
        accelerator = Accelerator(
            gradient_accumulation_steps=config.grad_accum,
            mixed_precision="bf16" if precision == "bf16" else "no",
        )
        tokenizer = AutoTokenizer.from_pretrained(teacher_ref.path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        teacher = AutoModelForCausalLM.from_pretrained(teacher_ref.path, dtype=torch.float32).eval()

        calibration = chunk_tokens(tokenizer, texts[: max(1, len(texts) // 4)], 512)[
            : max(1, config.student.calibration_tokens // 512)
        ]
        if config.student_config is not None:
            student_config = AutoConfig.from_pretrained(config.student_config)
            if getattr(student_config, "vocab_size", None) != teacher.config.vocab_size:
                raise DistillError(
                    f"student vocabulary ({student_config.vocab_size}) differs from the teacher's "
                    f"({teacher.config.vocab_size}): they must share the tokenizer"
                )
            torch.manual_seed(config.seed)
            student = AutoModelForCausalLM.from_config(student_config)
            report: dict[str, Any] = {"fresh": config.student_config}
        else:
            try:
                student, report = build_student(teacher, config.student, list(calibration))
            except StudentError as exc:
                raise DistillError(str(exc)) from exc
        student.config.use_cache = False
        report["autocast"] = precision

        if config.generated > 0:
            texts = texts + teacher_generations(
                teacher, tokenizer, config.generated, config.generation_tokens, config.seed
            )
        rows = chunk_tokens(tokenizer, texts, config.seq_len)
        order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(config.seed))

        if config.qat is not None:
            from slimserve.compression.qat import attach_fake_quantization

            report["fake_quantized_linears"] = attach_fake_quantization(student, config.qat, config.qat_grid)
        if config.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            targets = sorted(
                {n.split(".")[-1] for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
            )
            student = get_peft_model(
                student, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, target_modules=targets)
            )

        if config.freeze_embeddings:
            for module in (student.get_input_embeddings(), student.get_output_embeddings()):
                if module is not None:
                    module.weight.requires_grad_(False)
        trainable = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0}
        budget_s = config.max_minutes * 60 if config.max_minutes else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_multiplier(
                step, config.warmup_steps, training_progress(step, config.max_steps, state["seconds"], budget_s)
            ),
        )
        student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
        # the teacher only runs forward under autocast: holding it in bf16 saves the per-step weight casts
        teacher = teacher.to(accelerator.device, dtype=torch.bfloat16 if precision == "bf16" else None)

        checkpoints = self.run_dir / "checkpoints"
        if config.resume:
            latest = self.latest_checkpoint()
            if latest is None:
                raise DistillError(f"--resume: no checkpoint under {checkpoints}")
            accelerator.load_state(str(latest))
            state.update(json.loads((latest / "progress.json").read_text()))
        elif checkpoints.exists():
            shutil.rmtree(checkpoints)

        history: list[dict[str, float]] = []
        rng = random.Random(config.seed + state["step"])
        started = time.perf_counter() - state["seconds"]
        deadline = started + config.max_minutes * 60 if config.max_minutes else math.inf
        resumed_at, resumed_step = time.perf_counter(), state["step"]
        bar = tqdm(
            total=config.max_steps,
            initial=state["step"],
            desc=f"distill {config.name}",
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        student.train()
        stop_reason = "max_steps"
        while state["step"] < config.max_steps:
            if time.perf_counter() >= deadline:
                stop_reason = "max_minutes"
                break
            parts: dict[str, float] = {}
            loss_value = 0.0
            for micro in range(config.grad_accum):
                # each process takes its own slice of the global batch (accelerate launch on several GPUs)
                micro_index = (state["step"] * config.grad_accum + micro) * accelerator.num_processes
                index = (micro_index + accelerator.process_index) * config.batch_size
                batch = rows[order[torch.arange(index, index + config.batch_size) % rows.shape[0]]]
                batch = batch.to(accelerator.device)
                if config.on_policy > 0 and rng.random() < config.on_policy:
                    batch = self.student_samples(accelerator.unwrap_model(student), batch)
                mask = torch.ones_like(batch)
                with accelerator.accumulate(student):
                    with torch.no_grad(), accelerator.autocast():
                        teacher_logits = teacher(input_ids=batch).logits if config.alpha < 1 else None
                    with accelerator.autocast():
                        logits = student(input_ids=batch, attention_mask=mask).logits
                    loss, parts = distillation_loss(
                        logits,
                        teacher_logits,
                        batch,
                        mask,
                        config.divergence,
                        config.beta,
                        config.temperature,
                        config.alpha,
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                loss_value += float(loss.detach()) / config.grad_accum
                state["tokens"] += int(batch.numel())
            state["step"] += 1
            state["tokens"] += int(batch.numel()) * config.grad_accum * (accelerator.num_processes - 1)
            state["seconds"] = time.perf_counter() - started
            history.append({"step": state["step"], "loss": loss_value, "lr": scheduler.get_last_lr()[0], **parts})
            postfix = {"loss": f"{loss_value:.3f}", "tok_s": f"{state['tokens'] / max(state['seconds'], 1e-9):.0f}"}
            if deadline != math.inf:  # the wall-clock budget, not max_steps, is what ends this run
                left = max(0.0, deadline - time.perf_counter())
                postfix["budget_left"] = f"{int(left // 60)}:{int(left % 60):02d}"
                # the steps the budget will allow at this run's pace, so tqdm's ETA is the budget's end
                pace = (time.perf_counter() - resumed_at) / max(1, state["step"] - resumed_step)
                bar.total = min(config.max_steps, state["step"] + int(left / pace))
            bar.set_postfix(postfix)
            bar.update(1)
            if state["step"] % config.checkpoint_every == 0:
                self.checkpoint(accelerator, state)
        bar.close()
        self.checkpoint(accelerator, state)
        accelerator.wait_for_everyone()
        target = self.registry.variants_dir / config.name
        if accelerator.is_main_process:
            self.save(accelerator.unwrap_model(student), tokenizer, teacher_ref, report, state, history, stop_reason)
        accelerator.wait_for_everyone()
        return target

    @torch.no_grad()
    def student_samples(self, student: Any, batch: torch.Tensor) -> torch.Tensor:
        """On-policy data: the student continues the first quarter of each sequence by sampling."""
        prefix = max(1, batch.shape[1] // 4)
        student.eval()
        out = student.generate(
            input_ids=batch[:, :prefix],
            max_new_tokens=batch.shape[1] - prefix,
            min_new_tokens=batch.shape[1] - prefix,
            do_sample=True,
            temperature=1.0,
            use_cache=True,
            pad_token_id=0,
        )
        student.train()
        return out[:, : batch.shape[1]]

    def latest_checkpoint(self) -> Path | None:
        found = sorted(
            (p for p in (self.run_dir / "checkpoints").glob("step-*") if (p / "progress.json").exists()),
            key=lambda p: int(p.name.split("-")[1]),
        )
        return found[-1] if found else None

    def checkpoint(self, accelerator: Any, state: dict[str, Any]) -> None:
        target = self.run_dir / "checkpoints" / f"step-{state['step']}"
        accelerator.save_state(str(target))
        if not accelerator.is_main_process:
            return
        (target / "progress.json").write_text(json.dumps(state))
        for old in (self.run_dir / "checkpoints").glob("step-*"):  # keep the latest two
            if old != target and int(old.name.split("-")[1]) < state["step"] - self.config.checkpoint_every:
                shutil.rmtree(old, ignore_errors=True)

    def save(
        self,
        student: Any,
        tokenizer: Any,
        teacher_ref: Any,
        report: dict[str, Any],
        state: dict[str, Any],
        history: list[dict[str, float]],
        stop_reason: str,
    ) -> Path:
        """Write the student as a float variant (staged, checked against the teacher by the guard, then renamed
        into the registry)."""
        import tempfile

        from slimserve.compression.guard import GuardError, check_variant

        config = self.config
        if config.lora_rank > 0:
            student = student.merge_and_unload()
        if config.qat is not None:
            from slimserve.compression.qat import detach_fake_quantization

            detach_fake_quantization(student)
        student = student.float().eval()
        student.config.use_cache = True
        self.registry.variants_dir.mkdir(parents=True, exist_ok=True)
        target = self.registry.variants_dir / config.name
        with tempfile.TemporaryDirectory(dir=self.registry.variants_dir, prefix=f".{config.name}.") as tmp:
            staging = Path(tmp) / config.name
            student.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            for item in teacher_ref.path.iterdir():
                if item.name.startswith(("chat_template", "generation_config")):
                    shutil.copy2(item, staging / item.name)
            tail = history[-10:]
            manifest = VariantManifest(
                name=config.name,
                base_model=teacher_ref.manifest.base_model,
                family=teacher_ref.manifest.family,
                method="distill" + (f"-qat-{config.qat}" if config.qat else ""),
                bits=32,
                parameters=int(report.get("parameters") or sum(p.numel() for p in student.parameters())),
                size_bytes=weights_size_bytes(staging),
                dtype="float32",
                runtimes=["transformers", "vllm", "vllm-cpu"],
                provenance={
                    "command": "distill",
                    "teacher": teacher_ref.name,
                    "teacher_path": str(teacher_ref.path.resolve()),
                    "student": report,
                    "config": _jsonable(asdict(config)),
                    "steps": state["step"],
                    "train_tokens": state["tokens"],
                    "minutes": round(state["seconds"] / 60, 2),
                    "stopped_by": stop_reason,
                    "final_loss": round(sum(h["loss"] for h in tail) / max(len(tail), 1), 4),
                    "torch": torch.__version__,
                },
            )
            manifest.write(staging)
            try:
                guard = check_variant(staging, teacher_ref.path, manifest.method, manifest.bits)
            except GuardError as exc:
                raise GuardError(f"{exc}; the run's checkpoints stay under {self.run_dir}") from exc
            manifest.provenance["guard"] = guard.to_dict()
            manifest.write(staging)
            if target.exists():
                raise DistillError(f"variant {config.name!r} appeared during training; nothing overwritten")
            staging.rename(target)
        (self.run_dir / "history.json").write_text(json.dumps(history))
        return target


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def distill(config: DistillConfig, registry: VariantRegistry | None = None) -> Path:
    """Run one distillation; returns the registered student directory."""
    return Distiller(config, registry).run()
