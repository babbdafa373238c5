"""Check a torch.export archive (`model.pt2`) before torch.export.load opens it.

torch.export.load trusts its archive: weights or constants marked `use_pickle` are unpickled with
weights_only=False, custom and opaque objects are unpickled, sample inputs fall back to
weights_only=False, symbolic shape strings go through sympy.sympify (which evaluates Python), graph
targets are resolved by getattr from `torch`, and `guards_code` becomes a generated Python function.
Each of these runs code from a crafted file, so an archive is loaded only when every entry is raw
tensor bytes or JSON, every shape expression is plain arithmetic on symbols, every graph target is
a registered operator, and it has no guards code. The programs this project writes always pass.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path, PurePosixPath

# Entry names below the archive's root folder; anything else (legacy pickled state dicts, custom or
# opaque objects, AOTInductor binaries, external weights) is refused.
_ALLOWED_ENTRIES = [re.compile(p) for p in (
    r"archive_format", r"archive_version", r"byteorder", r"version", r"\.data/version", r"\.data/serialization_id",
    r"models/\w+\.json", r"extra/[\w.]+",
    r"data/weights/\w+_weights_config\.json", r"data/weights/weight_\d+",
    r"data/constants/\w+_constants_config\.json", r"data/constants/tensor_\d+",
    r"data/sample_inputs/\w+\.pt")]
_OPERATOR = re.compile(r"torch\.ops\.(aten|prims|quantized_decomposed|torchao)\.\w+\.\w+"
                       r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|neg|pow|eq|ne|lt|le|gt|ge|and_|or_|not_)"
                       r"|math\.(ceil|floor|sqrt|trunc)|torch\.sym_(max|min|not|float|int|sqrt|ite|sum)")
_SYMPY_NAMES = {"Symbol", "Integer", "Float", "Rational", "Min", "Max", "Mul", "Add", "Pow", "Mod", "Abs", "Eq",
                "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "floor", "ceiling", "sqrt", "oo", "zoo", "nan",
                "True", "False", "positive", "integer", "real", "nonnegative", "finite", "FloorDiv",
                "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
                "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
                "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "IsNonOverlappingAndDenseIndicator"}
_EXPR_TOKEN = re.compile(r"\s+|'[a-z]{1,8}\d+'|\d+(\.\d+)?(e-?\d+)?|[A-Za-z_]\w*|\*\*|//|[-+*/%(),<>=!&|~]")
_SYMBOL = re.compile(r"[a-z]{1,8}\d+")


class UnsafeArchive(ValueError):
    """The archive holds something torch.export.load would execute or unpickle."""


def _check_expression(expr: str) -> str | None:
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if not m:
            return f"shape expression {expr[:60]!r} is not plain arithmetic"
        token = m.group(0)
        if (token[0].isalpha() or token[0] == "_") and token not in _SYMPY_NAMES and not _SYMBOL.fullmatch(token):
            return f"shape expression {expr[:60]!r} calls {token!r}"
        pos = m.end()
    return None


def _graph_problem(program: dict) -> str | None:
    """Targets, shape strings and guards of one models/*.json."""
    if program.get("guards_code"):
        return "the program carries guards code (generated Python)"
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            target = node.get("target")
            if isinstance(target, str) and "inputs" in node and not _OPERATOR.fullmatch(target):
                return f"graph calls {target[:80]!r}, not a registered operator"
            expr = node.get("expr_str")
            if isinstance(expr, str) and (problem := _check_expression(expr)):
                return problem
            stack.extend(v for k, v in node.items() if k != "metadata")
    return None


def _payload_problem(config: dict) -> str | None:
    for name, meta in config.get("config", {}).items():
        if meta.get("use_pickle"):
            return f"{name!r} is stored as a pickle"
        if not re.fullmatch(r"(weight|tensor)_\d+", str(meta.get("path_name", ""))):
            return f"{name!r} is stored as {meta.get('path_name')!r}, not raw tensor bytes"
    return None


def _sample_inputs_problem(data: bytes) -> str | None:
    """torch.export.load retries sample inputs with weights_only=False when weights_only=True fails."""
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # anything weights_only refuses (or cannot read) would be retried unsafely
        return "its sample inputs are not loadable with weights_only=True"
    return None


def _entry_problem(zf: zipfile.ZipFile, name: str, rel: str) -> str | None:
    if not any(p.fullmatch(rel) for p in _ALLOWED_ENTRIES):
        return f"unexpected entry {name!r}"
    if rel.endswith("_config.json"):
        return _payload_problem(json.loads(zf.read(name)))
    if rel.startswith("models/"):
        return _graph_problem(json.loads(zf.read(name)))
    if rel.startswith("data/sample_inputs/"):
        return _sample_inputs_problem(zf.read(name))
    return None


def check_archive(path: str | Path) -> None:
    """Raise UnsafeArchive (one line naming the file) unless loading the archive can only read tensors."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            roots = {PurePosixPath(n).parts[0] for n in names if n}
            if len(roots) != 1 or not any(n.endswith(".json") and "/models/" in n for n in names):
                raise UnsafeArchive(f"{path}: not a torch.export archive (one root folder with models/*.json)")
            for name in names:
                if name.endswith("/"):
                    continue
                problem = _entry_problem(zf, name, name.split("/", 1)[1] if "/" in name else "")
                if problem:
                    raise UnsafeArchive(f"{path}: refused to load: {problem}")
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UnsafeArchive(f"{path}: not a readable torch.export archive ({type(e).__name__}: {e})") from None
