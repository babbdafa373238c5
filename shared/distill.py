"""Knowledge distillation for multi-label ECG diagnosis: one place for the loss every stage uses (QAT and
structured-pruning recovery learn from their fp32 parent; training can learn from a teacher run).

Per-class binary KD: each of the 5 outputs is its own Bernoulli, so the teacher's softened probability
σ(t/T) is the target of the student's σ(s/T) in a binary cross-entropy, mixed with the labels' BCE:
    loss = (1 − α)·BCE(s, y) + α·BCE(σ(s/T), σ(t/T))
α = 0 is plain BCE on the labels. kd_mode "hard" replaces the soft target by the teacher's decisions σ(t) > 0.5
(DeiT's hard-label distillation; T is not used). A DeiT student in distilled training gives two outputs: its
class head learns the labels' term and its distillation head the teacher's (the DeiT paper); in eval mode timm
averages the two heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.config import DEFAULTS

KD_ALPHA, KD_TEMPERATURE = DEFAULTS["kd_alpha"], DEFAULTS["kd_temperature"]
KD_MODES = ("soft", "hard")


def teacher_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float = KD_TEMPERATURE,
                 mode: str = "soft") -> torch.Tensor:
    """What the student learns from the teacher: its softened probabilities (soft) or its decisions (hard)."""
    teacher = teacher.detach()
    if mode == "hard":
        return F.binary_cross_entropy_with_logits(student, (teacher > 0).to(student.dtype))
    return F.binary_cross_entropy_with_logits(student / temperature, torch.sigmoid(teacher / temperature))


def kd_loss(student, targets: torch.Tensor, teacher: torch.Tensor | None, alpha: float = KD_ALPHA,
            temperature: float = KD_TEMPERATURE, mode: str = "soft") -> torch.Tensor:
    """`student`: logits, or DeiT's (class head, distillation head) pair — the labels teach the first, the
    teacher the second."""
    cls, dist = student if isinstance(student, (tuple, list)) else (student, student)
    hard = F.binary_cross_entropy_with_logits(cls, targets)
    if teacher is None or alpha == 0:
        return hard
    return (1 - alpha) * hard + alpha * teacher_term(dist, teacher, temperature, mode)


class WithTeacher:
    """A loss for shared.training.train_step whose targets are (labels, teacher logits of the same inputs):
    train_step passes targets through untouched, so distillation needs no second training loop."""

    def __init__(self, alpha: float = KD_ALPHA, temperature: float = KD_TEMPERATURE, mode: str = "soft"):
        self.alpha, self.temperature, self.mode = alpha, temperature, mode

    def __call__(self, student, targets) -> torch.Tensor:
        labels, teacher = targets
        return kd_loss(student, labels, teacher, self.alpha, self.temperature, self.mode)


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return teacher.eval()(inputs).float()


def check_settings(cfg: dict) -> None:
    """kd_alpha in [0, 1], kd_temperature > 0, kd_mode soft | hard (ValueError, one line)."""
    alpha, temp = cfg["kd_alpha"], cfg["kd_temperature"]
    mode = cfg["kd_mode"]
    if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"kd_alpha = {alpha!r}: must be a number in [0, 1]")
    if not isinstance(temp, (int, float)) or not temp > 0:
        raise ValueError(f"kd_temperature = {temp!r}: must be a number > 0")
    if mode not in KD_MODES:
        raise ValueError(f"kd_mode = {mode!r}: choose from {', '.join(KD_MODES)}")


def student_loss(cfg: dict):
    """The training loss of a config: targets are (labels, teacher logits or None), labels smoothed as the
    config asks; without a teacher it is BCE on the labels."""
    smoothing = float(cfg["label_smoothing"])
    kd = WithTeacher(cfg["kd_alpha"], cfg["kd_temperature"], cfg["kd_mode"])

    def loss_fn(logits, targets):
        labels, teacher = targets
        return kd(logits, (labels * (1 - smoothing) + 0.5 * smoothing if smoothing else labels, teacher))
    return loss_fn


class TeacherChanged(ValueError):
    """A teacher checkpoint differs from the sha256 the student's config recorded."""


class Teacher(nn.Module):
    """Frozen teacher run(s) fed the student's raw crop (B×12×T, normalized), each through its own input
    representation; an ensemble's output is the mean of its members' logits."""

    def __init__(self, models: list[nn.Module], represent: list):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.represent = represent
        self.requires_grad_(False)
        self.eval()

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(r(crop)).float() for m, r in zip(self.members, self.represent)]).mean(0)


def load_teacher(runs: list[dict], sampling_rate: int, device: torch.device | str = "cpu") -> Teacher:
    """The Teacher of config.json's `teacher_runs` ([{run, sha256}]); a checkpoint that changed since it was
    recorded is refused (TeacherChanged)."""
    from shared.runs import checkpoint_sha256, load_run
    from shared.inputs import InputAdapter

    models, represent = [], []
    for entry in runs:
        if checkpoint_sha256(entry["run"]) != entry["sha256"]:
            raise TeacherChanged(f"teacher {entry['run']}: best.safetensors changed since this run recorded it; "
                             "--force to train the student again with it")
        model, cfg = load_run(entry["run"])
        models.append(model)
        represent.append(InputAdapter(cfg, sampling_rate).represent)
    return Teacher(models, represent).to(device)
