"""The static / QAT int8 variants' format: a PT2E int8 program saved with torch.export (model.pt2), checked by
shared/safe_pt2.py before torch.export.load reads it."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from shared.io import first_line


def drop_unused_attributes(graph_module: nn.Module) -> nn.Module:
    """convert_pt2e leaves the fp32 originals of every quantized weight on the module, unused; exporting
    them would make the int8 file bigger than the fp32 one."""
    used = {n.target for n in graph_module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(graph_module.named_parameters()) + list(graph_module.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(graph_module.get_submodule(owner) if owner else graph_module, attr)
    return graph_module


def save_exported(path: Path, module: nn.Module, example: torch.Tensor) -> None:
    import io

    from shared.io import write_bytes_atomic

    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export(drop_unused_attributes(module), (example,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()  # not a temporary file name: the archive would be named after it and fail to load
    torch.export.save(ep, buf)
    write_bytes_atomic(path, deflate_zip(buf.getvalue()))


def deflate_zip(archive: bytes) -> bytes:
    """torch.export stores its zip entries uncompressed; its ~1 MB JSON graph and int64 per-channel zero
    points deflate well (vit static int8: 6.98 → 5.33 MB) and torch.export.load reads the result as is."""
    import io
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def load_program(path: Path):
    import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401  registers the quantized_decomposed ops

    from shared.safe_pt2 import check_archive

    check_archive(path)  # torch.export.load would unpickle and evaluate what a crafted archive holds
    try:
        return torch.export.load(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a loadable exported program ({first_line(e)})") from None


def load_exported(path: Path) -> nn.Module:
    """The int8 program as an eager module: reference int8 arithmetic in fp32 ops, correct but slow."""
    return inference_ready(load_program(path).module())


def inference_ready(graph_module: nn.Module) -> nn.Module:
    """Exported graphs refuse .eval(); let callers treat them like any module in eval mode."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(graph_module)
    graph_module.eval()
    return graph_module
