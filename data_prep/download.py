"""Fetch PTB-XL from PhysioNet, or unpack a local zip, so every later stage can trust the files.

Why not `wget -r`: PTB-XL is ~44k small files; we want parallel transfers, resume after a cut,
a sha256 check of every file against PhysioNet's own SHA256SUMS.txt, cheap reruns, a fast and
clear failure when offline, and a zip extraction that cannot write outside its destination.
Only the stdlib and tqdm (shared/progress.py) are used so this runs before the heavy dependencies are installed.
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from shared.io import read_json, sha256_file, write_bytes_atomic, write_json_atomic
from shared.progress import meter

DEFAULT_BASE_URL = "https://physionet.org/files/ptb-xl/1.0.3/"
MANIFEST = "SHA256SUMS.txt"
METADATA_FILES = ("ptbxl_database.csv", "scp_statements.csv")
OPTIONAL_FILES = ("LICENSE.txt",)
OFFLINE_HINT = ("offline? point PTBXL_DIR at a local PTB-XL copy: "
                "make data PTBXL_DIR=/path/to/ptb-xl (or a .zip)")
_CHUNK = 1 << 16
_PERMANENT_HTTP = {401, 403, 404, 410}


class DownloadError(RuntimeError):
    """A download or extraction failure; the message is one line naming the file/URL and the problem."""


class _Transient(Exception):
    """A failure worth retrying (cut transfer, timeout, 5xx); kept internal."""


# --------------------------------------------------------------------------- manifest

def _check_relpath(rel: str, source: str) -> None:
    """Refuse manifest paths that could write outside dest."""
    norm = rel.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise DownloadError(f"{source}: refusing absolute path {rel!r}")
    if ".." in norm.split("/"):
        raise DownloadError(f"{source}: refusing path with '..' {rel!r}")


def parse_sha256sums(text: str, source: str = MANIFEST) -> list[tuple[str, str]]:
    """Parse PhysioNet's `<sha256> <relative path>` lines into (sha, path) pairs, validating each path."""
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        sha, _, rel = line.partition(" ")
        rel = rel.strip().lstrip("*")  # sha256sum's binary-mode marker
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha) or not rel:
            raise DownloadError(f"{source}: line {n} is not '<sha256> <path>': {line[:80]!r}")
        _check_relpath(rel, source)
        entries.append((sha.lower(), rel))
    return entries


def select_files(entries: list[tuple[str, str]], sampling_rate: int) -> list[tuple[str, str]]:
    """Keep the metadata and the records of one sampling rate; the other rate is ~2 GB we don't need."""
    if sampling_rate not in (100, 500):
        raise ValueError(f"sampling_rate must be 100 or 500, got {sampling_rate}")
    prefix = f"records{sampling_rate}/"
    wanted = set(METADATA_FILES) | set(OPTIONAL_FILES)
    chosen = [(sha, rel) for sha, rel in entries if rel in wanted or rel.startswith(prefix)]
    listed = {rel for _, rel in chosen}
    missing = [name for name in METADATA_FILES if name not in listed]
    if missing:
        raise DownloadError(f"{MANIFEST}: does not list {', '.join(missing)}; is the base URL a PTB-XL release?")
    if not any(rel.startswith(prefix) for rel in listed):
        raise DownloadError(f"{MANIFEST}: lists no files under {prefix}")
    return chosen


def _fetch_manifest(url: str, timeout: float) -> str:
    """Fetch SHA256SUMS.txt; this is also the reachability probe, so it fails fast and says what to do."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; is the base URL a PTB-XL release?") from None
    except urllib.error.URLError as e:
        raise DownloadError(f"cannot reach {url} ({e.reason}); {OFFLINE_HINT}") from None
    except (OSError, http.client.HTTPException) as e:  # timeout or cut while reading the body
        raise DownloadError(f"cannot reach {url} ({type(e).__name__}: {e}); {OFFLINE_HINT}") from None
    except UnicodeDecodeError:
        raise DownloadError(f"{url}: not a text SHA256SUMS file") from None


# --------------------------------------------------------------------------- one file

def _transfer(url: str, part: Path, timeout: float) -> None:
    """One HTTP request into `part`, resuming from its current size; raise _Transient if cut short."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # our .part is longer than the file: start over
            part.unlink(missing_ok=True)
            raise _Transient("server refused the resume range (416)") from None
        if e.code in _PERMANENT_HTTP:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        raise _Transient(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise _Transient(str(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None

    with resp:
        mode = "wb"
        if resp.status == 206:
            start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        # 200 means the server ignored Range: rewrite from byte 0.
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        got = 0
        try:
            with open(part, mode) as f:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    got += len(chunk)
        except (OSError, http.client.HTTPException) as e:  # IncompleteRead, reset, timeout: keep .part
            raise _Transient(f"transfer cut after {got} bytes ({type(e).__name__})") from None
        if expected is not None and got < expected:
            raise _Transient(f"connection closed after {got} of {expected} bytes")


def _download_one(base_url: str, dest: Path, sha: str, rel: str, timeout: float, retries: int,
                  stop: threading.Event) -> bool:
    """Make dest/rel exist with the given sha256; return True if it had to be downloaded."""
    target = dest / rel
    if target.exists():
        if sha256_file(target) == sha:
            return False
        target.unlink()  # never leave a known-bad file under its final name
    if stop.is_set():
        raise DownloadError(f"{rel}: cancelled after another file failed")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    url = urllib.parse.urljoin(base_url, urllib.parse.quote(rel))
    problem = "no attempt made"
    for attempt in range(retries + 1):
        if attempt and problem != "sha256 mismatch":
            time.sleep(min(0.5 * (attempt - 1), 5.0))  # first retry at once, then back off
        try:
            _transfer(url, part, timeout)
        except _Transient as e:
            problem = str(e)
            continue
        if sha256_file(part) == sha:
            os.replace(part, target)
            return True
        part.unlink()
        problem = "sha256 mismatch"
    raise DownloadError(f"{rel}: failed after {retries + 1} attempts ({problem}) from {url}")


# --------------------------------------------------------------------------- public API

def fetch_ptbxl(dest: Path, sampling_rate: int, base_url: str = DEFAULT_BASE_URL, workers: int = 4,
                timeout: float = 10.0, retries: int = 3) -> Path:
    """Download and verify the PTB-XL files for one sampling rate into `dest`; rerunning skips verified files.

    `timeout` bounds each connect and each socket read, so an unreachable server fails in seconds.
    """
    dest = Path(dest)
    if workers < 1 or retries < 0:
        raise ValueError("workers must be >= 1 and retries >= 0")
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    manifest_url = urllib.parse.urljoin(base_url, MANIFEST)
    entries = parse_sha256sums(_fetch_manifest(manifest_url, timeout), manifest_url)
    chosen = select_files(entries, sampling_rate)
    dest.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            meter(len(chosen), f"PTB-XL {sampling_rate} Hz", "file") as bar:
        futures = {pool.submit(_download_one, base_url, dest, sha, rel, timeout, retries, stop)
                   for sha, rel in chosen}
        fetched = 0
        pending = futures
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    stop.set()
                    for other in pending:
                        other.cancel()
                    raise fut.exception()
                fetched += fut.result()
                bar.update(1)
        bar.set_postfix(downloaded=fetched, verified=len(chosen) - fetched)

    # Record what is here and verified (earlier runs may have fetched the other rate) for `sha256sum -c`.
    present = [f"{sha} {rel}\n" for sha, rel in entries if (dest / rel).is_file()]
    write_bytes_atomic(dest / MANIFEST, "".join(present).encode("utf-8"))
    return dest


def _unsafe_member(info: zipfile.ZipInfo, dest: Path) -> str | None:
    """Why this zip member could land outside dest, or None if it is safe."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' in path"
    if (info.external_attr >> 16) & 0o170000 == 0o120000:
        return "symlink"
    root = dest.resolve()
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        return "resolves outside the destination"
    return None


def _find_ptbxl_root(folder: Path, depth: int = 2) -> Path | None:
    """The first folder at most `depth` levels below `folder` holding ptbxl_database.csv."""
    level = [folder]
    for _ in range(depth + 1):
        for d in level:
            if (d / "ptbxl_database.csv").is_file():
                return d
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir() and c.name != "__MACOSX")
    return None


def extract_zip_safely(zip_path: Path, dest: Path) -> Path:
    """Extract a PTB-XL zip into `dest` all-or-nothing, refusing members that could escape `dest`.

    Returns the extracted folder that contains ptbxl_database.csv.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DownloadError(f"{zip_path}: cannot open zip ({e})") from None
    with zf:
        for info in zf.infolist():  # check everything before writing anything
            problem = _unsafe_member(info, dest)
            if problem:
                raise DownloadError(f"{zip_path}: refusing member {info.filename!r} ({problem}); nothing extracted")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            try:
                zf.extractall(tmp)
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise DownloadError(f"{zip_path}: extraction failed ({type(e).__name__}: {e})") from None
            children = list(tmp.iterdir())
            top = children[0] if len(children) == 1 and children[0].is_dir() else tmp
            data = _find_ptbxl_root(top)
            if data is None:
                raise DownloadError(f"{zip_path}: no ptbxl_database.csv within 2 folder levels; not a PTB-XL zip?")
            final = dest / (top.name if top is not tmp else zip_path.stem)
            inner = data.relative_to(top)
            old = None
            if final.exists():  # replace an earlier extraction only once the new one is complete
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
            os.replace(top, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / inner


EXTRACTED_STAMP = "extracted.json"


def zip_identity(zip_path: Path) -> dict:
    """The zip's path, size and mtime_ns — not its sha256: hashing the 1.7-3 GB PTB-XL zip takes seconds on every
    `make train-*` (each depends on `make data`), the very cost the stamp avoids, while any rewrite or replacement
    of the zip changes its size or mtime."""
    st = zip_path.stat()
    return {"zip": str(zip_path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def extract_zip_once(zip_path: Path, dest: Path) -> Path:
    """extract_zip_safely, skipped while dest's stamp (written only after a complete extraction) still matches
    the zip; returns the extracted folder that contains ptbxl_database.csv."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        identity = zip_identity(zip_path)
    except OSError as e:
        raise DownloadError(f"{zip_path}: cannot read zip ({e.strerror})") from None
    try:
        stamp = read_json(dest / EXTRACTED_STAMP)
        if stamp["source"] == identity and (dest / stamp["folder"] / "ptbxl_database.csv").is_file():
            return dest / stamp["folder"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    (dest / EXTRACTED_STAMP).unlink(missing_ok=True)  # an extraction killed midway must not look complete
    data = extract_zip_safely(zip_path, dest)
    write_json_atomic(dest / EXTRACTED_STAMP, {"source": identity, "folder": data.relative_to(dest).as_posix()})
    return data


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.download",
        description="Download PTB-XL from PhysioNet for one sampling rate, verifying every file's sha256 "
                    "against the release's SHA256SUMS.txt. Interrupted or partial downloads resume; "
                    "files already verified are skipped, so rerunning is cheap.",
        epilog="Offline? Use a local copy instead: make data PTBXL_DIR=/path/to/ptb-xl (or a .zip). "
               "Exit status 2 on any download failure.")
    parser.add_argument("--dest", type=Path, required=True, help="folder to download into (created if missing)")
    parser.add_argument("--sampling-rate", type=int, choices=(100, 500), required=True,
                        help="which records to fetch: records100/ (~0.4 GB) or records500/ (~2 GB)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="release URL (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds allowed per connect / socket read (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3, help="extra attempts per file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.retries < 0:
        parser.error("--workers must be >= 1 and --retries >= 0")
    try:
        out = fetch_ptbxl(args.dest, args.sampling_rate, args.base_url, args.workers, args.timeout, args.retries)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
