"""An ONNX Runtime session that behaves like a torch module in eval mode: tensors in, tensors out.

`OnnxModel(path)(x)` runs the ONNX file on the CPU. Its thread count follows `torch.get_num_threads()` at
call time (one session per thread count, made on first use), so code that sets torch's threads — the
compression benchmark, predict_dataset callers — drives ONNX Runtime the same way; pass `threads=` to pin it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.formats.runtime import RuntimeModel
from shared.io import first_line

GRAPH_OPTIMIZATION = "all"     # disable | basic | extended | all (ORT's GraphOptimizationLevel)
# Operator sets ONNX Runtime implements itself; another domain would need a custom-op library loaded into the
# process (native code), which this project never registers.
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def check_model(path: Path) -> None:
    """An ONNX file is a protobuf graph of standard operators: nothing in it runs Python. Refuse the two things
    that would reach outside it — weights in external files (read from paths the file names) and operators of
    a custom domain — with one line naming the file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable ONNX model ({first_line(e)})") from None
    graphs = [model.graph] + list(model.functions)
    allowed = set(STANDARD_DOMAINS) | {f.domain for f in model.functions}  # functions defined in the file itself
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"{path}: refused to load: initializer {t.name!r} is read from an external file")
    for g in graphs:
        for node in g.node:
            if node.domain not in allowed:
                raise ValueError(f"{path}: refused to load: operator {node.op_type!r} of custom domain {node.domain!r}")


def session_options(threads: int, optimization: str = GRAPH_OPTIMIZATION):
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = levels[optimization]
    so.log_severity_level = 3  # errors only: no warnings about unused initializers etc.
    return so


class OnnxModel(RuntimeModel):
    """Callable wrapper of an onnxruntime.InferenceSession (CPU): float tensor N×… → float tensor N×classes."""
    runtime = "ONNX Runtime"

    def __init__(self, path: str | Path, threads: int | None = None, optimization: str = GRAPH_OPTIMIZATION):
        super().__init__(path, threads)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: ONNX model not found")
        check_model(self.path)
        self.optimization = optimization
        self.program()  # fail now, not at the first batch

    def compile(self, threads: int, shape: tuple | None = None):
        import onnxruntime as ort

        try:
            s = ort.InferenceSession(str(self.path), session_options(threads, self.optimization),
                                     providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ValueError(f"{self.path}: not a loadable ONNX model ({first_line(e)})") from None
        self.input_name, self.output_name = s.get_inputs()[0].name, s.get_outputs()[0].name
        return s

    def run(self, session, x: np.ndarray) -> np.ndarray:
        return session.run([self.output_name], {self.input_name: x})[0]
