"""An OpenVINO compiled model that behaves like a torch module in eval mode: tensors in, tensors out.

`OpenVinoModel(path)(x)` runs an IR (`model.xml` + `model.bin`: an XML graph and raw weights, nothing that
runs Python) on the CPU plugin. Like shared/onnx_model.py, its thread count follows torch.get_num_threads()
at call time, one compiled model per thread count. Precision is pinned to f32 for the non-quantized parts:
on CPUs with bf16 (AVX512_BF16, AMX) OpenVINO would otherwise run them in bf16 and change the numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.io import first_line

PRECISION = "f32"          # INFERENCE_PRECISION_HINT: f32 | bf16 (only where the CPU has it natively)
MAX_ISA_ENV = "ONEDNN_MAX_CPU_ISA"  # OpenVINO's CPU plugin honours oneDNN's ISA cap (e.g. AVX2) at start-up


def compile_config(threads: int, precision: str = PRECISION) -> dict:
    return {"INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}


class OpenVinoModel:
    """Callable wrapper of an OpenVINO CompiledModel (CPU): float tensor N×… → float tensor N×classes."""

    def __init__(self, path: str | Path, threads: int | None = None, precision: str = PRECISION):
        import openvino as ov

        self.path = Path(path)
        if not self.path.exists() or not self.path.with_suffix(".bin").exists():
            raise FileNotFoundError(f"{self.path}: OpenVINO IR not found (model.xml and model.bin)")
        self.threads, self.precision = threads, precision
        self.core = ov.Core()
        try:
            self.ir = self.core.read_model(str(self.path))
        except Exception as e:
            raise ValueError(f"{self.path}: not a loadable OpenVINO IR ({first_line(e)})") from None
        self._compiled: dict[int, object] = {}
        self.compiled(self.threads or torch.get_num_threads())  # fail now, not at the first batch

    def compiled(self, threads: int):
        c = self._compiled.get(threads)
        if c is None:
            try:
                c = self.core.compile_model(self.ir, "CPU", compile_config(threads, self.precision))
            except Exception as e:
                raise ValueError(f"{self.path}: OpenVINO cannot compile it for this CPU ({first_line(e)})") from None
            self._compiled[threads] = c
        return c

    def eval(self) -> "OpenVinoModel":
        return self

    def train(self, mode: bool = True) -> "OpenVinoModel":
        if mode:
            raise RuntimeError("an OpenVINO model cannot be trained")
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.compiled(self.threads or torch.get_num_threads())
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(np.asarray(c(arr)[0]).copy())

    def __repr__(self) -> str:
        return f"OpenVinoModel({str(self.path)!r}, threads={self.threads or 'torch'})"
