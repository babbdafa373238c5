"""Save and load every model artifact the project makes — trained runs and compressed variants —
without running pickled code: weights go in safetensors, int8 graphs in torch.export's .pt2 format.

A variant folder holds `variant.json` (what was done, and which run it came from) and one artifact:
  fp32     the run's best.safetensors (config.json beside it rebuilds the network)
  pruned   sparse.safetensors: each pruned weight as a packed bit mask + its non-zero values
  dynamic  int8.safetensors: int8 Linear weights with their scales, other tensors as they were
  static / qat   model.pt2: an exported int8 program (PT2E, X86 inductor quantizer); model.x86.pt2 beside it
                 is its AOTInductor build for this machine's CPU (a cache, rebuilt when stale: load_compiled)
  onnx_fp32 / onnx_int8   model.onnx, run by ONNX Runtime (compression/export_onnx.py, shared/onnx_model.py)
  structured  structured.safetensors + shapes.json: a narrower dense network (shared/structured.py)
  openvino_fp32 / openvino_int8   model.xml + model.bin, an OpenVINO IR (NNCF int8), run by OpenVINO
                 (compression/openvino_export.py, shared/openvino_model.py)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from shared import trust
from shared.io import first_line, load_weights, read_json, save_weights, sha256_file
from shared.nets import architecture_kwargs, build_model
from shared.paths import runs_dir


def build_from_config(cfg: dict, sampling_rate: int = 100) -> nn.Module:
    n_samples = int(round(cfg.get("crop_seconds", 10.0) * sampling_rate))
    return build_model(cfg["model"], cfg["representation"], n_samples, **architecture_kwargs(cfg))


def find_run(model: str, profile: str, representation: str | None = None, distilled: bool = False) -> Path:
    """The training run `make train-<model>` writes for this profile (and the config's default representation);
    `distilled`: the one `make train-<model> TEACHER=…` writes (<run>-kd)."""
    from shared import config as config_mod

    rep = representation or config_mod.resolve(model, profile)["representation"]
    run = runs_dir() / f"{model}-{rep}-{profile}{'-kd' if distilled else ''}"
    if not (run / "best.safetensors").exists():
        teacher = " TEACHER=<teacher>" if distilled else ""
        raise FileNotFoundError(f"{run}: no trained model; run `make train-{model} PROFILE={profile}{teacher}` first")
    return run


def training_run(path: str | Path) -> Path:
    """A run folder given on the command line: the path as given, else the name under artifacts/runs."""
    path = Path(path)
    run = path if path.exists() else runs_dir() / str(path)
    if not (run / "best.safetensors").exists():
        raise FileNotFoundError(f"{run}: not a training run (no best.safetensors)")
    return run


def load_run(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """(fp32 model in eval mode, resolved training config) from a training run folder."""
    run_dir = Path(run_dir)
    cfg = read_json(run_dir / "config.json")
    model = build_from_config(cfg, cfg.get("sampling_rate", 100))
    model.load_state_dict(load_weights(run_dir / "best.safetensors"))
    return model.eval(), cfg


def checkpoint_sha256(run_dir: Path) -> str:
    """Identity of the weights a variant is made from; variant.json records it as `source_sha256`."""
    return sha256_file(Path(run_dir) / "best.safetensors")


def variant_is_current(variant_dir: Path, run_dir: Path, checkpoint_sha: str) -> bool:
    """A variant is finished (metrics.json) and made from the run's present checkpoint (checkpoint_sha256 of
    the run, computed once by the caller). After a retrain (`train --force`) the old variants would otherwise be
    kept and scored as the new model's. Variants from before variant.json recorded the checkpoint's sha256
    count as current when newer than the checkpoint."""
    metrics, best = Path(variant_dir) / "metrics.json", Path(run_dir) / "best.safetensors"
    if not metrics.exists():
        return False
    try:
        recorded = read_json(Path(variant_dir) / "variant.json").get("source_sha256")
    except (OSError, ValueError):
        return False
    if recorded:
        return recorded == checkpoint_sha
    return metrics.stat().st_mtime >= best.stat().st_mtime


def finished_variant(variant_dir: Path, run_dir: Path, checkpoint_sha: str, force: bool) -> dict | None:
    """The metrics.json of a variant to skip (finished, from this checkpoint), or None when it is to be made;
    says which on stdout. Compression and ONNX export resume through this."""
    if force or not (Path(variant_dir) / "metrics.json").exists():
        return None
    if variant_is_current(variant_dir, run_dir, checkpoint_sha):
        print(f"{variant_dir}: done already (metrics.json exists, made from this checkpoint)")
        return read_json(Path(variant_dir) / "metrics.json")
    print(f"{variant_dir}: made from an older checkpoint of {Path(run_dir).name}: redoing it")
    return None


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


def _load_program(path: Path):
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  registers the quantized_decomposed ops

    from shared.safe_pt2 import check_archive

    check_archive(path)  # torch.export.load would unpickle and evaluate what a crafted archive holds
    try:
        return torch.export.load(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a loadable exported program ({first_line(e)})") from None


def load_exported(path: Path) -> nn.Module:
    """The int8 program as an eager module: reference int8 arithmetic in fp32 ops, correct but slow."""
    return inference_ready(_load_program(path).module())


def inference_ready(graph_module: nn.Module) -> nn.Module:
    """Exported graphs refuse .eval(); let callers treat them like any module in eval mode."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(graph_module)
    graph_module.eval()
    return graph_module


COMPILED_METHODS = ("static", "qat")  # PT2E int8 graphs run int8 kernels only after inductor lowering
COMPILED_FILE = "model.x86.pt2"        # AOTInductor package built from model.pt2 on this machine
COMPILED_STAMP = "compiled.json"       # what it was built from, and for which torch and CPU


ISA_FEATURES = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx_vnni", "AVX-VNNI"),
                ("avx512_bf16", "bf16"), ("amx_int8", "AMX-int8"), ("amx_bf16", "AMX-bf16"))


def _cpuinfo(cpuinfo: Path) -> tuple[str, str]:
    import platform

    name, flags = platform.machine(), ""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and name == platform.machine():
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name, flags


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """Model name, core count, the instruction sets that decide int8 and bf16 speed (without VNNI int8 kernels
    gain little; without native bf16 it is emulated, ~10x slower than fp32) and a digest of all the flags: a
    compiled package uses the host's ISA, so one built elsewhere must not be loaded."""
    import hashlib
    import os

    name, flags = _cpuinfo(cpuinfo)
    present = set(flags.split())
    isa = ", ".join(label for flag, label in ISA_FEATURES if flag in present) or "ISA unknown"
    return f"{name} ({os.cpu_count()} cores; {isa}; flags {hashlib.sha256(flags.encode()).hexdigest()[:12]})"


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes bf16 natively (AVX512_BF16 or AMX-bf16); None when its flags cannot be read.
    Elsewhere CPU bf16 autocast is emulated: on an AVX2-only EPYC, effnetv2 took 226 ms per record vs 22 ms fp32."""
    _, flags = _cpuinfo(cpuinfo)
    if not flags:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def _compiled_stamp(source: Path) -> dict:
    return {"source": source.name, "source_sha256": sha256_file(source), "torch": torch.__version__,
            "cpu": host_cpu()}


def build_compiled(variant_dir: Path, artifact: str = "model.pt2") -> Path:
    """AOTInductor-compile an exported int8 program once, for every batch size (the program's batch dimension
    stays symbolic), into a package beside it. vit static int8: 59 s once, then 0.02 s to load, and faster
    than torch.compile per call (b32 111 vs 128 ms, b1 11 vs 14 ms) — torch.compile paid ~75 s again in every
    process and for every new batch shape (eval-all spent 145-451 s per int8 artifact on it)."""
    import shutil
    import tempfile
    import time

    import torch._inductor.config as inductor_config

    from shared.io import write_json_atomic

    source = variant_dir / artifact
    program = _load_program(source)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=".compiling-", dir=variant_dir))
    try:  # built under its final name in a private folder, then renamed: a killed build leaves no half package
        with inductor_config.patch(freezing=True):  # freezing prepacks the int8 weights into the kernels
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp / COMPILED_FILE))
            except Exception as e:  # inductor cannot lower a pattern, no C++ compiler, …: one line naming the file
                raise ValueError(f"{source}: AOTInductor could not build {COMPILED_FILE} from it "
                                 f"({type(e).__name__}: {first_line(e)})") from e
        (tmp / COMPILED_FILE).replace(variant_dir / COMPILED_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp = _compiled_stamp(source)
    package_sha = sha256_file(variant_dir / COMPILED_FILE)
    write_json_atomic(variant_dir / COMPILED_STAMP, {**stamp, "seconds": round(time.time() - t0, 1),
                                                     "package_sha256": package_sha,
                                                     "hmac": trust.sign(package_sha, _stamp_context(stamp))})
    return variant_dir / COMPILED_FILE


def load_compiled(variant_dir: Path, artifact: str = "model.pt2"):
    """The int8 program's compiled package, built first when missing or stale (another model.pt2, torch or CPU).
    The package holds a native shared library: it is a build product of this machine, like inductor's own
    cache, and is only loaded when its stamp matches the exported program beside it (which stays the artifact
    of record: copy model.pt2, not the package, to another machine). Load a given package once per process:
    reloading a rebuilt package from the same path in a process that had loaded the old one ran stale kernels
    (torch 2.14, seen in tests/test_compress.py)."""
    if not compiled_is_current(variant_dir, artifact):
        build_compiled(variant_dir, artifact)
    package = variant_dir / COMPILED_FILE
    try:
        return torch._inductor.aoti_load_package(str(package))
    except Exception:  # a damaged package under an intact stamp: rebuild it once
        build_compiled(variant_dir, artifact)
    try:
        return torch._inductor.aoti_load_package(str(package))
    except Exception as e:
        raise ValueError(f"{package}: freshly built, yet it does not load ({type(e).__name__}: {first_line(e)})") from e


def _stamp_context(stamp: dict) -> str:
    return json.dumps(stamp, sort_keys=True)


def compiled_is_current(variant_dir: Path, artifact: str = "model.pt2") -> bool:
    """Built from this model.pt2 for this torch and CPU, and by this user on this machine: the stamp's HMAC
    (shared/trust.py) matches the package's bytes. A package copied in from elsewhere is rebuilt, not loaded."""
    stamp_path, package = variant_dir / COMPILED_STAMP, variant_dir / COMPILED_FILE
    if not package.exists() or not stamp_path.exists():
        return False
    try:
        stamp = read_json(stamp_path)
    except ValueError:
        return False
    expected = _compiled_stamp(variant_dir / artifact)
    if any(stamp.get(k) != v for k, v in expected.items()):
        return False
    return trust.verify(sha256_file(package), stamp.get("hmac"), _stamp_context(expected))


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
    if method == "structured":  # a narrower dense network: the run's architecture resized by shapes.json
        from shared.structured import load_structured

        return channels_last_if_configured(load_structured(variant_dir, cfg), cfg), cfg, info
    if method in ("static", "qat"):
        if compiled:
            return load_compiled(variant_dir, info["artifact"]), cfg, info
        return load_exported(variant_dir / info["artifact"]), cfg, info
    if method in ("onnx_fp32", "onnx_int8"):
        from shared.onnx_model import OnnxModel

        return OnnxModel(variant_dir / info["artifact"]), cfg, info
    if method in ("openvino_fp32", "openvino_int8"):
        from shared.openvino_model import OpenVinoModel

        return OpenVinoModel(variant_dir / info["artifact"]), cfg, info
    raise ValueError(f"{variant_dir / 'variant.json'}: unknown method {method!r}")


def artifact_bytes(file: str | Path) -> int:
    """Bytes on disk of a model file, with the weights an OpenVINO IR keeps beside its XML."""
    file = Path(file)
    weights = file.with_suffix(".bin") if file.suffix == ".xml" else None
    return file.stat().st_size + (weights.stat().st_size if weights and weights.exists() else 0)


def nonzero_parameters(state_dict: dict) -> tuple[int, int]:
    total = nz = 0
    for v in state_dict.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            total += v.numel()
            nz += int((v != 0).sum())
    return total, nz


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, default=str)
