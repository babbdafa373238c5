"""Train one model on the PTB-XL cache: `python -m models.train --model convnext --profile cpu`.

Model selection uses validation (fold 9) macro AUC only, with early stopping; the test fold is
read once, after training, for metrics.json. Runs under `torchrun --nproc_per_node=N` (DDP: gloo on
CPU, nccl on CUDA). Running the same command again continues a killed run from its last epoch and
reaches the same result (under torchrun: `--resume`); a finished run is kept, or refused if its config
changed (`--force` retrains).

With `--set teacher=resnet1d_wang` (or a,b for the mean of two, or a run folder), or a profile that names one
(deit and convnext on `cpu`; `--set teacher=none` turns it off), the student learns from a finished teacher run
of the same profile, seed and data as well as from the labels (shared/distill.py); a teacher model without that
run is trained first. The run's name gets `-kd` and its config.json the teacher runs' paths and checkpoint sha256.
One process trains a run folder at a time: another that needs it (a second student of the same teacher) waits.

Writes artifacts/runs/<model>-<representation>-<profile>[-tuned][-kd][-seed<N>]/:
  config.json (resolved config + versions), last.pt (resume state), best.safetensors (+ best.json),
  log.jsonl (one line per epoch), metrics.json (val/test macro + per-class AUC, size, time).
On stdout, one line per epoch (loss, val macro AUC, seconds, best so far), and a step bar while stderr is a
terminal (shared/progress.py): a log file gets the lines only. --no-progress prints neither.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler

from shared import config as config_mod
from shared.cache import CacheError, ECGCache, open_cache
from shared.dataset import ECGDataset, make_loader
from shared.distill import (TeacherChanged, check_settings, load_teacher, student_loss,
                            teacher_logits)
from shared.io import (UnsafeCheckpoint, library_versions, load_checkpoint, load_weights, read_json,
                       save_checkpoint, save_weights, write_json_atomic)
from shared.runs import read_config
from shared.nets import MODELS, PretrainedUnavailable, architecture_kwargs, build_model, count_parameters
from shared.paths import data_cache_dir, runs_dir
from shared.progress import bar, log, postfix
from shared.inputs import InputAdapter
from shared.prediction import autocast, predict_batches, scores
from shared.training import train_step


def run_name(cfg: dict) -> str:
    """<model>-<representation>-<profile>[-<config>][-kd][-seed<N>]: seed 0, every config's default, adds nothing,
    so extra seeds of a run (`--set seed=1`) and a distilled twin (-kd) sit beside it instead of replacing it."""
    suffix = "" if cfg["config"] == "default" else f"-{Path(cfg['config']).stem}"
    kd = "-kd" if cfg.get("teacher") else ""
    seed = f"-seed{cfg['seed']}" if cfg["seed"] != 0 else ""
    return f"{cfg['model']}-{cfg['representation']}-{cfg['profile']}{suffix}{kd}{seed}"


def config_hash(cfg: dict) -> str:
    keep = {k: v for k, v in cfg.items() if k not in ("out", "data")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def lr_lambda(cfg: dict, steps_per_epoch: int):
    warmup = max(1, int(cfg["warmup_epochs"] * steps_per_epoch))
    total = max(warmup + 1, cfg["epochs"] * steps_per_epoch)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg["schedule"] == "cosine" else 1.0
    return f


def setup_distributed():
    """(rank, world, device) — from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return rank, world, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


class NoFullBatch(ValueError):
    """The training set (after max_train_records, per process) is smaller than one batch."""


@dataclass
class Data:
    """One process's inputs: its share of the training fold and the whole validation fold (never the test fold)."""
    cache: ECGCache
    adapter: InputAdapter
    sampler: Sampler
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int


@dataclass
class Learner:
    """The model and what updates it. ddp_model is the model itself in a single process."""
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: Callable
    teacher: Callable | None
    device: torch.device
    amp: bool
    channels_last: bool
    scaler: torch.amp.GradScaler | None
    params: int


@dataclass
class Throughput:
    """This process's seconds loading batches and in whole steps, and the samples it saw (not across a resume)."""
    data_s: float = 0.0
    step_s: float = 0.0
    samples: int = 0


def train(cfg: dict, out: Path, data_dir: Path, resume: bool, progress: bool = True,
          on_epoch: Callable[[int, dict], None] | None = None, evaluate_test: bool = True) -> dict:
    """Train `cfg` into `out`; return metrics.json's content ({} on ranks other than 0).

    on_epoch(epoch, record) runs on rank 0 after each epoch is logged and checkpointed (the tuner reports
    val AUC to Optuna there; an exception it raises, e.g. optuna.TrialPruned, stops training and
    propagates). evaluate_test=False never opens the test fold: metrics.json and predictions.npz then
    hold validation only (tuning must not see test labels). progress=False prints no per-epoch lines.
    """
    rank, world, device = setup_distributed()
    main_proc = rank == 0
    cfg = {**cfg, "world_size": world}
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    data = build_data(cfg, data_dir, rank, world)
    learner = build_learner(cfg, data, device, world)
    chash = config_hash({k: v for k, v in cfg.items() if k != "world_size"})
    state = start_or_resume(out, data, learner, chash, resume, main_proc)

    clock = Throughput()
    best_val = None  # the best epoch's validation output, when this process computed it (not across a resume)
    while state["epoch"] < cfg["epochs"] and state["bad_epochs"] < cfg["patience"]:
        epoch, t_epoch = state["epoch"], time.perf_counter()
        losses, teacher_s = run_epoch(cfg, epoch, data, learner, rank, clock,
                                      desc=f"{out.name} epoch {epoch + 1}/{cfg['epochs']}",
                                      show_bar=progress and main_proc)
        record, val = close_epoch(epoch, data, learner, state, losses, teacher_s, t_epoch)
        best_val = val or best_val
        if main_proc:
            save_epoch(out, learner, state, record, improved=val is not None, chash=chash)
            if progress:
                log(epoch_line(out.name, record, state, improved=val is not None))
            if on_epoch is not None:
                on_epoch(epoch + 1, record)

    if world > 1:
        write_ddp_digest(out, learner.model, rank)
        dist.barrier()
    result = finish(cfg, out, data_dir, data, learner, state, best_val, clock, evaluate_test) if main_proc else {}
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def build_data(cfg: dict, data_dir: Path, rank: int, world: int) -> Data:
    """Loaders over the cache: full batches of batch_size / world per process (a short last batch would weigh
    its records more), capped at max_train_records and max_train_batches."""
    from torch.utils.data.distributed import DistributedSampler

    cache = open_cache(data_dir)
    adapter = InputAdapter(cfg, cache.sampling_rate)
    train_ds, val_ds = ECGDataset(cache, "train"), ECGDataset(cache, "val")  # the test split is not opened here
    if cfg.get("max_train_records"):
        train_ds.indices = train_ds.indices[: int(cfg["max_train_records"])]
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"],
                                 drop_last=True)
    per_rank_batch = max(1, cfg["batch_size"] // world)
    train_loader = make_loader(train_ds, per_rank_batch, sampler=sampler, drop_last=True)
    val_loader = make_loader(val_ds, cfg["eval_batch_size"])
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:  # drop_last with fewer records than one batch: the loss would be NaN, silently
        raise NoFullBatch(f"{data_dir}: {len(train_ds)} training records over {world} process(es) make no full batch "
                          f"of {per_rank_batch}; lower batch_size or raise max_train_records")
    if cfg.get("max_train_batches"):
        steps_per_epoch = min(steps_per_epoch, int(cfg["max_train_batches"]))
    return Data(cache, adapter, sampler, train_loader, val_loader, steps_per_epoch)


def build_learner(cfg: dict, data: Data, device: torch.device, world: int) -> Learner:
    """The model from seed `cfg["seed"]` (every rank builds the same one), AdamW with warm-up + cosine, the teacher
    and the loss, AMP and channels-last as the config asks."""
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], cfg["representation"], data.adapter.crop, num_classes=len(data.cache.classes),
                        pretrained=cfg["pretrained"], drop_path_rate=cfg["drop_path_rate"],
                        drop_rate=cfg["drop_rate"], **architecture_kwargs(cfg)).to(device)
    params = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, data.steps_per_epoch))
    teacher = load_teacher(cfg["teacher_runs"], data.cache.sampling_rate, device) if cfg.get("teacher_runs") else None
    if teacher is not None and hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # DeiT: (class head, distillation head) in training, their mean in eval
    loss_fn = student_loss(cfg)

    # AMP on CUDA; bf16 autocast on CPU only where a config asks: on this 2-core AVX-512 CPU it made
    # these small models 2-3x slower (docs/benchmarks.md)
    amp = bool(cfg["amp_cuda"]) if device.type == "cuda" else bool(cfg["bf16_cpu"])
    channels_last = bool(cfg["channels_last"]) and cfg["representation"] != "signal"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if (amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()) \
        else None
    ddp_model = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    return Learner(model, ddp_model, optimizer, scheduler, loss_fn, teacher, device, amp, channels_last, scaler, params)


def start_or_resume(out: Path, data: Data, learner: Learner, chash: str, resume: bool, main_proc: bool) -> dict:
    """The training state: last.pt's (model, optimizer and schedule restored) when resuming a run of the same config;
    otherwise a fresh one holding the untrained model's val AUC (the baseline learning must beat), log.jsonl reset."""
    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": [], "train_seconds": 0.0,
             "teacher_seconds": 0.0}
    last_path = out / "last.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path)
        if ckpt.get("config_hash") != chash:
            raise SystemExit(f"error: {last_path}: written with a different config; delete it or drop --resume")
        learner.model.load_state_dict(ckpt["model"])
        learner.optimizer.load_state_dict(ckpt["optimizer"])
        learner.scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        if main_proc:
            log(f"resuming {out.name} after epoch {state['epoch']}")
    else:
        if main_proc:
            (out / "log.jsonl").unlink(missing_ok=True)
        probs, labels = predict_batches(learner.model, data.val_loader, data.adapter, learner.device, learner.amp)
        state["untrained_val_auc"] = scores(labels, probs, data.cache.classes)["macro_auc"]
    return state


def run_epoch(cfg: dict, epoch: int, data: Data, learner: Learner, rank: int, clock: Throughput, desc: str,
              show_bar: bool) -> tuple[list[float], float]:
    """steps_per_epoch optimizer steps; returns their losses and the seconds spent in the teacher. Every random
    stream is seeded from (seed, epoch[, rank]), so a resumed run draws the same shuffles, crops and dropout."""
    data.sampler.set_epoch(epoch)
    torch.manual_seed(cfg["seed"] * 1000 + epoch)  # dropout / drop-path: same stream on resume
    crop_gen = torch.Generator().manual_seed(cfg["seed"] * 7919 + epoch * 1009 + rank)
    losses, teacher_s = [], 0.0
    batches = iter(data.train_loader)
    steps = bar(range(data.steps_per_epoch), desc, enabled=show_bar)
    for _ in steps:
        t0 = time.perf_counter()
        x, y = next(batches)
        crop, inputs, y = prepare_batch(x, y, crop_gen, data.adapter, learner)
        t1 = time.perf_counter()
        soft = None
        if learner.teacher is not None:
            soft = teacher_targets(learner, crop)
            teacher_s += time.perf_counter() - t1
        losses.append(train_step(learner.ddp_model, learner.optimizer, learner.loss_fn, inputs, (y, soft),
                                 learner.device, learner.amp, cfg["grad_clip"], learner.scaler))
        learner.scheduler.step()
        t2 = time.perf_counter()
        clock.data_s += t1 - t0
        clock.step_s += t2 - t0
        clock.samples += len(x)
        postfix(steps, loss=f"{np.mean(losses[-20:]):.4f}")
    return losses, teacher_s


def prepare_batch(x: torch.Tensor, y: torch.Tensor, crop_gen: torch.Generator, adapter: InputAdapter,
                  learner: Learner) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the raw random crop, the model's input on the device, the labels on the device) of one training batch."""
    crop = adapter.train_crop(x, crop_gen)
    inputs = adapter.represent(crop).to(learner.device, non_blocking=True)
    if learner.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return crop, inputs, y.to(learner.device)


def teacher_targets(learner: Learner, crop: torch.Tensor) -> torch.Tensor:
    """The teacher's logits for the student's crop, through the teacher's own representation (never a test record)."""
    with autocast(learner.device, learner.amp):
        soft = teacher_logits(learner.teacher, crop.to(learner.device, non_blocking=True))
    if learner.device.type == "cuda":
        torch.cuda.synchronize(learner.device)  # time the teacher's kernels, not their launch
    return soft


def close_epoch(epoch: int, data: Data, learner: Learner, state: dict, losses: list[float], teacher_s: float,
                t_epoch: float) -> tuple[dict, tuple | None]:
    """Score validation and update `state` (epoch, best epoch, early-stopping count, history). Returns the epoch's
    log record and, when it is the best so far, its validation output (probs, labels); else None."""
    probs, labels = predict_batches(learner.model, data.val_loader, data.adapter, learner.device, learner.amp)
    val_auc = scores(labels, probs, data.cache.classes)["macro_auc"]
    state["train_seconds"] += time.perf_counter() - t_epoch
    state["teacher_seconds"] += teacher_s
    improved = val_auc > state["best_auc"]
    if improved:
        state.update(best_auc=val_auc, best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch + 1
    record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_macro_auc": val_auc,
              "lr": learner.scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - t_epoch, 2)}
    if learner.teacher is not None:
        record.update(teacher_seconds=round(teacher_s, 2), teacher_cost=cost_ratio(record["seconds"], teacher_s))
    state["history"].append(record)
    return record, ((probs, labels) if improved else None)


def save_epoch(out: Path, learner: Learner, state: dict, record: dict, improved: bool, chash: str) -> None:
    """best.safetensors when the epoch improved; last.pt, to resume from, and the epoch's log.jsonl line always."""
    if improved:
        save_weights(out / "best.safetensors", learner.model.state_dict(),
                     {"epoch": record["epoch"], "val_macro_auc": record["val_macro_auc"]})
    save_checkpoint(out / "last.pt", {"model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
                                      "scheduler": learner.scheduler.state_dict(), "state": state,
                                      "config_hash": chash})
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def epoch_line(name: str, record: dict, state: dict, improved: bool) -> str:
    """One epoch in a line (* marks a new best): what a log file shows instead of a progress bar."""
    return (f"{name} epoch {record['epoch']}: loss {record['train_loss']:.4f} val macro AUC "
            f"{record['val_macro_auc']:.4f}{' *' if improved else ''}, {record['seconds']:.1f} s, "
            f"best {state['best_auc']:.4f} (epoch {state['best_epoch'] + 1}){teacher_note(record)}")


def write_ddp_digest(out: Path, model: nn.Module, rank: int) -> None:
    """This rank's weights' sha256: every rank of a DDP run must end with the same model."""
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    write_json_atomic(out / f"ddp_digest.rank{rank}.json", {"rank": rank, "sha256": digest})


def finish(cfg: dict, out: Path, data_dir: Path, data: Data, learner: Learner, state: dict, best_val: tuple | None,
           clock: Throughput, evaluate_test: bool) -> dict:
    """Reload the best weights and score validation and (unless tuning) the test fold, its first and only read;
    write predictions.npz and metrics.json and return metrics.json's content."""
    model, adapter, device, amp = learner.model, data.adapter, learner.device, learner.amp
    model.load_state_dict(load_weights(out / "best.safetensors"))
    # the best epoch's pass saw these very weights: reuse it rather than score validation once more
    val_probs, val_labels = best_val or predict_batches(model, data.val_loader, adapter, device, amp)
    arrays, test = {"val_probs": val_probs, "val_labels": val_labels}, {}
    if evaluate_test:
        test_ds = ECGDataset(data.cache, "test")  # first and only look at the test fold
        test_probs, test_labels = predict_batches(model, make_loader(test_ds, cfg["eval_batch_size"]),
                                                  adapter, device, amp)
        arrays.update(test_probs=test_probs, test_labels=test_labels)
        test = {"test": scores(test_labels, test_probs, data.cache.classes)}
    np.savez_compressed(out / "predictions.npz", **arrays)
    result = metrics(cfg, out, data_dir, learner, state, clock, scores(val_labels, val_probs, data.cache.classes),
                     test)
    write_json_atomic(out / "metrics.json", result)
    return result


def metrics(cfg: dict, out: Path, data_dir: Path, learner: Learner, state: dict, clock: Throughput, val: dict,
            test: dict) -> dict:
    """metrics.json: the scores, the training's length, size and speed, and where it ran."""
    result = {
        "model": cfg["model"], "representation": cfg["representation"], "profile": cfg["profile"],
        "config": cfg["config"], "seed": cfg["seed"], "run": out.name,
        "val": val, **test,
        "untrained_val_macro_auc": state.get("untrained_val_auc"), "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"], "params": learner.params,
        "checkpoint_bytes": (out / "best.safetensors").stat().st_size,
        "train_seconds": round(state["train_seconds"], 1),
        "data_time_share": round(clock.data_s / clock.step_s, 4) if clock.step_s else None,
        "train_samples_per_s": round(clock.samples / clock.step_s, 1) if clock.step_s else None,
        "device": str(learner.device), "world_size": cfg["world_size"], "threads": torch.get_num_threads(),
        "data": str(data_dir), "teacher": cfg.get("teacher") or None,
    }
    if learner.teacher is not None:
        result.update(teacher_seconds=round(state["teacher_seconds"], 1),
                      teacher_cost=cost_ratio(state["train_seconds"], state["teacher_seconds"]))
    return result


def cost_ratio(seconds: float, teacher_seconds: float) -> float | None:
    """Time with the teacher's forward passes over the time without them: the cost of distilling against a plain
    run of the same steps (validation included)."""
    plain = seconds - teacher_seconds
    return round(seconds / plain, 3) if plain > 0 else None


def teacher_note(record: dict) -> str:
    if "teacher_seconds" not in record:
        return ""
    return (f" | teacher {record['teacher_seconds']:.1f} s of {record['seconds']:.1f} s "
            f"({record['teacher_cost']}x a plain epoch)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"), choices=config_mod.PROFILES,
                    help="budget: quick (seconds, tests), cpu (the sample on 2 cores), full (PTB-XL on a GPU)")
    ap.add_argument("--representation", default=os.environ.get("REPR") or None,
                    help="seed | rows | leads | strip | signal (default: the model config's)")
    ap.add_argument("--config", default=os.environ.get("CONFIG", "default"),
                    help="default | tuned (artifacts/tune/<model>/best_config.toml) | path to a TOML")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--data", type=Path, default=None, help="cache folder (default artifacts/data/ptbxl-<fs>hz)")
    ap.add_argument("--out", type=Path, default=None, help="run folder (default artifacts/runs/<run name>)")
    ap.add_argument("--resume", action="store_true", default=os.environ.get("RESUME") == "1",
                    help="continue from last.pt (env RESUME=1); automatic outside torchrun when the config matches")
    ap.add_argument("--force", action="store_true",
                    help="start over: retrain even if metrics.json or last.pt exists")
    ap.add_argument("--no-progress", action="store_true", help="no step bar and no per-epoch lines")
    return ap.parse_args(argv)


def training_normalization(data_dir: Path) -> dict:
    """The cache's per-lead train statistics, kept with the run so the model can score raw records
    (eval.predict) without the training cache."""
    try:
        from shared.io import read_json

        return {"normalization": read_json(Path(data_dir) / "manifest.json")["normalization"]}
    except (OSError, ValueError, KeyError):
        return {}  # no cache yet: train() reports that with a clear error


def changed_keys(saved_config: Path, cfg: dict) -> list[str]:
    """Keys of `cfg` whose value differs from the config.json a run folder was trained with ([] if none). A key
    the saved config lacks counts as unchanged when its value is empty ({} / [] / None): it was added to the
    configs after that run and, empty, changes nothing (e.g. timm_kwargs = {})."""
    if not saved_config.exists():
        return []
    try:
        saved = config_mod.with_defaults(read_json(saved_config))  # a key it leaves out had its default value then too
    except (OSError, ValueError):
        return ["config.json (unreadable)"]
    return sorted(k for k, v in cfg.items() if saved.get(k) != v and (k in saved or v not in ({}, [], None)))


def unusable_weights(out: Path) -> str | None:
    """Why the run's best.safetensors cannot be loaded (None if it can): a file cut short by a full disk or a broken
    copy must not pass for a trained model."""
    try:
        load_weights(out / "best.safetensors")
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def existing_run(out: Path, cfg: dict, args) -> int | None:
    """A finished run is kept (0), or refused (2) when its config changed or its weights do not load; an interrupted
    one continues (sets args.resume). None: train."""
    changed = changed_keys(out / "config.json", cfg)
    if not args.force and not args.resume:
        if (out / "metrics.json").exists():
            if changed:
                return refuse(f"{out}: trained with a different config ({', '.join(changed)} changed); "
                              "--force to retrain it, or --out another folder")
            problem = unusable_weights(out)
            if problem:
                return refuse(f"{problem}; --force to retrain the run")
            print(f"{out}: already trained (metrics.json exists; --force to retrain)")
            return 0
        # a killed run continues by itself; under torchrun each rank would decide alone, so there: --resume
        if (out / "last.pt").exists() and not changed and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            print(f"{out}: continuing the interrupted run from last.pt (--force to start over)")
            args.resume = True
    problem = unusable_weights(out) if args.resume and (out / "last.pt").exists() else None
    if problem:  # found now, not after the remaining epochs, when training reloads the best weights
        return refuse(f"{problem}; --force to start the run over")
    return None


class TeacherError(ValueError):
    """A teacher that is missing, the student's own model, or trained on other data, profile, seed or rate."""


def teacher_names(value) -> list[str]:
    """`teacher` as given: "a,b" on the command line, a string or a list in a TOML config."""
    items = value if isinstance(value, list) else str(value).split(",")
    names = [str(t).strip() for t in items if str(t).strip()]
    if not names:
        raise TeacherError(f"teacher = {value!r}: name a model or a run folder")
    return names


def train_command(model: str, cfg: dict) -> str:
    """The make command that trains `model` with the student's profile, seed and config."""
    seed = f" SEED={cfg['seed']}" if cfg["seed"] else ""
    config = "" if cfg["config"] == "default" else f" CONFIG={cfg['config']}"
    return f"make train-{model} PROFILE={cfg['profile']}{seed}{config}"


def teacher_folder(name: str, cfg: dict) -> Path:
    """A model name stands for its run of the student's profile, seed and config; anything else is a run folder
    (a path, or a name under artifacts/runs)."""
    if name not in MODELS:
        path = Path(name).expanduser()
        return runs_dir() / name if not path.exists() and (runs_dir() / name).exists() else path
    if name == cfg["model"]:
        raise TeacherError(f"teacher {name} is the student itself; distil from another model")
    try:
        tcfg = config_mod.resolve(name, cfg["profile"], None, cfg["config"], {"seed": cfg["seed"]})
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise TeacherError(f"teacher {name}: {e}") from None
    return runs_dir() / run_name(tcfg)


def teacher_mismatches(tcfg: dict, cfg: dict, data_dir: Path) -> list[str]:
    """What makes a teacher's run another experiment than the student's: cache, its statistics, profile, seed, rate."""
    norm = training_normalization(data_dir).get("normalization")
    pairs = {"data cache": (str(Path(tcfg.get("data", "?")).resolve()), str(Path(data_dir).resolve())),
             "profile": (tcfg.get("profile"), cfg["profile"]), "seed": (tcfg["seed"], cfg["seed"]),
             "sampling rate": (tcfg["sampling_rate"], cfg["sampling_rate"]),
             "cache statistics": ("other" if tcfg.get("normalization", norm) != norm else "same", "same")}
    return [f"{k} {t} vs the student's {s}" for k, (t, s) in pairs.items() if t != s]


def finished(run: Path) -> bool:
    return (run / "metrics.json").exists() and (run / "best.safetensors").exists()


STUDENTS_ENV = "MODELS_TRAIN_STUDENTS"  # the students waiting on this process's run: a teacher cycle stops in one line


def train_missing_teacher(name: str, run: Path, cfg: dict, data_dir: Path, progress: bool = True) -> None:
    """A teacher named by its model and not trained yet is trained now, as `make train-<teacher>` would: the
    student's profile, config, seed and data, its own default representation, in a process of its own. Not under
    torchrun, whose every rank would start one: there check_teacher asks for it first."""
    if name not in MODELS or finished(run) or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    waiting = [m for m in os.environ.get(STUDENTS_ENV, "").split(",") if m]
    if name in waiting:
        raise TeacherError(f"teacher {name} would learn from its own student ({' → '.join([*waiting, cfg['model']])}"
                           f" → {name}); give one of them teacher = \"none\"")
    cmd = [sys.executable, "-m", "models.train", "--model", name, "--profile", cfg["profile"], "--config",
           str(cfg["config"]), "--set", f"seed={cfg['seed']}", "--data", str(data_dir)]
    log(f"teacher {name}: no finished run at {run}; training it first")
    rc = subprocess.run(cmd + ([] if progress else ["--no-progress"]),
                        env={**os.environ, STUDENTS_ENV: ",".join([*waiting, cfg["model"]])}).returncode
    if rc != 0:
        raise TeacherError(f"teacher {name}: training its run {run} failed (exit {rc}, its error above); "
                           f"{train_command(name, cfg)} trains it alone")


def check_teacher(name: str, run: Path, cfg: dict, data_dir: Path) -> None:
    if not finished(run):
        how = f"train it first: {train_command(name, cfg)}" if name in MODELS else "name a finished training run"
        raise TeacherError(f"teacher {name}: no finished run at {run}; {how}")
    try:
        tcfg = read_config(run)
    except (OSError, ValueError) as e:
        raise TeacherError(f"teacher {run}: unreadable config.json ({e})") from None
    if tcfg.get("model") == cfg["model"]:
        raise TeacherError(f"teacher {run} is a {cfg['model']} run, the student itself; distil from another model")
    diff = teacher_mismatches(tcfg, cfg, data_dir)
    if diff:
        raise TeacherError(f"teacher {run} does not match the student: {'; '.join(diff)}; train it with the "
                           f"student's settings: {train_command(tcfg.get('model', '<teacher>'), cfg)}")


def probe_teacher(runs: list[dict], cfg: dict) -> None:
    """Load the teacher and score a zero batch of the student's crop length, so an unloadable teacher or one that
    takes only its own crop length (a ViT's fixed patch grid) fails now, in one line."""
    fs = int(cfg["sampling_rate"])
    n = int(round(cfg["crop_seconds"] * fs))
    try:
        out = load_teacher(runs, fs)(torch.zeros(2, 12, n))
    except Exception as e:  # noqa: BLE001 - any failure of a teacher is its own one-line error
        first = (str(e).strip().splitlines() or [""])[0]
        raise TeacherError(f"teacher {', '.join(r['run'] for r in runs)}: cannot score the student's "
                           f"{cfg.get('crop_seconds')} s crops ({type(e).__name__}: {first})") from None
    if out.dim() != 2 or out.shape[0] != 2:
        raise TeacherError(f"teacher {', '.join(r['run'] for r in runs)}: gives outputs of shape {tuple(out.shape)}")


def resolve_teachers(cfg: dict, data_dir: Path, progress: bool = True) -> list[dict]:
    """[{name, run, sha256}] of the finished, matching teacher runs `cfg["teacher"]` names (TeacherError if not),
    trained first where a model's run is missing: what config.json records, and what train() loads."""
    from shared.runs import checkpoint_sha256

    check_settings(cfg)
    runs = []
    for name in teacher_names(cfg["teacher"]):
        run = teacher_folder(name, cfg)
        train_missing_teacher(name, run, cfg, data_dir, progress)
        check_teacher(name, run, cfg, data_dir)
        runs.append({"name": name, "run": str(run.resolve()), "sha256": checkpoint_sha256(run)})
    probe_teacher(runs, cfg)
    return runs


@contextmanager
def run_lock(out: Path):
    """Held while this process trains `out`: a student training its missing teacher and `make train-all`'s own job
    for that teacher wait for each other instead of writing the same files (torchrun's ranks share one run)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    with open(out / ".train.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{out}: another process is training this run; waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = config_mod.parse_overrides(args.set)
        cfg = config_mod.resolve(args.model, args.profile, args.representation, args.config, overrides)
        data_dir = args.data or data_cache_dir(cfg["sampling_rate"])
        if cfg.get("teacher"):  # checked (a missing teacher model trained) before anything of the student is written
            cfg["teacher_runs"] = resolve_teachers(cfg, data_dir, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return refuse(str(e))
    out = args.out or runs_dir() / run_name(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        return train_run(cfg, out, data_dir, args)


def train_run(cfg: dict, out: Path, data_dir: Path, args) -> int:
    """Keep, continue or train the run in `out`, and print its result line."""
    status = existing_run(out, {**cfg, "data": str(data_dir)}, args)
    if status is not None:
        return status
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(out / "config.json", {**cfg, "data": str(data_dir), "versions": library_versions(),
                                                **training_normalization(data_dir)})
    try:
        result = train(cfg, out, data_dir, args.resume, progress=not args.no_progress)
    except (CacheError, NoFullBatch, PretrainedUnavailable) as e:
        return refuse(str(e))
    except UnsafeCheckpoint as e:  # last.pt, read to resume
        return refuse(f"{e}; --force to start the run over")
    except TeacherChanged as e:  # retrained after this run recorded it
        return refuse(str(e))
    if result:
        log(f"{out.name}: val macro AUC {result['val']['macro_auc']:.4f}, test macro AUC "
              f"{result['test']['macro_auc']:.4f}, {result['train_seconds']:.0f} s, "
              f"data share {result['data_time_share']}"
              + (f", teacher cost {result['teacher_cost']}x a plain run" if "teacher_cost" in result else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
