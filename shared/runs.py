"""Training runs on disk: find the run a make target wrote, rebuild its network from config.json and load its
weights (safetensors, never pickle), and name the checkpoint a compressed variant is made from."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from shared.io import load_weights, read_json, sha256_file
from shared.nets import architecture_kwargs, build_model
from shared.paths import runs_dir


def read_config(run_dir: str | Path) -> dict:
    """A run's config.json with shared.config's defaults for the keys it leaves out."""
    from shared.config import with_defaults

    return with_defaults(read_json(Path(run_dir) / "config.json"))


def build_from_config(cfg: dict) -> nn.Module:
    """The network a config describes, with freshly initialized weights."""
    n_samples = int(round(cfg["crop_seconds"] * cfg["sampling_rate"]))
    return build_model(cfg["model"], cfg["representation"], n_samples, **architecture_kwargs(cfg))


def find_run(model: str, profile: str, representation: str | None = None, distilled: bool | None = None) -> Path:
    """The training run `make train-<model>` writes for this profile (and the config's default representation):
    distilled (<run>-kd) when the profile names a teacher; `distilled` True/False asks for the run of
    `make train-<model> TEACHER=…` / `TEACHER=none`."""
    from shared import config as config_mod

    cfg = config_mod.resolve(model, profile, representation)
    distilled = bool(cfg["teacher"]) if distilled is None else distilled
    run = runs_dir() / f"{model}-{cfg['representation']}-{profile}{'-kd' if distilled else ''}"
    if not (run / "best.safetensors").exists():
        teacher = "" if distilled == bool(cfg["teacher"]) else " TEACHER=<teacher>" if distilled else " TEACHER=none"
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
    cfg = read_config(run_dir)
    model = build_from_config(cfg)
    model.load_state_dict(load_weights(run_dir / "best.safetensors"))
    return model.eval(), cfg


def checkpoint_sha256(run_dir: Path) -> str:
    """Identity of the weights a variant is made from; variant.json records it as `source_sha256`."""
    return sha256_file(Path(run_dir) / "best.safetensors")


def channels_last_if_configured(model: nn.Module, cfg: dict) -> nn.Module:
    """A CNN whose config trained it channels_last (measured faster on this CPU) runs inference that way too;
    convolutions follow their weights' memory format, so inputs need no change."""
    if cfg.get("channels_last") and cfg.get("representation") != "signal":
        model = model.to(memory_format=torch.channels_last)
    return model
