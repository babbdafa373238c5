"""A structurally pruned network (fewer channels, heads, hidden units) saved and rebuilt without pickle.

The pruned network is the run's architecture with some layers narrower. The folder holds its weights
(structured.safetensors) and shapes.json: for each layer that differs from a fresh build of the run's config,
its type, the constructor attributes that changed (in/out channels, groups, features, heads, …) and the
shapes of its own parameters and buffers. `rebuild` builds the original architecture, resizes those layers to
the recorded shapes (empty tensors, attributes set) and `load_structured` then loads the weights strictly, so
every tensor must match the file exactly. Nothing in the folder is executed.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from shared.io import load_weights, read_json, save_weights, write_json_atomic

WEIGHTS_FILE = "structured.safetensors"
SHAPES_FILE = "shapes.json"
FORMAT = 1

# Constructor attributes that pruning changes and forward passes read (timm Attention reshapes by num_heads,
# head_dim and attn_dim; grouped/depthwise convolutions by groups). Only these may be set from shapes.json.
ATTRIBUTES = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
              "normalized_shape", "num_channels", "num_groups", "num_heads", "head_dim", "attn_dim", "scale")


def _own_tensors(module: nn.Module) -> dict[str, list[int]]:
    tensors = {n: list(p.shape) for n, p in module._parameters.items() if p is not None}
    tensors.update({n: list(b.shape) for n, b in module._buffers.items() if b is not None})
    return tensors


def _attributes(module: nn.Module) -> dict:
    out = {}
    for name in ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
            out[name] = list(value)
    return out


def module_shapes(model: nn.Module, reference: nn.Module | None = None) -> dict:
    """{module name: {type, attrs, tensors}} for every module with parameters, buffers or size attributes; with
    `reference` (a fresh build of the same architecture) only the modules that differ from it."""
    ref = dict(reference.named_modules()) if reference is not None else {}
    shapes = {}
    for name, module in model.named_modules():
        entry = {"type": type(module).__name__, "attrs": _attributes(module), "tensors": _own_tensors(module)}
        if not entry["attrs"] and not entry["tensors"]:
            continue
        if name in ref:
            other = ref[name]
            if (type(other).__name__ == entry["type"] and _attributes(other) == entry["attrs"]
                    and _own_tensors(other) == entry["tensors"]):
                continue
        shapes[name] = entry
    return shapes


def resize(model: nn.Module, shapes: dict, source: str = SHAPES_FILE) -> nn.Module:
    """Resize the listed modules of `model` in place: empty tensors of the recorded shapes, attributes set."""
    if not isinstance(shapes, dict):
        raise ValueError(f"{source}: 'modules' must map module names to entries")
    for name, entry in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{source}: the network has no module {name!r}") from None
        if not isinstance(entry, dict) or entry.get("type") != type(module).__name__:
            raise ValueError(f"{source}: {name!r} is a {type(module).__name__}, the file says "
                             f"{entry.get('type') if isinstance(entry, dict) else entry!r}")
        for attr, value in (entry.get("attrs") or {}).items():
            if attr not in ATTRIBUTES or not hasattr(module, attr):
                raise ValueError(f"{source}: {name!r}: attribute {attr!r} may not be set")
            if isinstance(value, list):
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise ValueError(f"{source}: {name!r}.{attr}: expected integers, got {value!r}")
                value = tuple(value)
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{source}: {name!r}.{attr}: expected a number, got {value!r}")
            setattr(module, attr, value)
        for tname, shape in (entry.get("tensors") or {}).items():
            if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                    for s in shape)):
                raise ValueError(f"{source}: {name!r}.{tname}: bad shape {shape!r}")
            if module._parameters.get(tname) is not None:
                old = module._parameters[tname]
                module._parameters[tname] = nn.Parameter(torch.empty(shape, dtype=old.dtype),
                                                         requires_grad=old.requires_grad)
            elif module._buffers.get(tname) is not None:
                module._buffers[tname] = torch.empty(shape, dtype=module._buffers[tname].dtype)
            else:
                raise ValueError(f"{source}: {name!r} has no parameter or buffer {tname!r}")
    return model


def rebuild(cfg: dict, shapes: dict, source: str = SHAPES_FILE) -> nn.Module:
    """The run's architecture (build_from_config) with the layers in `shapes` resized; weights uninitialised."""
    from shared.runs import build_from_config

    return resize(build_from_config(cfg), shapes, source)


def save_structured(directory: str | Path, model: nn.Module, cfg: dict) -> dict:
    """Write structured.safetensors + shapes.json (each atomically); returns what was written."""
    from shared.runs import build_from_config

    directory = Path(directory)
    reference = build_from_config(cfg)
    shapes = module_shapes(model, reference)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_weights(directory / WEIGHTS_FILE, state)
    write_json_atomic(directory / SHAPES_FILE, {"format": FORMAT, "model": cfg["model"], "modules": shapes})
    return {"artifact": WEIGHTS_FILE, "shapes": SHAPES_FILE, "resized_modules": len(shapes)}


def load_structured(directory: str | Path, cfg: dict) -> nn.Module:
    """The pruned network in eval mode, from structured.safetensors + shapes.json."""
    directory = Path(directory)
    shapes_path = directory / SHAPES_FILE
    meta = read_json(shapes_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{shapes_path}: not a shapes file of format {FORMAT}")
    if meta.get("model") != cfg["model"]:
        raise ValueError(f"{shapes_path}: made for {meta.get('model')!r}, the run is {cfg['model']!r}")
    model = rebuild(cfg, meta.get("modules"), str(shapes_path))
    state = load_weights(directory / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{directory / WEIGHTS_FILE}: does not fit {SHAPES_FILE} "
                         f"({' '.join(s.strip() for s in first[:2])[:300]})") from None
    return model.eval()
