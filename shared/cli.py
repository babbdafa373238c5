"""Command-line pieces the stage scripts share, so each says the same thing the same way: which training run a
command works on (--model/--profile/--representation/--kd or --run), and comma lists of method names."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_run_choice(ap: argparse.ArgumentParser, verb: str, best: bool = False) -> None:
    """--model (with --profile, --representation, --kd) or --run [or --best]: exactly one is required."""
    from shared.nets import MODELS

    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=MODELS, help=f"{verb} artifacts/runs/<model>-<repr>-<profile>")
    src.add_argument("--run", type=Path, help="a training run folder (or its name under artifacts/runs)")
    if best:
        src.add_argument("--best", action="store_true", help=f"{verb} the run of --profile with the best val macro AUC")
    ap.add_argument("--profile", default=os.environ.get("PROFILE", "cpu"),
                    help="with --model: the run's profile (default $PROFILE or cpu)")
    ap.add_argument("--representation", default=os.environ.get("REPR") or None,
                    help="with --model: the run's representation (default $REPR or the config's)")
    add_kd_choice(ap)


def add_kd_choice(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--kd", action=argparse.BooleanOptionalAction, default=None,
                    help="with --model: its distilled run (<run>-kd, make train-<model> TEACHER=…) or, --no-kd, its "
                         "plain one (TEACHER=none); default: distilled where the profile names a teacher")


def chosen_run(args: argparse.Namespace) -> Path:
    """The run folder add_run_choice's arguments name; FileNotFoundError (one line) when it has no model."""
    from shared.runs import find_run, training_run

    if args.model:
        return find_run(args.model, args.profile, args.representation, args.kd)
    return training_run(args.run)


def comma_list(text: str, allowed: tuple[str, ...], what: str = "variant") -> list[str]:
    """'static, qat' → ['static', 'qat']; a name outside `allowed` is a ValueError naming the choices."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if bad := [v for v in names if v not in allowed]:
        raise ValueError(f"unknown {what}(s) {bad}; choose from {allowed}")
    return names


def add_output_args(ap: argparse.ArgumentParser) -> None:
    """--data (the cache), --out (the variants' root) and --force, as every compression step takes them."""
    ap.add_argument("--data", type=Path, default=None, help="cache folder (default from the run's sampling rate)")
    ap.add_argument("--out", type=Path, default=None, help="output root (default artifacts/compressed)")
    ap.add_argument("--force", action="store_true", help="redo finished variants")


def exit_code(work, already_reported: tuple[type[Exception], ...] = ()) -> int:
    """Run `work()`: 0 when it returns; 2 with one `error: …` line for bad input (a missing file, a bad value);
    1 for the failures in `already_reported`, which said what went wrong as they happened."""
    import sys

    from shared.io import first_line

    try:
        work()
    except already_reported:
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0
