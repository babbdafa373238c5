"""Structured pruning of a trained run: `python -m compression.prune_structured --model vit` → a smaller dense
network in artifacts/compressed/<run>/structured/ (`make prune-structured-<model>`).

Unstructured pruning (compression/compress.py, method "prune") zeroes weights but keeps every tensor's shape, so
the network runs no faster. Here whole units go: channels of the CNNs (effnetv2, convnext, resnet1d_wang,
xresnet1d101), attention heads and MLP hidden units of the transformers (vit, deit; the embedding width and the
classifier heads stay). Torch-Pruning's dependency graph removes every tensor slice that is coupled to a removed
unit (skip connections, depthwise convolutions, BatchNorm, the concat-pool head).

How:
  * PRUNE_STEPS small steps, each removing the same fraction of the remaining units from every layer (heads:
    that fraction of all heads, least important first across blocks, at least MIN_HEADS per block), the
    fraction chosen so that step k leaves (1 − target·k/steps) of the parent's parameters (or MACs); each step
    is followed by a short fine-tune, the last by the recovery fine-tune. Extra steps run until the target is
    met, so the reduction reached is ≥ the target.
  * importance (IMPORTANCE, --importance): group L2 magnitude, or first-order Taylor |w·∂L/∂w| from
    TAYLOR_BATCHES training batches before each step. FAMILY_RECIPES changes importance and fine-tune lengths
    for the families the defaults did not recover; a variant made by another recipe than today's is redone.
  * fine-tuning distils from the unpruned parent (frozen, eval mode) on the same random crops the student sees:
    loss = (1−α)·BCE(s, y) + α·BCE(σ(s/T), σ(t/T)) per class (shared/distill.py; KD_ALPHA, KD_T; --kd-alpha 0 = plain
    fine-tuning).
  * the artifact is structured.safetensors + shapes.json, rebuilt without pickle by shared/structured.py.
  * --then-int8 also writes the pruned network's OpenVINO fp32 IR to structured_openvino_fp32/ (what pruning buys
    in a graph runtime, without eager PyTorch's per-module cost) and its NNCF int8 IR to
    structured_openvino_int8/ (the same conversion and calibration as compression/openvino_export.py).

Why magnitude importance and α = 0.5: docs/benchmarks.md ("Structured pruning: importance and distillation").
Scored on the validation fold only (eval-all reads test once). A finished variant of the run's present
checkpoint is skipped unless --force.
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


from shared.cli import add_output_args, add_run_choice, chosen_run
from shared.runs import channels_last_if_configured, checkpoint_sha256, load_run
from shared.variants import finished_variant, recipe_changed
from shared.cache import open_cache
from shared.dataset import ECGDataset, make_loader
from shared.distill import kd_loss
from shared.io import first_line, library_versions, read_json, sha256_file, write_json_atomic
from shared.nets import count_parameters
from shared.paths import compressed_dir, data_cache_dir
from shared.results import record_variant
from shared.structured import SHAPES_FILE, WEIGHTS_FILE, load_structured, save_structured
from shared.progress import meter
from shared.inputs import InputAdapter
from shared.prediction import validation_scores
from shared.training import train_step

# Knobs
METHOD = "structured"
INT8_VARIANT = "structured_openvino_int8"
FP32_IR_VARIANT = "structured_openvino_fp32"
IMPORTANCE = "magnitude"       # magnitude | taylor (docs/benchmarks.md: magnitude won 3 of 4)
FAMILY_RECIPES = {             # where the defaults lost val AUC or speed on the sample's cpu run (docs/benchmarks.md)
    "xresnet1d101": {"importance": "taylor", "step_batches": 50, "finetune_epochs": 4},  # + int8 −0.0022 (−0.0048
                               # with the default lengths; magnitude −0.0052)
    "effnetv2": {"importance": "taylor", "step_batches": 50, "finetune_epochs": 4},  # −0.0021 (defaults −0.0218)
    "vit": {"target": 0.5},    # + int8 −0.0022, b32 4.84× fp32 (0.4: −0.0013, 3.91–4.03×); deit at 0.5 −0.0079
    "deit": {"importance": "taylor"},  # distilled run: + int8 −0.0011 (magnitude −0.0056; longer fine-tune −0.0017)
}
TARGET_PARAMS = 0.4            # fraction of the parent's parameters to remove (or --target-macs)
PRUNE_STEPS = 4                # small steps, each followed by STEP_FINETUNE_BATCHES of fine-tuning
STEP_FINETUNE_BATCHES = 25     # ~3 epochs over 4 steps on the sample; 100 cost ~2.7 min a step per model
FINETUNE_EPOCHS = 1            # recovery fine-tune after the last step
FINETUNE_LR_FACTOR = 0.1       # × the run's learning rate, as compress.py's fine-tune
KD_ALPHA = 0.5                 # weight of the distillation term; 0 = plain fine-tuning on the labels
KD_T = 2.0                     # distillation temperature
TAYLOR_BATCHES = 4             # training batches whose gradients give the Taylor importance
MIN_HEADS = 1                  # attention heads every transformer block keeps
MAX_STEP_RATIO = 0.8           # most of a layer's remaining units one step may remove
EXTRA_STEPS = 3                # further steps allowed when the planned ones fall short of the target
RATIO_SEARCH_ITERS = 12        # trials (on copies) to find each step's fraction
RATIO_TOLERANCE = 0.002        # a step may overshoot its planned count by this fraction of the parent's
ROUND_TO = 8                   # widths rounded to the nearest multiple (narrower layers kept): resnet1d_wang b32
                               # on 1 thread ran 844 vs 667 windows/s unrounded (−43 % vs −41 % MACs), vit,
                               # effnetv2, convnext 1-5 % faster
CALIBRATION_BATCHES = 16       # int8 calibration, as compress.py and openvino_export.py
MIN_INT8_BUDGET = 0.001        # the int8 step's val AUC budget: openvino_export's less what pruning lost, at least this
SPEED_ROUNDS = 5               # alternating rounds of pruned vs parent forward timing
SPEED_RUNS = 3                 # timed forwards per model and round
QUICK_STEP_BATCHES = 2
QUICK_FINETUNE_BATCHES = 3
QUICK_TAYLOR_BATCHES = 1
QUICK_CALIBRATION_BATCHES = 3
QUICK_SPEED_ROUNDS = 2

warnings.filterwarnings("ignore", message=".*quantize_dynamic.*")


# ------------------------------------------------------------------ what may be pruned
def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The output layers (their 5 outputs are the classes): timm's get_classifier (deit has two), else the last
    Linear (the 1-D nets' concat-pool head)."""
    if hasattr(model, "get_classifier"):
        c = model.get_classifier()
        layers = list(c) if isinstance(c, (tuple, list)) else [c]
    else:
        layers = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    return [m for m in layers if isinstance(m, nn.Module)]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    from timm.layers import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def make_importance(kind: str):
    import torch_pruning as tp

    if kind == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if kind == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown importance {kind!r}; choose magnitude or taylor")


# ------------------------------------------------------------------ one pruning step
def prune_step(model: nn.Module, ratio: float, importance, example: torch.Tensor) -> dict:
    """Remove `ratio` of the remaining units of every prunable layer, in place; transformers: of their MLP hidden
    units and of all attention heads (least important first, MIN_HEADS kept per block). Returns what went."""
    model.eval()
    attns = attention_layers(model)
    ignored = classifier_layers(model)
    for a in attns:  # heads are removed below; q/k/v and proj widths and the embedding width stay
        ignored += [a.qkv, a.proj]
    if attns and hasattr(model, "patch_embed"):
        ignored.append(model.patch_embed)
    with warnings.catch_warnings():  # "unwrapped parameters": cls/pos tokens, layer scales — pruned along their
        warnings.simplefilter("ignore")  # last dimension, which is right for all of these
        pruner = _nearest_round_pruner()(model, example, importance=importance, pruning_ratio=ratio,
                                         ignored_layers=ignored, round_to=ROUND_TO, global_pruning=False)
    heads = prune_heads(pruner.DG, attns, ratio, importance) if attns else 0
    pruner.step()
    model.zero_grad(set_to_none=True)
    return {"heads_removed": heads}


@functools.lru_cache(maxsize=None)
def _nearest_round_pruner():
    """The pruner class, defined on first use (torch_pruning is imported only where pruning happens)."""
    import torch_pruning as tp

    class NearestRoundPruner(tp.pruner.BasePruner):
        """Torch-Pruning rounds a layer's remaining width *down* to a multiple of round_to: over several small
        steps that cut a 16-channel layer to 8 at the first step that touches it. Round to the nearest
        multiple instead, and leave layers narrower than round_to as they are."""

        def _round_to(self, n_pruned, current_channels, round_to):
            remaining = current_channels - n_pruned
            rounded = int(round(remaining / round_to)) * round_to
            if rounded < round_to:
                return 0 if current_channels <= round_to else current_channels - round_to
            return max(current_channels - rounded, 0)

    return NearestRoundPruner


def prune_heads(dg, attns: list[nn.Module], ratio: float, importance) -> int:
    """Remove round(ratio × all heads) whole heads, the least important first over all blocks, and set the
    blocks' num_heads / attn_dim (timm's Attention.forward reshapes by num_heads, head_dim and attn_dim)."""
    import torch_pruning as tp

    scores = []
    for i, a in enumerate(attns):
        if a.qkv.out_features != 3 * a.num_heads * a.head_dim:
            raise ValueError(f"attention block {i}: qkv has {a.qkv.out_features} outputs, expected 3 × "
                             f"{a.num_heads} heads × {a.head_dim}")
        group = dg.get_pruning_group(a.qkv, tp.prune_linear_out_channels, list(range(a.qkv.out_features)))
        imp = importance(group)
        per_head = imp.reshape(3, a.num_heads, a.head_dim).mean(dim=(0, 2))
        scores += [(float(s), i, h) for h, s in enumerate(per_head)]
    n_remove = int(round(ratio * len(scores)))
    left = [a.num_heads for a in attns]
    chosen: dict[int, list[int]] = {}
    for _, i, h in sorted(scores):
        if sum(len(v) for v in chosen.values()) >= n_remove:
            break
        if left[i] - 1 >= MIN_HEADS:
            chosen.setdefault(i, []).append(h)
            left[i] -= 1
    for i, hs in chosen.items():
        a = attns[i]
        idxs = [s * a.attn_dim + h * a.head_dim + d for s in range(3) for h in sorted(hs) for d in range(a.head_dim)]
        dg.get_pruning_group(a.qkv, tp.prune_linear_out_channels, idxs).prune()
        a.num_heads -= len(hs)
        a.attn_dim = a.num_heads * a.head_dim
    return sum(len(v) for v in chosen.values())


def measure(model: nn.Module, example: torch.Tensor) -> dict:
    """Parameters (all of them) and MACs of one input (Torch-Pruning's op counter: conv/linear/norm layers;
    the attention matmuls themselves are not counted)."""
    import torch_pruning as tp

    model.eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example)
    return {"params": int(count_parameters(model)), "macs": int(macs)}


def step_ratio(model: nn.Module, goal: float, key: str, example: torch.Tensor, tolerance: float) -> float:
    """The smallest fraction whose step leaves at most `goal` params/MACs (within `tolerance` below it), found by
    bracketed interpolation on copies. The count after a step does not depend on which units go (every layer
    loses the same fraction), so the copies rank units at random, which costs nothing; MAX_STEP_RATIO when even
    that is not enough."""
    import torch_pruning as tp

    current = measure(model, example)[key]

    def excess(r: float) -> float:
        trial = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]):  # the random ranking leaves the fine-tune's random stream alone
            prune_step(trial, r, tp.importance.RandomImportance(), example)
        return measure(trial, example)[key] - goal

    lo, f_lo = 0.0, current - goal
    if f_lo <= 0:
        return 0.0
    hi, f_hi = None, None
    r = min(MAX_STEP_RATIO, 1 - (goal / current) ** 0.5)  # widths pruned on both sides: count ~ (1 − r)²
    for _ in range(RATIO_SEARCH_ITERS):
        f = excess(r)
        if f <= 0:
            hi, f_hi = r, f
            if -f <= tolerance:
                break
        else:
            lo, f_lo = r, f
        if hi is None:
            if lo >= MAX_STEP_RATIO:
                return MAX_STEP_RATIO
            removed = current - goal - f_lo  # by fraction lo: extrapolate past the goal, to bracket it
            r = min(MAX_STEP_RATIO, lo * (1 + 2 * f_lo / max(removed, 1e-9)) + 0.01)
            continue
        if hi - lo < 1e-3:
            break
        width = hi - lo
        r = lo + width * f_lo / (f_lo - f_hi)  # linear interpolation, kept inside the bracket
        r = min(max(r, lo + 0.1 * width), hi - 0.1 * width)
    return hi if hi is not None else MAX_STEP_RATIO


def prune_to_target(model: nn.Module, example: torch.Tensor, target: float, by: str = "params",
                    steps: int = PRUNE_STEPS, importance: str = IMPORTANCE, before_step=None, after_step=None,
                    log=print) -> dict:
    """Prune `model` in place until `by` (params | macs) is reduced by ≥ `target`. before_step(model) prepares
    the importance (Taylor: gradients); after_step(model, step) fine-tunes. Returns the schedule and reductions."""
    if by not in ("params", "macs"):
        raise ValueError(f"unknown target {by!r}; choose params or macs")
    if not 0 < target < 1:
        raise ValueError(f"target reduction {target} must be between 0 and 1")
    base = measure(model, example)
    now = dict(base)
    history = []
    step = 0
    while now[by] > base[by] * (1 - target):
        if step >= steps + EXTRA_STEPS:
            raise ValueError(f"{by} reduced by {1 - now[by] / base[by]:.3f} after {step} steps; "
                             f"the target {target} is out of reach")
        step += 1
        goal = base[by] * (1 - target * min(step, steps) / steps)
        ratio = step_ratio(model, goal, by, example, RATIO_TOLERANCE * base[by])
        if before_step is not None:
            before_step(model)
        removed = prune_step(model, ratio, make_importance(importance), example)
        now = measure(model, example)
        record = {"step": step, "ratio": round(ratio, 4), **removed, "params": now["params"], "macs": now["macs"],
                  "params_reduction": 1 - now["params"] / base["params"],
                  "macs_reduction": 1 - now["macs"] / base["macs"]}
        log(f"step {step}: removed {ratio:.1%} of each layer's units"
            + (f", {removed['heads_removed']} heads" if removed["heads_removed"] else "")
            + f" → params {now['params'] / 1e6:.3f} M (−{record['params_reduction']:.1%}), "
              f"MACs {now['macs'] / 1e6:.1f} M (−{record['macs_reduction']:.1%})")
        if after_step is not None:
            record.update(after_step(model, step) or {})
        history.append(record)
    return {"target": target, "target_by": by, "steps": history, "params_parent": base["params"],
            "macs_parent": base["macs"], "params": now["params"], "macs": now["macs"],
            "params_reduction": 1 - now["params"] / base["params"], "macs_reduction": 1 - now["macs"] / base["macs"]}


# ------------------------------------------------------------------ fine-tuning with distillation
def finetune(model: nn.Module, teacher: nn.Module, cfg: dict, cache, adapter: InputAdapter, batches: int, seed: int,
             alpha: float = KD_ALPHA, temperature: float = KD_T, lr_factor: float = FINETUNE_LR_FACTOR,
             desc: str = "fine-tune") -> float:
    """`batches` training steps (cycling the training split as needed) on random crops; the teacher sees the same
    crops. A fresh optimizer every call: pruning replaced the parameters. Returns the mean loss."""
    if batches <= 0:
        return float("nan")
    loader = make_loader(ECGDataset(cache, "train"), cfg["batch_size"], shuffle=True, seed=cfg["seed"] + 17 + seed,
                         drop_last=len(ECGDataset(cache, "train")) >= cfg["batch_size"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"] * lr_factor,
                            weight_decay=cfg["weight_decay"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 23 + seed)
    teacher.eval()
    losses = []
    bar = meter(batches, desc, "batch", leave=False)
    while len(losses) < batches:
        for x, y in loader:
            if len(losses) >= batches:
                break
            inputs = adapter.train_input(x, gen)
            with torch.no_grad():
                t = teacher(inputs).float() if alpha > 0 else None
            losses.append(train_step(model, opt, lambda s, target: kd_loss(s, target, t, alpha, temperature),
                                     inputs, y, torch.device("cpu"), False, cfg["grad_clip"]))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update()
    bar.close()
    model.eval()
    return float(np.mean(losses))


def taylor_gradients(model: nn.Module, cfg: dict, cache, adapter: InputAdapter, batches: int, seed: int) -> None:
    """Accumulate ∂BCE/∂w over `batches` training batches (eval mode: no dropout, BatchNorm statistics kept)."""
    loader = make_loader(ECGDataset(cache, "train"), cfg["batch_size"], shuffle=True, seed=cfg["seed"] + 41 + seed)
    gen = torch.Generator().manual_seed(cfg["seed"] + 43 + seed)
    model.eval()
    model.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        if i >= batches:
            break
        F.binary_cross_entropy_with_logits(model(adapter.train_input(x, gen)), y).backward()


# ------------------------------------------------------------------ speed
def speed(pruned: nn.Module, parent: nn.Module, windows: torch.Tensor, rounds: int = SPEED_ROUNDS,
          runs: int = SPEED_RUNS) -> dict:
    """Windows (inputs) per second of both networks on one thread, batch 32 and batch 1, measured in alternating
    rounds in this process so that load from other work on the machine hits both alike; medians."""
    from shared.timing import time_forward

    x32 = windows[torch.arange(32) % len(windows)].contiguous()
    x1 = windows[:1].contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {(name, b): [] for name in ("structured", "fp32") for b in (32, 1)}
    try:
        for _ in range(rounds):
            for name, model in (("structured", pruned), ("fp32", parent)):
                model.eval()
                times[(name, 32)] += list(time_forward(model, x32, runs, warmup=1))
                times[(name, 1)] += list(time_forward(model, x1, runs * 4, warmup=2))
    finally:
        torch.set_num_threads(threads)
    out = {f"{name}_b{b}_windows_per_s": round(b / float(np.median(t)), 1) for (name, b), t in times.items()}
    out["threads"] = 1
    return out


def speed_line(name: str, s: dict, m: dict) -> str:
    return (f"{name} speed (1 thread): batch 32 {s['structured_b32_windows_per_s']:.0f} vs "
            f"{s['fp32_b32_windows_per_s']:.0f} windows/s unpruned "
            f"(×{s['structured_b32_windows_per_s'] / s['fp32_b32_windows_per_s']:.2f}), batch 1 "
            f"{s['structured_b1_windows_per_s']:.0f} vs {s['fp32_b1_windows_per_s']:.0f} "
            f"(×{s['structured_b1_windows_per_s'] / s['fp32_b1_windows_per_s']:.2f}); MACs "
            f"{m['macs'] / 1e6:.1f} M vs {m['macs_parent'] / 1e6:.1f} M (−{m['macs_reduction']:.1%}), params "
            f"{m['params'] / 1e6:.3f} M vs {m['params_parent'] / 1e6:.3f} M (−{m['params_reduction']:.1%})")


# ------------------------------------------------------------------ driver
class PruningFailed(RuntimeError):
    pass


def eval_windows(cache, adapter: InputAdapter, records: int = 16) -> torch.Tensor:
    ds = ECGDataset(cache, "val")
    x, _ = ds.__getitems__(range(min(records, len(ds))))
    return adapter.eval_inputs(x)[0]


def make_structured(run_dir: Path, parent: nn.Module, cfg: dict, cache, adapter: InputAdapter, out: Path,
                    opts: dict) -> tuple[nn.Module, dict]:
    """Prune a copy of the parent to the target with fine-tuning between steps; (pruned model, variant info)."""
    quick = cfg.get("profile") == "quick"
    student = copy.deepcopy(parent)
    example = eval_windows(cache, adapter, 1)[:1]
    steps = opts["steps"] or PRUNE_STEPS
    step_batches, epochs = opts["step_batches"], opts["finetune_epochs"]
    per_epoch = len(ECGDataset(cache, "train")) // cfg["batch_size"] or 1
    cap = opts["finetune_batches"] or (QUICK_FINETUNE_BATCHES if quick else per_epoch)
    final_batches = epochs * min(per_epoch, cap)
    taylor_batches = QUICK_TAYLOR_BATCHES if quick else TAYLOR_BATCHES
    kd = dict(alpha=opts["kd_alpha"], temperature=opts["kd_t"], lr_factor=opts["lr_factor"])
    seeds = iter(range(1000, 10_000, 100))

    def before(model):
        if opts["importance"] == "taylor":
            taylor_gradients(model, cfg, cache, adapter, taylor_batches, next(seeds))

    def after(model, step):
        loss = finetune(model, parent, cfg, cache, adapter, step_batches, next(seeds), desc=f"step {step} fine-tune",
                        **kd)
        return {"finetune_batches": step_batches, "finetune_loss": loss}

    torch.manual_seed(cfg["seed"])
    t0 = time.time()
    info = prune_to_target(student, example, opts["target"], opts["by"], steps, opts["importance"], before, after,
                           log=lambda s: print(f"{run_dir.name}/{METHOD}: {s}", flush=True))
    loss = finetune(student, parent, cfg, cache, adapter, final_batches, next(seeds), desc="recovery fine-tune", **kd)
    info.update(final_finetune_batches=final_batches, final_finetune_loss=loss, seconds=round(time.time() - t0, 1))
    info.update(save_structured(out, student, cfg))
    info.update(importance=opts["importance"], kd_alpha=opts["kd_alpha"], kd_t=opts["kd_t"],
                lr=cfg["lr"] * opts["lr_factor"], step_finetune_batches=step_batches, finetune_epochs=epochs,
                taylor_batches=(
                    taylor_batches if opts["importance"] == "taylor" else 0),
                library="torch-pruning (DepGraph)", heads_min=MIN_HEADS, round_to=ROUND_TO)
    return student, info


RECIPE_KEYS = (  # variant.json key, opts key, value when variant.json lacks it, what differs
    ("target", "target", TARGET_PARAMS, "another pruning target than"),
    ("target_by", "by", "params", "another target measure than"),
    ("importance", "importance", IMPORTANCE, "another unit importance than"),
    ("step_finetune_batches", "step_batches", STEP_FINETUNE_BATCHES, "other fine-tune batches per step than"),
    ("finetune_epochs", "finetune_epochs", FINETUNE_EPOCHS, "other recovery fine-tune epochs than"))


def recipe(cfg: dict, importance: str | None, step_batches: int | None, finetune_epochs: int | None,
           target: float | None = None, by: str = "params") -> dict:
    """Target, importance and fine-tune lengths: as asked, else the family's FAMILY_RECIPES entry, else the
    defaults (quick runs: the quick batch counts). A family's target is a fraction of its parameters."""
    quick = cfg.get("profile") == "quick"
    family = FAMILY_RECIPES.get(cfg["model"], {})
    default_steps = QUICK_STEP_BATCHES if quick else family.get("step_batches", STEP_FINETUNE_BATCHES)
    if target is None and by != "params":
        raise ValueError(f"a {by} target needs its fraction")
    return {"target": family.get("target", TARGET_PARAMS) if target is None else target, "by": by,
            "importance": importance or family.get("importance", IMPORTANCE),
            "step_batches": default_steps if step_batches is None else step_batches,
            "finetune_epochs": finetune_epochs if finetune_epochs is not None else (
                FINETUNE_EPOCHS if quick else family.get("finetune_epochs", FINETUNE_EPOCHS))}


def prune_run(run_dir: Path, data_dir: Path | None = None, out_root: Path | None = None, force: bool = False,
              target: float | None = None, by: str = "params", importance: str | None = None,
              kd_alpha: float = KD_ALPHA, kd_t: float = KD_T, steps: int | None = None,
              step_batches: int | None = None, finetune_epochs: int | None = None,
              finetune_batches: int | None = None, lr_factor: float = FINETUNE_LR_FACTOR, then_int8: bool = False,
              calibration_batches: int | None = None, speed_rounds: int | None = None, seed: int | None = None) -> dict:
    run_dir = Path(run_dir)
    parent, cfg = load_run(run_dir)
    run_cfg = cfg
    if seed is not None:  # the fine-tune's shuffles and crops (and Taylor's batches); the network is the run's
        cfg = dict(cfg, seed=seed)
    cache = open_cache(data_dir or data_cache_dir(cfg["sampling_rate"]))
    adapter = InputAdapter(cfg, cache.sampling_rate)
    quick = cfg.get("profile") == "quick"
    root = (out_root or compressed_dir()) / run_dir.name
    out = root / METHOD
    source_sha256 = checkpoint_sha256(run_dir)
    opts = dict(kd_alpha=kd_alpha, kd_t=kd_t, steps=steps, finetune_batches=finetune_batches, lr_factor=lr_factor,
                **recipe(cfg, importance, step_batches, finetune_epochs, target, by))
    done = finished_variant(out, run_dir, source_sha256, force or any(recipe_changed(out, key, opts[name], absent, what)
                            for key, name, absent, what in RECIPE_KEYS))
    windows = eval_windows(cache, adapter)
    rounds = speed_rounds or (QUICK_SPEED_ROUNDS if quick else SPEED_ROUNDS)
    if done is None:
        model, done, s = _make_structured_variant(run_dir, source_sha256, parent, cfg, cache, adapter, out, opts,
                                                  windows, rounds)
    else:
        model, s = load_structured(out, cfg), None
    results = {METHOD: done}
    if then_int8:
        results.update(openvino_variants(run_dir, source_sha256, model, run_cfg, cache, adapter, root, out, force,
                                         calibration_batches or (QUICK_CALIBRATION_BATCHES if quick
                                                                 else CALIBRATION_BATCHES)))
    if s is None:
        s = speed(channels_last_if_configured(model, cfg), channels_last_if_configured(parent, cfg), windows, rounds)
    print(speed_line(f"{run_dir.name}/{METHOD}", s, done), flush=True)
    return results


def _make_structured_variant(run_dir: Path, source_sha256: str, parent: nn.Module, cfg: dict, cache,
                             adapter: InputAdapter, out: Path, opts: dict, windows: torch.Tensor, rounds: int):
    """Prune, save, then score and time what a later stage will load (the reloaded network, not the one in
    memory); (network, metrics, speed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # a half-redone variant must not pass as finished
    try:
        model, info = make_structured(run_dir, parent, cfg, cache, adapter, out, opts)
        reloaded = load_structured(out, cfg)
        with torch.no_grad():
            diff = (reloaded(windows) - model(windows)).abs().max().item()
        if diff > 1e-5:
            raise ValueError(f"{out / WEIGHTS_FILE}: reloads to different outputs (max |Δ| {diff:.2e})")
        evaluated = channels_last_if_configured(reloaded, cfg)
        metrics = validation_scores(evaluated, cache, adapter)
        s = speed(evaluated, channels_last_if_configured(parent, cfg), windows, rounds)
    except (ValueError, RuntimeError) as e:
        raise PruningFailed(f"{run_dir.name}/{METHOD}: {type(e).__name__}: {first_line(e)}") from e
    info.update(finetune_seed=cfg["seed"], method=METHOD, run=str(run_dir.resolve()), source_sha256=source_sha256,
                model=cfg["model"], representation=cfg["representation"],
                versions={**library_versions(), **_versions()})
    write_json_atomic(out / "variant.json", info)
    metrics.update(method=METHOD, run=run_dir.name, artifact_bytes=_structured_bytes(out),
                   fp32_bytes=(run_dir / "best.safetensors").stat().st_size,
                   **{k: info[k] for k in ("target", "target_by", "params", "params_parent", "params_reduction",
                                           "macs", "macs_parent", "macs_reduction", "importance", "kd_alpha",
                                           "kd_t")}, speed=s)
    done = record_variant(out, metrics, run_dir, f"{run_dir.name}/{METHOD}",
                          f", params −{info['params_reduction']:.1%}, MACs −{info['macs_reduction']:.1%}, "
                          f"{info['seconds']:.0f} s")
    return reloaded, done, s


def openvino_variants(run_dir: Path, source_sha256: str, model: nn.Module, cfg: dict, cache, adapter: InputAdapter,
                      root: Path, structured_dir: Path, force: bool, batches: int) -> dict:
    """The pruned network as an OpenVINO fp32 IR (what pruning alone buys in the deploy runtime, against the
    run's openvino_fp32) and its NNCF int8 (structured + int8: the deploy candidate), made as
    compression/openvino_export.py makes openvino_fp32 and openvino_int8 from the unpruned network."""
    from compression import openvino_export as ove

    fp32_out, out = root / FP32_IR_VARIANT, root / INT8_VARIANT
    structured_sha = sha256_file(structured_dir / WEIGHTS_FILE)
    done = {v: finished_variant(root / v, run_dir, source_sha256, force or (
        v == INT8_VARIANT and ove.int8_recipe_changed(out, cfg["model"]))) for v in (FP32_IR_VARIANT, INT8_VARIANT)}
    if all(d is not None for d in done.values()):
        if all(read_json(root / v / "variant.json").get("structured_sha256") == structured_sha for v in done):
            return done
        print(f"{root}/structured_openvino_*: made from another structured.safetensors: redoing them", flush=True)
    compare = ove.val_windows(cache, adapter)
    fp32_auc = read_json(structured_dir / "metrics.json")["val"]["macro_auc"]
    # the deploy candidate must stay within the budget of the run's fp32 model: what pruning lost is spent
    lost = read_json(run_dir / "metrics.json")["val"]["macro_auc"] - fp32_auc
    budget = max(ove.AUC_BUDGET - max(lost, 0.0), MIN_INT8_BUDGET) if lost < ove.AUC_BUDGET else ove.AUC_BUDGET
    common = dict(artifact="model.xml", weights="model.bin", source=METHOD, structured_sha256=structured_sha,
                  run=str(run_dir.resolve()), source_sha256=source_sha256, model=cfg["model"],
                  representation=cfg["representation"], versions={**library_versions(), **_versions()})

    def record(variant: str, folder: Path, made: dict) -> dict:
        return ove.record_ir(folder, {**made["info"], **common}, run_dir, model, cache, adapter, compare,
                             f"{run_dir.name}/{variant}", made["seconds"])

    fp32 = _ir_variant(run_dir, FP32_IR_VARIANT, fp32_out,
                       lambda: ove.convert_fp32(model, cfg["model"], compare, fp32_out))
    results = {FP32_IR_VARIANT: record(FP32_IR_VARIANT, fp32_out, fp32)}
    int8 = _ir_variant(run_dir, INT8_VARIANT, out, lambda: ove.quantize_int8(
        fp32_out / "model.xml", out, cache, adapter, cfg, batches, fp32_auc, budget))
    int8["info"]["fp32_ir_max_abs_logit_diff_vs_torch"] = fp32["info"]["max_abs_logit_diff_vs_torch"]
    results[INT8_VARIANT] = record(INT8_VARIANT, out, int8)
    return results


def _ir_variant(run_dir: Path, variant: str, folder: Path, make) -> dict:
    """Runs one converter step into folder; a half-redone variant must not pass as finished meanwhile."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").unlink(missing_ok=True)
    t0 = time.time()
    try:
        info = make()
    except Exception as e:  # the converter or NNCF cannot handle this network
        raise PruningFailed(f"{run_dir.name}/{variant}: {type(e).__name__}: {first_line(e)}") from e
    seconds = time.time() - t0
    info.update(method=variant.replace("structured_", ""), seconds=round(seconds, 1))
    return {"info": info, "seconds": seconds}


def _structured_bytes(out: Path) -> int:
    return (out / WEIGHTS_FILE).stat().st_size + (out / SHAPES_FILE).stat().st_size


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torch-pruning", "openvino", "nncf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _recipes(key: str) -> str:
    """The families whose FAMILY_RECIPES set `key`, for --help."""
    families = ", ".join(f"{family} {recipe[key]}" for family, recipe in FAMILY_RECIPES.items() if key in recipe)
    return f"; {families}" if families else ""


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction between 0 and 1")
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compression.prune_structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_choice(ap, "prune")
    tgt = ap.add_mutually_exclusive_group()
    tgt.add_argument("--target-params", type=_fraction, default=None, metavar="FRACTION",
                     help=f"fraction of the parameters to remove (default {TARGET_PARAMS}{_recipes('target')})")
    tgt.add_argument("--target-macs", type=_fraction, default=None, metavar="FRACTION",
                     help="fraction of the MACs to remove instead")
    ap.add_argument("--importance", choices=("magnitude", "taylor"), default=None,
                    help=f"unit importance: group L2 magnitude or first-order Taylor (default {IMPORTANCE}"
                         f"{_recipes('importance')})")
    ap.add_argument("--kd-alpha", type=float, default=KD_ALPHA,
                    help="weight of distillation from the unpruned model; 0 = plain fine-tuning (default %(default)s)")
    ap.add_argument("--kd-t", type=float, default=KD_T, help="distillation temperature (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help=f"pruning steps (default {PRUNE_STEPS})")
    ap.add_argument("--step-batches", type=int, default=None,
                    help=f"fine-tune batches after each step (default {STEP_FINETUNE_BATCHES}, quick "
                         f"{QUICK_STEP_BATCHES}{_recipes('step_batches')})")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help=f"recovery fine-tune epochs after the last step (default {FINETUNE_EPOCHS}"
                         f"{_recipes('finetune_epochs')})")
    ap.add_argument("--finetune-batches", type=int, default=None,
                    help=f"at most this many batches per recovery epoch (default all, quick {QUICK_FINETUNE_BATCHES})")
    ap.add_argument("--lr-factor", type=float, default=FINETUNE_LR_FACTOR,
                    help="fine-tune learning rate as a factor of the run's (default %(default)s)")
    ap.add_argument("--then-int8", action="store_true",
                    help=f"also write the pruned network's OpenVINO NNCF int8 IR to {INT8_VARIANT}/")
    ap.add_argument("--calibration-batches", type=int, default=None,
                    help=f"int8 calibration batches (default {CALIBRATION_BATCHES}, quick {QUICK_CALIBRATION_BATCHES})")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed of the fine-tune's shuffles and crops (default: the run's seed)")
    ap.add_argument("--speed-rounds", type=int, default=None,
                    help=f"alternating timing rounds for the speed line (default {SPEED_ROUNDS}, quick "
                         f"{QUICK_SPEED_ROUNDS})")
    add_output_args(ap)
    args = ap.parse_args(argv)
    if not 0 <= args.kd_alpha <= 1 or args.kd_t <= 0:
        print(f"error: --kd-alpha must be in [0, 1] and --kd-t > 0 (got {args.kd_alpha}, {args.kd_t})",
              file=sys.stderr)
        return 2
    if any(v is not None and v < 0 for v in (args.step_batches, args.finetune_epochs)) or any(
            v is not None and v < 1 for v in (args.steps, args.finetune_batches, args.calibration_batches,
                                              args.speed_rounds)):
        print("error: step and batch counts must be positive", file=sys.stderr)
        return 2
    by, target = ("macs", args.target_macs) if args.target_macs is not None else ("params", args.target_params)
    try:
        prune_run(chosen_run(args), args.data, args.out, args.force, target, by, args.importance, args.kd_alpha, args.kd_t,
                  args.steps, args.step_batches, args.finetune_epochs, args.finetune_batches, args.lr_factor,
                  args.then_int8, args.calibration_batches, args.speed_rounds, args.seed)
    except PruningFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
