"""Distillation losses on whole next-token distributions (not only the teacher's argmax)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence between teacher and student distributions, shape (..., ).

    `forward_kl` = KL(teacher || student) (mode covering, classic KD), `reverse_kl` = KL(student || teacher)
    (mode seeking), `jsd` = GKD's generalised Jensen-Shannon with mixture M = beta*P_teacher +
    (1-beta)*P_student: beta*KL(teacher || M) + (1-beta)*KL(student || M), which tends to the forward KL's
    behaviour as beta -> 0 and the reverse KL's as beta -> 1 (up to scale). Logits are softened by
    `temperature` and the result scaled by temperature^2 so gradients keep their size (Hinton et al.).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 < beta < 1.0 and divergence == "jsd":
        raise ValueError(f"jsd needs beta in (0, 1), got {beta}")
    student_logits, teacher_logits = _soften(student_logits, temperature), _soften(teacher_logits, temperature)
    if divergence == "forward_kl":
        return _forward_kl(student_logits, teacher_logits) * temperature**2
    teacher = F.log_softmax(teacher_logits, dim=-1)
    student = F.log_softmax(student_logits, dim=-1)
    if divergence == "reverse_kl":
        value = (student.exp() * (student - teacher)).sum(dim=-1)
    else:
        mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log(1 - beta)]), dim=0)
        kl_teacher = (teacher.exp() * (teacher - mixture)).sum(dim=-1)
        kl_student = (student.exp() * (student - mixture)).sum(dim=-1)
        value = beta * kl_teacher + (1 - beta) * kl_student
    return value * temperature**2


def _soften(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits in fp32 divided by the temperature; at 1 the division, a full pass over (positions x
    vocabulary) and its backward, is skipped."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


class _ForwardKL(torch.autograd.Function):
    """KL(teacher || student) per position from both logits, with a hand-written backward.

    Why by hand: the gradient with respect to the student's logits is softmax(student) - p_teacher, one
    pass over the (positions x vocabulary) tensors. Built from torch ops (teacher log-softmax, exp,
    cross-entropy with probability targets, the teacher's entropy) the same value takes ~9 such passes, a
    sizeable share of a CPU distillation step.
    """

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        teacher_lse = torch.logsumexp(teacher_logits, dim=-1, keepdim=True)  # (..., 1)
        student_lse = torch.logsumexp(student_logits, dim=-1, keepdim=True)
        probs = torch.sub(teacher_logits, teacher_lse).exp_()  # (..., V) teacher probabilities
        # sum p (log p - log q) = sum p (t - s) - lse(t) + lse(s), since sum p = 1
        gap = torch.sub(teacher_logits, student_logits).mul_(probs).sum(dim=-1)
        ctx.save_for_backward(student_logits, student_lse, probs)
        return gap - teacher_lse.squeeze(-1) + student_lse.squeeze(-1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        student_logits, student_lse, probs = ctx.saved_tensors
        softmax = torch.sub(student_logits, student_lse).exp_()
        return softmax.sub_(probs).mul_(grad.unsqueeze(-1)), None


def _forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return _ForwardKL.apply(student_logits, teacher_logits.detach())


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(1 - alpha) * divergence to the teacher + alpha * cross-entropy on the data, averaged over the
    positions that predict a real next token. `teacher_logits=None` with alpha=1 is plain LM training."""
    mask = (attention_mask[:, 1:] > 0).float()
    tokens = mask.sum().clamp(min=1)
    parts: dict[str, float] = {}
    loss = torch.zeros((), device=student_logits.device)
    if alpha > 0:
        ce = F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
        ce = (ce.view_as(mask) * mask).sum() / tokens
        loss = loss + alpha * ce
        parts["ce"] = float(ce.detach())
    if alpha < 1:
        if teacher_logits is None:
            raise ValueError("a distillation loss with alpha < 1 needs the teacher's logits")
        # over every position, then the last one dropped: slicing the logits first copies both tensors
        kd = token_divergence(student_logits, teacher_logits, divergence, beta, temperature)[:, :-1]
        kd = (kd * mask).sum() / tokens
        loss = loss + (1 - alpha) * kd
        parts["kd"] = float(kd.detach())
    return loss, parts
