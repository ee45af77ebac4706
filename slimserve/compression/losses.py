"""Distillation losses on whole next-token distributions (not only the teacher's argmax)."""

from __future__ import annotations

import math

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
    teacher = F.log_softmax(teacher_logits, dim=-1)
    if divergence == "forward_kl":
        return _forward_kl(student_logits, teacher) * temperature**2
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


def _forward_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per position, as cross-entropy against the teacher's probabilities minus the
    teacher's entropy (a constant for the student).

    Why not `sum(p * (log p - log q))`: cross_entropy with probability targets is one fused
    log-softmax/NLL kernel with a fused backward, where the direct form makes four passes over
    (positions x vocabulary) tensors and keeps them for autograd: with the temperature-1 division skipped
    (`_soften`), the student's forward + backward at batch 4 x 256 took 3.4 s instead of 3.7 s on 2 cores.
    """
    vocab = student_logits.shape[-1]
    probs = teacher_log_probs.exp()  # (..., V)
    cross = F.cross_entropy(student_logits.reshape(-1, vocab), probs.reshape(-1, vocab), reduction="none")
    with torch.no_grad():
        entropy = -(probs * teacher_log_probs).sum(dim=-1)  # (...)
    return cross.view(entropy.shape) - entropy


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
    logits = student_logits[:, :-1]
    parts: dict[str, float] = {}
    loss = torch.zeros((), device=student_logits.device)
    if alpha > 0:
        ce = F.cross_entropy(logits.float().flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
        ce = (ce.view_as(mask) * mask).sum() / tokens
        loss = loss + alpha * ce
        parts["ce"] = float(ce.detach())
    if alpha < 1:
        if teacher_logits is None:
            raise ValueError("a distillation loss with alpha < 1 needs the teacher's logits")
        kd = token_divergence(logits, teacher_logits[:, :-1], divergence, beta, temperature)
        kd = (kd * mask).sum() / tokens
        loss = loss + (1 - alpha) * kd
        parts["kd"] = float(kd.detach())
    return loss, parts
