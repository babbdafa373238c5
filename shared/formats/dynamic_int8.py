"""The dynamic-int8 variant's format: int8 Linear weights with their per-tensor scales in int8.safetensors
(torch's quantized modules pickle their packed parameters; this stores plain tensors and repacks them)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from shared.io import load_weights, save_weights


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """torch's dynamic int8 of every Linear, with one change: a Linear fed one feature row per window (the
    classifier head after global pooling) takes each row's activation range on its own. torch takes one range
    over the whole input, so one outlier window set the scale of every window batched with it: effnetv2's pooled
    features are mostly < 1 but reach 34 in ~1 % of windows, and its val macro AUC fell 0.929 → 0.913 at 64
    windows per forward (0.929 one window at a time), with outputs that depended on the batch."""
    import types
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)
    for m in _dynamic_linears(qmodel).values():
        m.forward = types.MethodType(_per_row_forward, m)
    return qmodel


def _per_row_forward(self, x: torch.Tensor) -> torch.Tensor:
    forward = type(self).forward
    if x.dim() != 2 or len(x) < 2:
        return forward(self, x)
    return torch.cat([forward(self, row) for row in x.split(1)])


def _dynamic_linears(model: nn.Module):
    import torch.ao.nn.quantized.dynamic as nnqd

    return {name: m for name, m in model.named_modules() if isinstance(m, nnqd.Linear)}


def save_dynamic(path: Path, qmodel: nn.Module, metadata: dict | None = None) -> None:
    linears = _dynamic_linears(qmodel)
    tensors = {k: v for k, v in qmodel.state_dict().items()
               if isinstance(v, torch.Tensor) and not v.is_quantized and k.split("._packed_params")[0] not in linears}
    for name, m in linears.items():
        w, b = m._packed_params._weight_bias()
        if w.qscheme() != torch.per_tensor_affine:
            raise ValueError(f"{name}: unexpected qscheme {w.qscheme()}")
        tensors[f"{name}.weight_int8"] = w.int_repr()
        tensors[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float64)
        tensors[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int64)
        if b is not None:
            tensors[f"{name}.bias"] = b
    save_weights(path, tensors, metadata)


def load_dynamic(path: Path, fp32_model: nn.Module) -> nn.Module:
    raw = load_weights(path)
    linear_names = {n for n, m in fp32_model.named_modules() if isinstance(m, nn.Linear)}
    plain = {k: v for k, v in raw.items() if k.rsplit(".", 1)[0] not in linear_names}
    _, unexpected = fp32_model.load_state_dict(plain, strict=False)  # everything but the Linear layers
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:3]}")
    qmodel = quantize_dynamic(fp32_model)
    linears = _dynamic_linears(qmodel)
    if set(linears) != linear_names:
        raise ValueError(f"{path}: the network's Linear layers differ from the file's")
    for name, m in linears.items():
        w = torch._make_per_tensor_quantized_tensor(raw[f"{name}.weight_int8"], float(raw[f"{name}.weight_scale"]),
                                                    int(raw[f"{name}.weight_zero_point"]))
        m.set_weight_bias(w, raw.get(f"{name}.bias"))
    return qmodel.eval()
