"""Knowledge distillation for multi-label ECG diagnosis: one place for the loss every stage uses (QAT and
structured-pruning recovery learn from their fp32 parent; training can learn from a teacher run).

Per-class binary KD: each of the 5 outputs is its own Bernoulli, so the teacher's softened probability
σ(t/T) is the target of the student's σ(s/T) in a binary cross-entropy, mixed with the labels' BCE:
    loss = (1 − α)·BCE(s, y) + α·BCE(σ(s/T), σ(t/T))
α = 0 is plain BCE on the labels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KD_ALPHA = 0.5
KD_TEMPERATURE = 2.0


def kd_loss(student: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor | None, alpha: float = KD_ALPHA,
            temperature: float = KD_TEMPERATURE) -> torch.Tensor:
    hard = F.binary_cross_entropy_with_logits(student, targets)
    if teacher is None or alpha == 0:
        return hard
    soft = F.binary_cross_entropy_with_logits(student / temperature, torch.sigmoid(teacher.detach() / temperature))
    return (1 - alpha) * hard + alpha * soft


class WithTeacher:
    """A loss for shared.training.train_step whose targets are (labels, teacher logits of the same inputs):
    train_step passes targets through untouched, so distillation needs no second training loop."""

    def __init__(self, alpha: float = KD_ALPHA, temperature: float = KD_TEMPERATURE):
        self.alpha, self.temperature = alpha, temperature

    def __call__(self, student: torch.Tensor, targets) -> torch.Tensor:
        labels, teacher = targets
        return kd_loss(student, labels, teacher, self.alpha, self.temperature)


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return teacher.eval()(inputs).float()
