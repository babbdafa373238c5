"""One training step, crops, sliding-window inference and evaluation — shared by training, tuning,
compression fine-tuning and evaluation so every stage computes them the same way."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from shared import representations
from shared.metrics import macro_auc, per_class_auc
from shared.progress import bar


def random_crop(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """An independent random window of `length` samples for each record of a B×C×T batch."""
    b, c, t = x.shape
    if length >= t:
        return x
    starts = torch.randint(0, t - length + 1, (b,), generator=generator)
    idx = starts[:, None] + torch.arange(length)[None, :]
    return x.gather(2, idx[:, None, :].expand(b, c, length))


def windows(x: torch.Tensor, length: int, stride: int) -> tuple[torch.Tensor, int]:
    """All windows of `length` every `stride` samples (the last one flush with the end): (B·W)×C×L, W."""
    b, c, t = x.shape
    if length >= t:
        return x, 1
    starts = list(range(0, t - length + 1, stride))
    if starts[-1] != t - length:
        starts.append(t - length)
    w = torch.stack([x[:, :, s:s + length] for s in starts], dim=1)  # B×W×C×L
    return w.reshape(b * len(starts), c, length), len(starts)


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16)


class InputAdapter:
    """Crop length, window stride and representation of a config, applied to raw 12×T batches."""

    def __init__(self, cfg: dict, sampling_rate: int):
        self.crop = int(round(cfg["crop_seconds"] * sampling_rate))
        self.stride = int(round((cfg["eval_stride_seconds"] or cfg["crop_seconds"] / 2) * sampling_rate))
        self.representation = cfg["representation"]
        self.rep_kwargs = {"row_repeat": cfg["row_repeat"]} if self.representation == "rows" else {}

    def train_crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The raw (normalized) B×12×crop training window: a teacher takes it through its own representation."""
        return random_crop(x, self.crop, generator)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return representations.apply(self.representation, x, **self.rep_kwargs)

    def train_input(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.represent(self.train_crop(x, generator))

    def eval_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        w, n = windows(x, self.crop, self.stride)
        return representations.apply(self.representation, w, **self.rep_kwargs), n


def train_step(model: nn.Module, optimizer, loss_fn, inputs, targets, device, amp: bool, grad_clip: float,
               scaler=None) -> float:
    """One optimizer step. A model may return a tuple (DeiT's two heads in distilled training): the loss gets it."""
    model.train()
    with autocast(device, amp):
        out = model(inputs)
        out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
        loss = loss_fn(out, targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(loss.detach())


# Windows per forward pass on the CPU. A batch of 64 records is 448 windows; in one pass convnext's activations
# run to hundreds of MB, which glibc hands out by mmap and the kernel zero-fills page by page on every call:
# 448 windows in one pass took 9.8 s of CPU (half of it in the kernel), 7 passes of 64 took 6.6 s, same output.
CPU_WINDOWS_PER_FORWARD = 64


@torch.no_grad()
def predict_batches(model, loader, adapter: InputAdapter, device, amp: bool = False, progress: bool = False,
                    desc: str = "eval"):
    """Sigmoid probabilities averaged over sliding windows, and the labels: (N×5, N×5) numpy. progress: a bar on a
    terminal (shared.progress)."""
    model.eval()
    probs, labels = [], []
    for x, y in bar(loader, desc, enabled=progress):
        inputs, n_win = adapter.eval_inputs(x)
        step = len(inputs) if device.type == "cuda" else CPU_WINDOWS_PER_FORWARD
        with autocast(device, amp):
            logits = torch.cat([model(inputs[i:i + step].to(device)).float() for i in range(0, len(inputs), step)])
        p = torch.sigmoid(logits).reshape(len(x), n_win, -1).mean(dim=1)
        probs.append(p.cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def scores(y_true: np.ndarray, y_prob: np.ndarray, classes) -> dict:
    pc = per_class_auc(y_true, y_prob)
    return {"macro_auc": macro_auc(y_true, y_prob),
            "per_class_auc": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, pc)},
            "records": int(len(y_true))}


def validation_scores(model, cache, adapter: InputAdapter, chunk: int = CPU_WINDOWS_PER_FORWARD) -> dict:
    """{"val": scores} of a model derived from a trained run (compressed, exported): such steps are development
    steps, so they look at the validation fold only; the test fold is eval-all's."""
    from shared.dataset import ECGDataset

    probs, labels = predict_dataset(model, ECGDataset(cache, "val"), adapter, chunk=chunk)
    return {"val": scores(labels, probs, cache.classes)}


@torch.no_grad()
def predict_dataset(model, dataset, adapter: InputAdapter, chunk: int = CPU_WINDOWS_PER_FORWARD,
                    progress: bool = False, desc: str = "eval", channels_last: bool = False):
    """Like predict_batches, but every forward sees exactly `chunk` windows (the last chunk padded), so a
    compiled or exported model never meets a new shape. Returns (probs N×5, labels N×5) numpy."""
    if hasattr(model, "eval"):
        model.eval()
    x, y = dataset.__getitems__(range(len(dataset)))
    inputs, n_win = adapter.eval_inputs(x)
    outs = []
    for start in bar(range(0, len(inputs), chunk), desc, enabled=progress):
        part = inputs[start:start + chunk]
        n = len(part)
        if n < chunk:
            part = torch.cat([part, part[-1:].expand(chunk - n, *part.shape[1:])])
        if channels_last and part.dim() == 4:
            part = part.contiguous(memory_format=torch.channels_last)
        outs.append(torch.sigmoid(model(part).float())[:n])
    probs = torch.cat(outs).reshape(len(x), n_win, -1).mean(dim=1)
    return probs.numpy(), y.numpy()


def calibration_inputs(cache, adapter: InputAdapter, cfg: dict, batches: int):
    """The int8 calibration set every post-training quantizer sees (PT2E static, OpenVINO/NNCF): `batches`
    shuffled training batches, one random training-style crop per record, from fixed seeds — so two int8
    methods of one run are calibrated on exactly the same inputs."""
    from shared.dataset import ECGDataset, make_loader

    loader = make_loader(ECGDataset(cache, "train"), cfg["batch_size"], shuffle=True, seed=cfg["seed"] + 31)
    gen = torch.Generator().manual_seed(cfg["seed"] + 37)
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            return
        yield adapter.train_input(x, gen)
