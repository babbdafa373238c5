"""Model configs: TOML files beside the models, resolved as
base keys → [representations.<repr>] → [profiles.<profile>] → tuned config → command-line overrides.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from shared.paths import REPO_ROOT, tune_dir

CONFIG_DIR = REPO_ROOT / "models" / "configs"
PROFILES = ("quick", "cpu", "full")
# The inputs each family's architecture takes (shared.nets.build_model refuses the others). Here, not in
# shared.nets, so that a mistyped --representation fails before torch is imported or a run folder is made.
_TRANSFORMER, _CNN, _1D = ("seed", "rows", "leads"), ("seed", "rows", "strip"), ("signal",)
MODEL_REPRESENTATIONS = {"vit": _TRANSFORMER, "deit": _TRANSFORMER, "effnetv2": _CNN, "convnext": _CNN,
                         "resnet1d_wang": _1D, "xresnet1d101": _1D, "xresnet1d50": _1D, "xresnet1d_small": _1D}


# The one table of defaults: the value of every key a model's TOML (or a run's config.json) may leave out. resolve()
# and shared.runs.read_config fill them in, so code reads cfg["key"] and never carries a fallback of its own.
DEFAULTS = {
    "sampling_rate": 100,          # Hz of the cache the model trains on (100 or 500)
    "seed": 0,
    "crop_seconds": 10.0,          # training crop; PTB-XL records are 10 s
    "eval_stride_seconds": None,   # stride of the evaluation windows; None: half a crop
    "eval_batch_size": 64,
    "schedule": "cosine",
    "warmup_epochs": 1,
    "patience": 10**9,             # epochs without a better val AUC before stopping; 10**9: never
    "grad_clip": 1.0,              # max gradient norm (0: none), training and every compression fine-tune
    "label_smoothing": 0.0,
    "drop_rate": 0.0,
    "drop_path_rate": 0.0,
    "pretrained": False,           # false, true (Hugging Face hub) or a weights file
    "row_repeat": 8,               # rows representation: pixel rows per lead
    "patch_samples": 10,           # leads representation: samples per patch
    "channels_last": False,        # CNN memory format (training and inference)
    "bf16_cpu": False,
    "amp_cuda": True,
    "teacher": None,               # distillation (shared/distill.py): a model name, a,b, a run folder; "none": off
    "kd_alpha": 0.5,               # weight of the teacher's term
    "kd_temperature": 2.0,
    "kd_mode": "soft",             # soft | hard
}


def with_defaults(cfg: dict) -> dict:
    return {**DEFAULTS, **cfg}


def config_path(model: str) -> Path:
    return CONFIG_DIR / f"{model}.toml"


def tuned_path(model: str) -> Path:
    return tune_dir(model) / "best_config.toml"


def parse_value(text: str):
    """'3e-4' → 3e-4, 'true' → True, 'rows' → 'rows' (TOML value syntax, bare strings allowed)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict:
    """`--set KEY=VALUE` items → {KEY: parsed VALUE}, later items winning; ValueError names an item without '='."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = parse_value(value.strip())
    return overrides


def parse_ranges(text: str) -> list[int]:
    """'1-8' or '1,2,3' or '9' → a list of ints (folds, ecg_ids)."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"{text!r}: not a list like 1-8 or 1,2,3") from None
    return out


def read_model_config(model: str) -> tuple[Path, dict]:
    """(path, parsed TOML) of models/configs/<model>.toml; a missing or invalid file is one line naming it."""
    path = config_path(model)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config for model {model!r}")
    try:
        return path, tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML ({e})") from None


def search_space(model: str, distill: bool = False) -> dict:
    """The [search] table of a model's config: {key: [choices] | {low, high[, log]}} (models/tune.py); with
    `distill` (a teacher is set) also its [search_distill] table (kd_alpha, kd_temperature)."""
    path, raw = read_model_config(model)
    space = raw.get("search", {})
    if not space:
        raise ValueError(f"{path}: no [search] table; add one to tune {model!r}")
    return {**space, **raw.get("search_distill", {})} if distill else space


def resolve(model: str, profile: str = "cpu", representation: str | None = None, config: str = "default",
            overrides: dict | None = None) -> dict:
    path, raw = read_model_config(model)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {PROFILES}")
    reps, profiles = raw.pop("representations", {}), raw.pop("profiles", {})
    raw.pop("search", None)  # the tuner's search space (search_space()), not a training key
    raw.pop("search_distill", None)
    cfg = with_defaults(raw)
    tuned = {}
    if config == "tuned":
        tp = tuned_path(model)
        if not tp.exists():
            raise FileNotFoundError(f"{tp}: no tuned config for {model!r}; run `make tune-{model}` first")
        tuned = tomllib.loads(tp.read_text())
    elif config != "default":
        tuned = tomllib.loads(Path(config).read_text())
    rep = representation or tuned.get("representation") or cfg["representation"]
    check_representation(model, rep)
    cfg.update(reps.get(rep, {}))
    cfg.update(profiles.get(profile, {}))
    cfg.update(tuned)
    cfg.update(overrides or {})
    cfg.update(model=model, representation=rep, profile=profile, config=config)
    cfg["teacher"] = no_teacher_as_none(cfg["teacher"])
    check_pretrained(cfg.get("pretrained", False), model)
    return cfg


def no_teacher_as_none(value):
    """`teacher = "none"` (TEACHER=none) switches off a profile's default teacher; "" means the same."""
    return None if value is None or str(value).strip().lower() in ("", "none") else value


_checked_files: dict[tuple, None] = {}


def check_pretrained(value, model: str | None = None) -> None:
    """`pretrained` is true, false or a weights file; a file that is missing, damaged or holds more than
    weights fails here, as one line, before training makes a run folder. Each file version is read once."""
    if isinstance(value, bool):
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"pretrained = {value!r}: use false, true (Hugging Face hub) or the path of a "
                         ".safetensors / .pth weights file")
    if MODEL_REPRESENTATIONS.get(model) == _1D:
        raise ValueError(f"pretrained = {value!r}: {model} is a 1-D network; pretrained weights files are for the "
                         "timm families (vit, deit, effnetv2, convnext)")
    path = Path(value).expanduser()
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    if key is not None and key in _checked_files:
        return
    from shared.nets import read_pretrained  # torch: only when a file is named

    read_pretrained(path)  # PretrainedFileError (a ValueError): "<file>: <problem>"
    if key is not None:
        _checked_files[key] = None


def check_representation(model: str, representation: str) -> None:
    valid = MODEL_REPRESENTATIONS.get(model)
    if valid is not None and representation not in valid:
        raise ValueError(f"representation {representation!r} does not fit {model}; choose from {', '.join(valid)}")
