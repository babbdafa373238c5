"""Atomic writes and safe loads: every file a later stage trusts appears whole or not at all."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared artifacts unreadable to others
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, recorded beside every artifact."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "torchao", "numpy", "pandas", "scikit-learn", "wfdb",
                 "onnxruntime", "optuna"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def save_checkpoint(path: str | os.PathLike, obj: dict) -> None:
    """torch.save, atomically. Only tensors and plain Python values, so `load_checkpoint` can refuse code."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class UnsafeCheckpoint(RuntimeError):
    pass


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load with weights_only=True: a file that would run pickled code is refused, never executed."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file fails anywhere in the unpickler: KeyError, EOFError, UnpicklingError, …
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if code:
            raise UnsafeCheckpoint(f"{path}: refused — it would load the Python object {code[1]}, "
                                   "not only weights") from None
        raise UnsafeCheckpoint(f"{path}: damaged or not a checkpoint ({_torch_load_reason(e)})") from None


def _torch_load_reason(e: BaseException) -> str:
    """torch.load's reason in a few words: its messages run on for paragraphs of advice that does not apply here
    (re-run with weights_only=False), so their first line alone stops mid-sentence."""
    text = str(e).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    reason = (detail[1] if detail else text.split("\n")[0]).split(". ")[0].rstrip(". ")[:300]
    if detail or isinstance(e, (RuntimeError, OSError)):
        return reason
    return f"{type(e).__name__}: {reason}" if reason else type(e).__name__


def save_weights(path: str | os.PathLike, state_dict: dict, metadata: dict | None = None) -> None:
    """Model weights as safetensors (no code can ride along), written atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_weights(path: str | os.PathLike) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights not found")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: damaged or not a safetensors file ({first_line(e)})") from None


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message cut to one line, for one-line error reports (inductor and ONNX messages run long)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else "no message"
