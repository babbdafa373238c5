"""Save and load every model artifact the project makes — trained runs and compressed variants —
without running pickled code: weights go in safetensors, int8 graphs in torch.export's .pt2 format.

A variant folder holds `variant.json` (what was done, and which run it came from) and one artifact:
  fp32     the run's best.safetensors (config.json beside it rebuilds the network)
  pruned   sparse.safetensors: each pruned weight as a packed bit mask + its non-zero values
  dynamic  int8.safetensors: int8 Linear weights with their scales, other tensors as they were
  static / qat   model.pt2: an exported int8 program (PT2E, X86 inductor quantizer)
  onnx_fp32 / onnx_int8   model.onnx, run by ONNX Runtime (eval/export_onnx.py, shared/onnx_model.py)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from shared.io import load_weights, read_json, save_weights
from shared.nets import build_model
from shared.paths import runs_dir


def build_from_config(cfg: dict, sampling_rate: int = 100) -> nn.Module:
    n_samples = int(round(cfg.get("crop_seconds", 10.0) * sampling_rate))
    return build_model(cfg["model"], cfg["representation"], n_samples, arch=cfg.get("arch"),
                       patch_samples=cfg.get("patch_samples", 10), row_repeat=cfg.get("row_repeat", 8))


def find_run(model: str, profile: str, representation: str | None = None) -> Path:
    """The training run `make train-<model>` writes for this profile (and the config's default representation)."""
    from shared import config as config_mod

    rep = representation or config_mod.resolve(model, profile)["representation"]
    run = runs_dir() / f"{model}-{rep}-{profile}"
    if not (run / "best.safetensors").exists():
        raise FileNotFoundError(f"{run}: no trained model; run `make train-{model} PROFILE={profile}` first")
    return run


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """(fp32 model in eval mode, resolved training config) from a training run folder."""
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json")
    model = build_from_config(cfg, cfg.get("sampling_rate", 100))
    model.load_state_dict(load_weights(run_dir / "best.safetensors"))
    return model.eval(), cfg


# ------------------------------------------------------------------ pruned: bit mask + values
def save_sparse(path: Path, state_dict: dict, sparse_keys: list[str], metadata: dict | None = None) -> None:
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        if k in sparse_keys:
            mask = (v != 0).numpy().reshape(-1)
            tensors[f"{k}::mask"] = torch.from_numpy(np.packbits(mask))
            tensors[f"{k}::values"] = v.reshape(-1)[torch.from_numpy(mask)]
            tensors[f"{k}::shape"] = torch.tensor(v.shape, dtype=torch.int64)
        else:
            tensors[k] = v
    save_weights(path, tensors, metadata)


def load_sparse(path: Path) -> dict:
    raw = load_weights(path)
    out = {}
    for k, v in raw.items():
        if k.endswith("::mask"):
            name = k[:-6]
            shape = tuple(raw[f"{name}::shape"].tolist())
            n = int(np.prod(shape))
            mask = torch.from_numpy(np.unpackbits(v.numpy())[:n].astype(bool))
            dense = torch.zeros(n, dtype=raw[f"{name}::values"].dtype)
            dense[mask] = raw[f"{name}::values"]
            out[name] = dense.reshape(shape)
        elif not (k.endswith("::values") or k.endswith("::shape")):
            out[k] = v
    return out


# ------------------------------------------------------------------ dynamic int8: int8 weights + scales
def quantize_dynamic(model: nn.Module) -> nn.Module:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)


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


# ------------------------------------------------------------------ static / QAT: exported programs
def drop_unused_attributes(graph_module: nn.Module) -> nn.Module:
    """convert_pt2e leaves the fp32 originals of every quantized weight on the module, unused; exporting
    them would make the int8 file bigger than the fp32 one."""
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(graph_module.named_parameters()) + list(graph_module.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attr)
    return graph_module


def save_exported(path: Path, module: nn.Module, example: torch.Tensor) -> None:
    import io

    from shared.io import write_bytes_atomic

    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(drop_unused_attributes(module), (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()  # not a temporary file name: the archive would be named after it and fail to load
    torch.export.save(ep, buf)
    write_bytes_atomic(path, deflate_zip(buf.getvalue()))


def deflate_zip(archive: bytes) -> bytes:
    """torch.export stores its zip entries uncompressed; its ~1 MB JSON graph and int64 per-channel zero
    points deflate well (vit static int8: 6.98 → 5.33 MB) and torch.export.load reads the result as is."""
    import io
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def load_exported(path: Path) -> nn.Module:
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  registers the quantized_decomposed ops

    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a loadable exported program ({str(e).splitlines()[0]})") from None
    return inference_ready(program.module())


def inference_ready(graph_module: nn.Module) -> nn.Module:
    """Exported graphs refuse .eval(); let callers treat them like any module in eval mode."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(graph_module)
    graph_module.eval()
    return graph_module


# The one batch shape compiled int8 graphs are evaluated and timed at, in compress and in eval-all alike, so
# inductor's on-disk cache can serve the second process (the same eval run twice: vit static 120 s, then 52 s;
# compress → eval-all was not measured apart, and QAT graphs still took 260–430 s to score in make all).
COMPILED_BATCH = 32
COMPILED_METHODS = ("static", "qat")  # PT2E int8 graphs run int8 kernels only after inductor lowering


def compile_int8(module: nn.Module) -> nn.Module:
    """PT2E int8 graphs only run int8 kernels once inductor lowers them (freezing prepacks weights).
    dynamic=False: one static graph per batch shape. With automatic dynamic shapes the second shape seen
    (e.g. batch 1 after batch 32) made a symbolic-batch graph that later failed on batch 32 with a stride
    assertion (effnetv2 QAT, torch 2.14)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(inference_ready(module), dynamic=False)


# ------------------------------------------------------------------ any variant
def channels_last_if_configured(model: nn.Module, cfg: dict) -> nn.Module:
    """A CNN whose config trained it channels_last (measured faster on this CPU) runs inference that way too;
    convolutions follow their weights' memory format, so inputs need no change."""
    if cfg.get("channels_last") and cfg.get("representation") != "signal":
        model = model.to(memory_format=torch.channels_last)
    return model


def load_variant(variant_dir: str | Path, compiled: bool = False) -> tuple[nn.Module, dict, dict]:
    """(callable model, training config, variant.json) for any variant folder or training run folder."""
    variant_dir = Path(variant_dir)
    if (variant_dir / "best.safetensors").exists() and not (variant_dir / "variant.json").exists():
        model, cfg = load_run(variant_dir)
        return channels_last_if_configured(model, cfg), cfg, {"method": "fp32", "run": str(variant_dir)}
    info = read_json(variant_dir / "variant.json")
    run = Path(info["run"])
    cfg = read_json(run / "config.json")
    method = info["method"]
    if method == "pruned":
        model = build_from_config(cfg, cfg.get("sampling_rate", 100))
        model.load_state_dict(load_sparse(variant_dir / info["artifact"]))
        return channels_last_if_configured(model.eval(), cfg), cfg, info
    if method == "dynamic":
        model = build_from_config(cfg, cfg.get("sampling_rate", 100))
        return channels_last_if_configured(load_dynamic(variant_dir / info["artifact"], model), cfg), cfg, info
    if method in ("static", "qat"):
        module = load_exported(variant_dir / info["artifact"])
        return (compile_int8(module) if compiled else module), cfg, info
    if method in ("onnx_fp32", "onnx_int8"):
        from shared.onnx_model import OnnxModel

        return OnnxModel(variant_dir / info["artifact"]), cfg, info
    raise ValueError(f"{variant_dir / 'variant.json'}: unknown method {method!r}")


def nonzero_parameters(state_dict: dict) -> tuple[int, int]:
    total = nz = 0
    for v in state_dict.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            total += v.numel()
            nz += int((v != 0).sum())
    return total, nz


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
