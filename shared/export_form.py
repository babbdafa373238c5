"""Inference-only rewrites of a trained network before it is converted to OpenVINO: the same function, laid out so
that the runtime's kernels run it fast. Training, the PyTorch variants and the ONNX export keep the network as
timm builds it; only the OpenVINO IRs use these forms, and their variant.json records which one.

convnext, "channels-first": timm's ConvNeXt block permutes every activation to channels-last for its LayerNorm
and its two Linear layers, then back. Exported, each block becomes Transpose → LayerNorm → Transpose, and
OpenVINO's CPU plugin runs that LayerNorm as reorders + element-wise ops that cost more than the convolutions
(on the sample's strip stem: 27 % of the fp32 time, half of the int8 time). Here the LayerNorm normalizes over
the channel axis of the NCHW tensor and the MLP is two 1×1 convolutions (timm's ConvMlp) — no permutes: the
int8 IR runs ~3× faster (docs/benchmarks.md), and the logits agree to ~1e-6. ONNX Runtime gains nothing from
it (it fuses the channels-last LayerNorm itself; measured 0.93× fp32, 1.0× int8), so export_onnx.py does not use it.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

EXPORT_FORMS = {"convnext": "channels-first"}


def export_form(family: str) -> str | None:
    """The rewrite applied to `family` before OpenVINO conversion (recorded in variant.json), or None."""
    return EXPORT_FORMS.get(family)


def for_export(model: nn.Module, family: str) -> nn.Module:
    """A copy of `model` in its export form (the model itself when its family has none); eval mode."""
    if export_form(family) is None:
        return model.eval()
    return channels_first_convnext(copy.deepcopy(model)).eval()


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an N×C×H×W tensor, without permuting it (same weights and eps). Written
    as mean, centre, mean square, divide: the pattern OpenVINO fuses into one MVN (torch.var_mean is not)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(1, keepdim=True)
        x = x / torch.sqrt((x * x).mean(1, keepdim=True) + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _conv_mlp(mlp: nn.Module) -> nn.Module:
    """timm's Mlp (Linear layers on channels-last) as timm's ConvMlp (1×1 convolutions), same weights."""
    from timm.layers import ConvMlp

    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"{type(mlp).__name__} with a norm layer has no channels-first form here")
    conv = ConvMlp(mlp.fc1.in_features, mlp.fc1.out_features, mlp.fc2.out_features, act_layer=type(mlp.act))
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            linear, layer = getattr(mlp, name), getattr(conv, name)
            layer.weight.copy_(linear.weight[:, :, None, None])
            layer.bias.copy_(linear.bias)
    conv.act = mlp.act
    return conv


def channels_first_convnext(model: nn.Module) -> nn.Module:
    """Rewrite a timm ConvNeXt in place: every block channels-first, every LayerNorm2d a ChannelLayerNorm."""
    from timm.layers import LayerNorm2d
    from timm.models.convnext import ConvNeXtBlock

    for block in [m for m in model.modules() if isinstance(m, ConvNeXtBlock) and not m.use_conv_mlp]:
        block.norm, block.mlp, block.use_conv_mlp = ChannelLayerNorm(block.norm), _conv_mlp(block.mlp), True
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LayerNorm2d):
                setattr(parent, name, ChannelLayerNorm(child))
    return model
