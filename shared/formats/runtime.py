"""What the ONNX Runtime and OpenVINO wrappers share: a model another runtime runs that behaves like a torch module
in eval mode (tensors in, tensors out). Its thread count follows torch.get_num_threads() at call time, one
compiled program per thread count (and, where the runtime runs fixed shapes faster, per input shape) made on
first use, so code that sets torch's threads (the benchmark, predict_dataset's callers) drives the other
runtime the same way; `threads=` pins it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class RuntimeModel:
    runtime = "another runtime"
    max_programs = 8  # compiled programs kept; the least recently used goes first

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path, self.threads = Path(path), threads
        self.programs: dict[tuple, object] = {}  # (threads, shape or None) → program

    def program(self, threads: int | None = None, shape: tuple | None = None):
        """The compiled program for `threads` (default: the pinned count, else torch's) and, where `shape_key`
        asks for one per shape, for this input shape; made once, the `max_programs` latest kept."""
        key = (threads or self.threads or torch.get_num_threads(), self.shape_key(shape))
        program = self.programs.pop(key) if key in self.programs else self.compile(*key)
        self.programs[key] = program  # most recently used last
        while len(self.programs) > self.max_programs:
            self.programs.pop(next(iter(self.programs)))
        return program

    def shape_key(self, shape: tuple | None):
        """None: one program serves every input shape (the default)."""
        return None

    def compile(self, threads: int, shape: tuple | None = None):
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
        return torch.from_numpy(self.run(self.program(shape=arr.shape), arr))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, threads={self.threads or 'torch'})"
