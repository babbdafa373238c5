"""Which build products this user made on this machine: an HMAC with a per-user key kept outside the
artifacts tree.

A compiled AOTInductor package is a native shared library: loading it runs its code. A stamp file beside
it proves nothing (whoever ships the folder can write one too), so the stamp carries an HMAC of the
package's sha256 under a key that only this user's account holds (`~/.config/ptbxl-compress/build.key`,
mode 0600; `PTBXL_KEY_DIR` moves it). A package from anywhere else fails the check and is rebuilt from its
exported program, which is itself checked before loading (shared/safe_pt2.py).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def key_path() -> Path:
    base = os.environ.get("PTBXL_KEY_DIR") or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / \
        "ptbxl-compress"
    return Path(base) / "build.key"


def _key() -> bytes:
    path = key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent process then reads the same key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def sign(sha256: str, context: str = "") -> str:
    """HMAC-SHA256 of a file's sha256 (plus what it was built from) under this user's key."""
    return hmac.new(_key(), f"{sha256}\n{context}".encode(), hashlib.sha256).hexdigest()


def verify(sha256: str, signature: str | None, context: str = "") -> bool:
    return bool(signature) and hmac.compare_digest(sign(sha256, context), str(signature))
