"""One training step — shared by training, tuning and every compression fine-tune (QAT, pruning recovery), so they
all take it the same way."""
from __future__ import annotations

import torch.nn as nn

from shared.prediction import autocast


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
