"""AOTInductor packages of the int8 programs (model.x86.pt2 beside model.pt2): a native build for this machine's
torch and CPU, stamped with an HMAC of this user's key (shared/trust.py) and rebuilt when anything changed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from shared import trust
from shared.formats.exported import load_program
from shared.hardware import host_cpu
from shared.io import first_line, read_json, sha256_file


COMPILED_METHODS = ("static", "qat")  # PT2E int8 graphs run int8 kernels only after inductor lowering
COMPILED_FILE = "model.x86.pt2"        # AOTInductor package built from model.pt2 on this machine
COMPILED_STAMP = "compiled.json"       # what it was built from, and for which torch and CPU



def compiled_stamp(source: Path) -> dict:
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
    program = load_program(source)
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
    stamp = compiled_stamp(source)
    package_sha = sha256_file(variant_dir / COMPILED_FILE)
    write_json_atomic(variant_dir / COMPILED_STAMP, {**stamp, "seconds": round(time.time() - t0, 1),
                                                     "package_sha256": package_sha,
                                                     "hmac": trust.sign(package_sha, stamp_context(stamp))})
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


def stamp_context(stamp: dict) -> str:
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
    expected = compiled_stamp(variant_dir / artifact)
    if any(stamp.get(k) != v for k, v in expected.items()):
        return False
    return trust.verify(sha256_file(package), stamp.get("hmac"), stamp_context(expected))
