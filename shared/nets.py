"""One registry: every model in the project is built here by name.

The four seed families come from timm, sized for a CPU by default (tiny/atto/b0) and configured for
the ECG input (in_chans, img_size, patch shape, num_classes). The 1-D references are in nets1d.py.
`pretrained` is false, true (ImageNet weights from the Hugging Face hub) or the path of a weights file
(safetensors, or a .pth read with weights_only=True), for networks where the hub is out of reach.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn

from shared.io import first_line
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
# Modules a family keeps in fp32 when quantized after training (PT2E static int8, OpenVINO/NNCF int8), and why.
INT8_FP32_MODULES = {
    "effnetv2": (("global_pool",), "an int8 global pool takes its input's scale (0.48: the head's activations peak "
                 "near 140), which crushes the pooled features (mostly < 1) to a few levels: val AUC 0.929 → 0.858; "
                 "with the pool in fp32 0.930 (the classifier stays int8 at its own scale)"),
}


def int8_fp32_modules(model: str) -> tuple[tuple[str, ...], str | None]:
    """(modules kept in fp32, why) of a family's post-training int8; ((), None) for the others."""
    return INT8_FP32_MODULES.get(model, ((), None))
MODELS = tuple(TIMM_FAMILIES) + tuple(NETS1D)


class PretrainedUnavailable(RuntimeError):
    pass


class PretrainedFileError(ValueError):
    """A `pretrained` weights file that is missing, damaged, not plain weights or not for this architecture;
    the message is `<file>: <problem>`, one line."""


def read_pretrained(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped as timm unwraps them (state_dict_ema / model_ema / state_dict /
    model, DDP and torch.compile prefixes). A .pth is read with weights_only=True: pickled code is refused."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PretrainedFileError(f"{path}: no such file (pretrained = a .safetensors or .pth weights file)")
    if not path.is_file():
        raise PretrainedFileError(f"{path}: not a file (pretrained = a .safetensors or .pth weights file)")
    if path.suffix == ".safetensors":  # timm picks the reader by this suffix too
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:
            raise PretrainedFileError(f"{path}: damaged or not a safetensors file ({first_line(e)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            what = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
            raise PretrainedFileError(
                f"{path}: refused — it holds pickled Python objects{f' ({what[1]})' if what else ''}, not only "
                "weights (read with weights_only=True); save a state_dict, or convert it to safetensors") from None
        except Exception as e:
            raise PretrainedFileError(f"{path}: damaged or not a PyTorch weights file ({first_line(e)})") from None
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = {re.sub(r"^(?:_orig_mod\.|module\.)+", "", str(k)): v for k, v in obj.items()
               if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise PretrainedFileError(f"{path}: holds no tensors (expected a state_dict of weights)")
    return tensors


def _grid(n_tokens: int) -> str:
    side = int(round(n_tokens ** 0.5))
    return f"{side}x{side}" if side * side == n_tokens else f"{n_tokens} tokens"


def _key_groups(keys) -> str:
    """'blocks.6-11, norm' for the keys of blocks 6..11 and norm.weight/bias: a short name for many tensors."""
    groups: dict[str, set] = {}
    for k in keys:
        parts = k.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            groups.setdefault(parts[0], set()).add(int(parts[1]))
        else:
            groups.setdefault(".".join(parts[:-1]) or k, set())
    names = []
    for name, idx in sorted(groups.items()):
        names.append(f"{name}.{min(idx)}-{max(idx)}" if len(idx) > 1 else f"{name}.{min(idx)}" if idx else name)
    return ", ".join(names[:6]) + (f", … ({len(names) - 6} more)" if len(names) > 6 else "")


def _adapted(key: str, old: torch.Tensor, new: torch.Tensor, model: nn.Module, first_convs: set[str]) -> str:
    """What timm did to one tensor whose shape changed (or whose values it resampled)."""
    name = key.rsplit(".", 1)[0]
    if key in first_convs and old.ndim == 4 and new.ndim == 4:
        how = []
        if old.shape[1] != new.shape[1]:
            verb = "summed" if new.shape[1] == 1 else f"repeated, scaled {old.shape[1]}/{new.shape[1]}"
            how.append(f"{old.shape[1]}→{new.shape[1]} input channels {verb}")
        if old.shape[2:] != new.shape[2:]:
            how.append(f"{old.shape[2]}x{old.shape[3]}→{new.shape[2]}x{new.shape[3]} kernel resampled")
        return f"{name} {', '.join(how)}" if how else f"{name} adapted"
    if key.endswith("pos_embed") and hasattr(model, "patch_embed"):
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        gh, gw = model.patch_embed.grid_size
        return f"pos_embed resampled {_grid(old.shape[1] - prefix)}→{gh}x{gw}"
    return f"{key} {tuple(old.shape)}→{tuple(new.shape)}"


def _from_file(arch: str, path: Path, kwargs: dict) -> tuple[nn.Module, list[str]]:
    """timm.create_model with its pretrained loading pointed at a local file (the hub is never asked), and the
    notes of what it adapted to the ECG input, for the one line build_model prints."""
    import timm

    source = read_pretrained(path)
    cfg = timm.models.get_pretrained_cfg(arch)
    first_conv = (cfg.first_conv if cfg else None) or ()
    first_convs = {f"{c}.weight" for c in ((first_conv,) if isinstance(first_conv, str) else first_conv)}
    heads = (cfg.classifier if cfg else None) or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    overlay = _file_overlay(path, source, cfg, first_convs, heads)
    model = _create_from_file(arch, path, overlay, kwargs)
    state = model.state_dict()
    head_keys = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    kept, notes = 0, []
    for key, new in state.items():
        old = source.get(key)
        if old is None or key in head_keys and old.shape != new.shape:  # a head of another size: noted below
            continue
        if old.shape == new.shape and torch.equal(old.to(new.dtype), new):
            kept += 1
        else:
            notes.append(_adapted(key, old, new, model, first_convs))
    body = [k for k in state if k not in head_keys]
    loaded = sum(k in source for k in body)
    if loaded < len(body) / 2:
        raise PretrainedFileError(f"{path}: only {loaded} of {arch}'s {len(body)} tensors are in the file "
                                  "(weights of another architecture?)")
    notes += _head_notes(heads, state, kwargs.get("num_classes"), overlay.get("num_classes"))
    missing = [k for k in body if k not in source]
    if missing:
        notes.append(f"not in the file, initialised: {_key_groups(missing)}")
    unused = [k for k in source if k not in state and k not in head_keys]
    if unused:
        notes.append(f"{len(unused)} tensors of the file unused ({_key_groups(unused)})")
    return model, [f"{kept}/{len(state)} tensors copied as they are", *notes]


def _file_overlay(path: Path, source: dict, cfg, first_convs: set, heads: tuple) -> dict:
    """The file's own class and channel counts, told to timm so that it keeps a head of the right size and
    adapts the input convolution from the channels the file really has."""
    overlay: dict = {"file": str(path), "source": None}
    file_head = source.get(f"{heads[0]}.weight") if heads else None
    if file_head is not None and file_head.ndim == 2:
        overlay["num_classes"] = file_head.shape[0]
    stem = next((source[k] for k in sorted(first_convs) if k in source and source[k].ndim == 4), None)
    if stem is not None and cfg is not None and cfg.input_size:
        overlay["input_size"] = (stem.shape[1], *cfg.input_size[1:])
    return overlay


def _create_from_file(arch: str, path: Path, overlay: dict, kwargs: dict) -> nn.Module:
    import timm

    timm_log = logging.getLogger("timm")
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)  # its per-key warnings become build_model's one line
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, pretrained_strict=False,
                                 **kwargs)
    except Exception as e:
        sizes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
                           r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", str(e))
        why = (f"{sizes[0][0]} is {sizes[0][1]} in the file, {sizes[0][2]} in the model"
               + (f", and {len(sizes) - 1} more" if len(sizes) > 1 else "")) if sizes else first_line(e)
        raise PretrainedFileError(f"{path}: its weights do not fit {arch} ({why})") from None
    finally:
        timm_log.setLevel(level)


def _head_notes(heads: tuple, state: dict, n_classes, file_classes) -> list[str]:
    head_names = ", ".join(h for h in heads if f"{h}.weight" in state)
    if not head_names:
        return []
    if file_classes is None:
        return [f"{head_names} initialised ({n_classes} classes; the file has no classifier)"]
    if file_classes != n_classes:
        return [f"{head_names} re-initialised ({file_classes}→{n_classes} classes)"]
    return [f"{head_names} kept ({n_classes} classes)"]


def build_model(name: str, representation: str, n_samples: int, num_classes: int = 5, n_leads: int = 12,
                arch: str | None = None, pretrained: bool | str = False, patch_samples: int = 10, row_repeat: int = 8,
                drop_path_rate: float = 0.0, drop_rate: float = 0.0, stem_patch: tuple[int, int] | None = None,
                timm_kwargs: dict | None = None, **_ignored) -> nn.Module:
    """Build model `name` for inputs of `representation` over `n_samples` time samples. `stem_patch` (convnext
    only) replaces its 4×4 patchify stem by a rows × samples one, e.g. (8, 2) on `rows` = one lead × 20 ms per
    token instead of half a lead × 40 ms, at the same number of tokens. `timm_kwargs` go to timm.create_model as
    they are (e.g. {ls_init_value = 1.0} for convnext). `pretrained` as a path loads that weights file through
    timm, which adapts it to the input (channels, patch size, token grid); one line says what changed."""
    if name in NETS1D:
        if isinstance(pretrained, (str, os.PathLike)):
            raise ValueError(f"{name} is a 1-D network: pretrained weights files are for the timm families")
        if representation != "signal":
            raise ValueError(f"{name} is a 1-D model: use representation 'signal', not {representation!r}")
        return NETS1D[name](num_classes=num_classes, in_channels=n_leads)
    _check_2d(name, representation, stem_patch)
    chans, *spatial = input_shape(representation, n_leads, n_samples, row_repeat)
    kwargs = dict(num_classes=num_classes, in_chans=chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                  **(timm_kwargs or {}))
    if name in TRANSFORMERS:
        kwargs.update(img_size=tuple(spatial), **_patch_size(representation, n_leads, patch_samples, row_repeat))
    timm_arch = arch or TIMM_FAMILIES[name]
    notes = None
    if isinstance(pretrained, (str, os.PathLike)):
        model, notes = _from_file(timm_arch, Path(pretrained).expanduser(), kwargs)
    else:
        model = _create_timm(timm_arch, bool(pretrained), kwargs)
    if stem_patch:
        _replace_stem(model, tuple(stem_patch), notes)
    if representation == "strip":
        time_only_kernels(model)
        if notes is not None:
            notes.append("then every kernel cut to its middle row (strip)")
    if notes is not None and int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrained weights from {Path(pretrained).expanduser()}: {'; '.join(notes)}", flush=True)
    return model


def _check_2d(name: str, representation: str, stem_patch) -> None:
    """The input layouts a timm family can take (one line each when it cannot)."""
    if name not in TIMM_FAMILIES:
        raise KeyError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if representation == "signal":
        raise ValueError(f"{name} is a 2-D model: representation 'signal' is for 1-D models")
    if name not in TRANSFORMERS and representation == "leads":
        raise ValueError(f"{name} downsamples 32x and cannot take the 12-row 'leads' plane; "
                         "use 'strip', 'rows' or 'seed'")
    if name in TRANSFORMERS and representation == "strip":
        raise ValueError(f"{name} is a transformer: 'strip' is for CNNs; use 'leads' (patches span all 12 leads)")
    if stem_patch and name != "convnext":
        raise ValueError(f"stem_patch is a convnext option, not {name}'s")


def _patch_size(representation: str, n_leads: int, patch_samples: int, row_repeat: int) -> dict:
    """A transformer's patch grid per layout (timm's own 16×16 otherwise)."""
    if representation == "leads":  # every token spans all 12 leads × patch_samples samples
        return {"patch_size": (n_leads, patch_samples)}
    if representation == "seed":  # 182×256 tiles exactly into 14×16 patches (13×16 tokens)
        return {"patch_size": (14, 16)}
    if representation == "rows":
        return {"patch_size": (row_repeat, patch_samples)}
    return {}


def _create_timm(timm_arch: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    try:
        return timm.create_model(timm_arch, pretrained=pretrained, **kwargs)
    except Exception as e:  # timm raises hub/HTTP/OS errors when pretrained weights cannot be fetched
        if pretrained:
            raise PretrainedUnavailable(
                f"cannot fetch pretrained weights for {timm_arch} ({type(e).__name__}: {e}); they need the "
                "internet (Hugging Face hub) — download them elsewhere and set pretrained = \"/path/to/file"
                ".safetensors\", or train from scratch with pretrained = false") from None
        raise


def _replace_stem(model: nn.Module, stem_patch: tuple[int, int], notes: list | None) -> None:
    """convnext's patchify stem as a rows × samples kernel; timm builds it from an int only (its stride
    bookkeeping needs one). A pretrained stem is resampled as timm resamples ViT patch embeddings."""
    stem = model.stem[0]
    model.stem[0] = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=stem_patch, stride=stem_patch,
                              bias=stem.bias is not None)
    if notes is None:
        return
    from timm.layers import resample_patch_embed

    with torch.no_grad():
        model.stem[0].weight.copy_(resample_patch_embed(stem.weight, list(stem_patch)))
        if stem.bias is not None:
            model.stem[0].bias.copy_(stem.bias)
    notes.append(f"stem.0 {stem.kernel_size[0]}x{stem.kernel_size[1]}→{stem_patch[0]}x{stem_patch[1]} "
                 "kernel resampled (stem_patch)")


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
    return dict(arch=cfg.get("arch"), patch_samples=cfg["patch_samples"], row_repeat=cfg["row_repeat"],
                stem_patch=cfg.get("stem_patch"), timm_kwargs=cfg.get("timm_kwargs"))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
