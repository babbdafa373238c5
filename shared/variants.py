"""Compressed variants of a training run. A variant folder holds `variant.json` (what was done, and which run it
came from, with that checkpoint's sha256), `metrics.json` once it is finished, and one artifact whose format is
in shared/formats/ (the package docstring lists them). This module decides whether a variant is current and
loads any variant, or a run folder, as a callable model."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from shared.io import read_json
from shared.runs import build_from_config, channels_last_if_configured, load_run, read_config


def variant_is_current(variant_dir: Path, run_dir: Path, checkpoint_sha: str) -> bool:
    """A variant is finished (metrics.json) and made from the run's present checkpoint (checkpoint_sha256 of
    the run, computed once by the caller). After a retrain (`train --force`) the old variants would otherwise be
    kept and scored as the new model's. A variant.json without the checkpoint's sha256 is not current."""
    if not (Path(variant_dir) / "metrics.json").exists():
        return False
    try:
        recorded = read_json(Path(variant_dir) / "variant.json").get("source_sha256")
    except (OSError, ValueError):
        return False
    return bool(recorded) and recorded == checkpoint_sha


def fp32_modules_changed(variant_dir: Path, model: str) -> bool:
    """An int8 variant whose variant.json records other modules kept in fp32 than shared.nets.INT8_FP32_MODULES
    names for its family now (made by an earlier recipe: to be redone); False while nothing is made yet."""
    from shared.nets import int8_fp32_modules

    return recipe_changed(variant_dir, "fp32_modules", list(int8_fp32_modules(model)[0]), [],
                          "other modules in fp32 than")


def export_form_changed(variant_dir: Path, model: str) -> bool:
    """An OpenVINO variant made from another form of the network than shared.export_form
    gives its family now: to be redone; False while nothing is made yet."""
    from shared.export_form import export_form

    return recipe_changed(variant_dir, "export_form", export_form(model), None, "another export form than")


def recipe_changed(variant_dir: Path, key: str, wanted, absent, what: str) -> bool:
    """A made variant whose variant.json records `key` ≠ `wanted` (`absent` when it lacks the key): an earlier
    recipe, to be redone (says so in one line); False while nothing is made yet."""
    info_path = Path(variant_dir) / "variant.json"
    if not info_path.exists() or read_json(info_path).get(key, absent) == wanted:
        return False
    print(f"{variant_dir}: made with {what} {wanted}: redoing it")
    return True


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

def load_variant(variant_dir: str | Path, compiled: bool = False) -> tuple[nn.Module, dict, dict]:
    """(callable model, training config, variant.json) for any variant folder or training run folder."""
    variant_dir = Path(variant_dir)
    if (variant_dir / "best.safetensors").exists() and not (variant_dir / "variant.json").exists():
        model, cfg = load_run(variant_dir)
        return channels_last_if_configured(model, cfg), cfg, {"method": "fp32", "run": str(variant_dir)}
    info = read_json(variant_dir / "variant.json")
    run = Path(info["run"])
    cfg = read_config(run)
    method = info["method"]
    if method == "pruned":
        from shared.formats.sparse import load_sparse

        model = build_from_config(cfg)
        model.load_state_dict(load_sparse(variant_dir / info["artifact"]))
        return channels_last_if_configured(model.eval(), cfg), cfg, info
    if method == "dynamic":
        from shared.formats.dynamic_int8 import load_dynamic

        model = build_from_config(cfg)
        return channels_last_if_configured(load_dynamic(variant_dir / info["artifact"], model), cfg), cfg, info
    if method == "structured":  # a narrower dense network: the run's architecture resized by shapes.json
        from shared.structured import load_structured

        return channels_last_if_configured(load_structured(variant_dir, cfg), cfg), cfg, info
    if method in ("static", "qat"):
        from shared.formats.compiled import load_compiled
        from shared.formats.exported import load_exported

        if compiled:
            return load_compiled(variant_dir, info["artifact"]), cfg, info
        return load_exported(variant_dir / info["artifact"]), cfg, info
    if method in ("onnx_fp32", "onnx_int8"):
        from shared.formats.onnx_model import OnnxModel

        return OnnxModel(variant_dir / info["artifact"]), cfg, info
    if method in ("openvino_fp32", "openvino_int8"):
        from shared.formats.openvino_model import OpenVinoModel

        return OpenVinoModel(variant_dir / info["artifact"]), cfg, info
    raise ValueError(f"{variant_dir / 'variant.json'}: unknown method {method!r}")


def artifact_bytes(file: str | Path) -> int:
    """Bytes on disk of a model file, with the weights an OpenVINO IR keeps beside its XML."""
    file = Path(file)
    weights = file.with_suffix(".bin") if file.suffix == ".xml" else None
    return file.stat().st_size + (weights.stat().st_size if weights and weights.exists() else 0)
