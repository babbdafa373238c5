"""One registry: every model in the project is built here by name.

The four seed families come from timm, sized for a CPU by default (tiny/atto/b0) and configured for
the ECG input (in_chans, img_size, patch shape, num_classes). The 1-D references are in nets1d.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from shared.nets1d import NETS1D
from shared.representations import input_shape

# family → default timm architecture; `arch` in a config picks a bigger one (e.g. vit_small_patch16_224)
TIMM_FAMILIES = {
    "vit": "vit_tiny_patch16_224",
    "deit": "deit_tiny_distilled_patch16_224",
    "effnetv2": "tf_efficientnetv2_b0",
    "convnext": "convnext_atto",
}
TRANSFORMERS = {"vit", "deit"}
MODELS = tuple(TIMM_FAMILIES) + tuple(NETS1D)


class PretrainedUnavailable(RuntimeError):
    pass


def build_model(name: str, representation: str, n_samples: int, num_classes: int = 5, n_leads: int = 12,
                arch: str | None = None, pretrained: bool = False, patch_samples: int = 10, row_repeat: int = 8,
                drop_path_rate: float = 0.0, drop_rate: float = 0.0, stem_patch: tuple[int, int] | None = None,
                timm_kwargs: dict | None = None, **_ignored) -> nn.Module:
    """Build model `name` for inputs of `representation` over `n_samples` time samples. `stem_patch` (convnext
    only) replaces its 4×4 patchify stem by a rows × samples one, e.g. (8, 2) on `rows` = one lead × 20 ms per
    token instead of half a lead × 40 ms, at the same number of tokens. `timm_kwargs` go to timm.create_model as
    they are (e.g. {ls_init_value = 1.0} for convnext)."""
    if name in NETS1D:
        if representation != "signal":
            raise ValueError(f"{name} is a 1-D model: use representation 'signal', not {representation!r}")
        return NETS1D[name](num_classes=num_classes, in_channels=n_leads)
    if name not in TIMM_FAMILIES:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if representation == "signal":
        raise ValueError(f"{name} is a 2-D model: representation 'signal' is for 1-D models")
    if name not in TRANSFORMERS and representation == "leads":
        raise ValueError(f"{name} downsamples 32x and cannot take the 12-row 'leads' plane; "
                         "use 'strip', 'rows' or 'seed'")
    if name in TRANSFORMERS and representation == "strip":
        raise ValueError(f"{name} is a transformer: 'strip' is for CNNs; use 'leads' (patches span all 12 leads)")
    import timm

    chans, *spatial = input_shape(representation, n_leads, n_samples, row_repeat)
    kwargs = dict(num_classes=num_classes, in_chans=chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                  **(timm_kwargs or {}))
    if name in TRANSFORMERS:
        kwargs["img_size"] = tuple(spatial)
        if representation == "leads":  # every token spans all 12 leads × patch_samples samples
            kwargs["patch_size"] = (n_leads, patch_samples)
        elif representation == "seed":  # 182×256 tiles exactly into 14×16 patches (13×16 tokens)
            kwargs["patch_size"] = (14, 16)
        elif representation == "rows":
            kwargs["patch_size"] = (row_repeat, patch_samples)
    try:
        model = timm.create_model(arch or TIMM_FAMILIES[name], pretrained=pretrained, **kwargs)
    except Exception as e:  # timm raises hub/HTTP/OS errors when pretrained weights cannot be fetched
        if pretrained:
            raise PretrainedUnavailable(
                f"cannot fetch pretrained weights for {arch or TIMM_FAMILIES[name]} ({type(e).__name__}: {e}); "
                "they need the internet (Hugging Face hub) — train from scratch with pretrained = false") from None
        raise
    if stem_patch:
        if name != "convnext":
            raise ValueError(f"stem_patch is a convnext option, not {name}'s")
        stem = model.stem[0]  # timm builds the patch stem from an int only (its stride bookkeeping needs one)
        model.stem[0] = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=tuple(stem_patch),
                                  stride=tuple(stem_patch), bias=stem.bias is not None)
    if representation == "strip":
        time_only_kernels(model)
    return model


def time_only_kernels(model: nn.Module) -> nn.Module:
    """Cut every kh×kw convolution to its middle row (1×kw, stride and padding along time only), in place.

    On a 1-row input a 'same'-padded kh×kw kernel only ever touches its middle row, so depthwise and other
    padded convolutions compute exactly what they did; patchify stems and stride-2 downsamplers, which
    would need kh rows, now step along time alone. Weights keep their initialized middle row."""
    for parent in list(model.modules()):
        for child_name, conv in list(parent.named_children()):
            if not isinstance(conv, nn.Conv2d) or conv.kernel_size[0] == 1 and conv.stride[0] == 1:
                continue
            if isinstance(conv.padding, str):
                raise ValueError(f"cannot cut {type(conv).__name__} with padding={conv.padding!r} to one row")
            row = conv.kernel_size[0] // 2
            # type(conv): timm's Conv2dSame (TF 'same' padding, computed per input) stays what it was
            cut = type(conv)(conv.in_channels, conv.out_channels, (1, conv.kernel_size[1]),
                             stride=(1, conv.stride[1]), padding=(0, conv.padding[1]),
                             dilation=(1, conv.dilation[1]), groups=conv.groups, bias=conv.bias is not None)
            with torch.no_grad():
                cut.weight.copy_(conv.weight[:, :, row:row + 1, :])
                if conv.bias is not None:
                    cut.bias.copy_(conv.bias)
            setattr(parent, child_name, cut)
    return model


def architecture_kwargs(cfg: dict) -> dict:
    """The build_model arguments of a resolved config that shape the network (and so its state dict)."""
    return dict(arch=cfg.get("arch"), patch_samples=cfg.get("patch_samples", 10), row_repeat=cfg.get("row_repeat", 8),
                stem_patch=cfg.get("stem_patch"), timm_kwargs=cfg.get("timm_kwargs"))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
