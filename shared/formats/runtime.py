"""What the ONNX Runtime and OpenVINO wrappers share: a model another runtime runs that behaves like a torch module
in eval mode (tensors in, tensors out). Its thread count follows torch.get_num_threads() at call time, one
compiled program per thread count made on first use, so code that sets torch's threads (the benchmark,
predict_dataset's callers) drives the other runtime the same way; `threads=` pins it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class RuntimeModel:
    runtime = "another runtime"

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path, self.threads = Path(path), threads
        self.programs: dict[int, object] = {}

    def program(self, threads: int | None = None):
        """The compiled program for `threads` (default: the pinned count, else torch's), made once."""
        threads = threads or self.threads or torch.get_num_threads()
        if threads not in self.programs:
            self.programs[threads] = self.compile(threads)
        return self.programs[threads]

    def compile(self, threads: int):
        raise NotImplementedError

    def run(self, program, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def eval(self) -> "RuntimeModel":
        return self

    def train(self, mode: bool = True) -> "RuntimeModel":
        if mode:
            raise RuntimeError(f"a model run by {self.runtime} cannot be trained")
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.run(self.program(), arr))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, threads={self.threads or 'torch'})"
