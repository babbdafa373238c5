"""An OpenVINO compiled model that behaves like a torch module in eval mode: tensors in, tensors out.

`OpenVinoModel(path)(x)` runs an IR (`model.xml` + `model.bin`: an XML graph and raw weights, nothing that
runs Python) on the CPU plugin. Its thread count follows torch.get_num_threads() (shared/formats/runtime.py)
at call time, one compiled model per thread count and input shape: the IR keeps its batch axis dynamic, but
the CPU plugin runs a static shape faster (reshaped vit/deit int8 IRs ran 1.1× faster at batch 32 and 1.3× at
batch 1, docs/design.md), so each batch size gets its own. Precision is pinned to f32 for the
non-quantized parts: on CPUs with bf16 (AVX512_BF16, AMX) OpenVINO would otherwise run them in bf16 and
change the numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.formats.runtime import RuntimeModel
from shared.io import first_line

PRECISION = "f32"          # INFERENCE_PRECISION_HINT: f32 | bf16 (only where the CPU has it natively)
MAX_ISA_ENV = "ONEDNN_MAX_CPU_ISA"  # OpenVINO's CPU plugin honours oneDNN's ISA cap (e.g. AVX2) at start-up


def compile_config(threads: int, precision: str = PRECISION) -> dict:
    return {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


class OpenVinoModel(RuntimeModel):
    """Callable wrapper of an OpenVINO CompiledModel (CPU): float tensor N×… → float tensor N×classes."""
    runtime = "OpenVINO"

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = PRECISION):
        import openvino as ov

        super().__init__(path, threads)
        if not self.path.exists() or not self.path.with_suffix(".bin").exists():
            raise FileNotFoundError(f"{self.path}: OpenVINO IR not found (model.xml and model.bin)")
        self.precision, self.core = precision, ov.Core()
        try:
            self.ir = self.core.read_model(str(self.path))
        except Exception as e:
            raise ValueError(f"{self.path}: not a loadable OpenVINO IR ({first_line(e)})") from None
        window = self.ir.input(0).get_partial_shape()[1:]  # past the batch axis; None where the IR leaves it open
        self.window = tuple(window.to_shape()) if window.is_static else None
        self.program(shape=None if self.window is None else (1, *self.window))  # fail at load, not at a batch

    def shape_key(self, shape: tuple | None):
        if shape is None or self.window is None:
            return None
        if tuple(shape[1:]) != self.window:  # a reshape would run any length; the IR was checked at this one
            raise ValueError(f"{self.path}: expects inputs N×{'×'.join(map(str, self.window))}, "
                             f"got {'×'.join(map(str, shape))}")
        return tuple(shape)

    def compile(self, threads: int, shape: tuple | None = None):
        try:
            ir = self.ir
            if shape is not None:
                ir = self.ir.clone()
                ir.reshape(list(shape))
            return self.core.compile_model(ir, "CPU", compile_config(threads, self.precision))
        except Exception as e:
            raise ValueError(f"{self.path}: OpenVINO cannot compile it for this CPU ({first_line(e)})") from None

    def run(self, compiled, x: np.ndarray) -> np.ndarray:
        return np.asarray(compiled(x)[0]).copy()
