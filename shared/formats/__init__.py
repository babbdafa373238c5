"""One module per artifact format. A variant folder's variant.json names its method; shared/variants.py loads it:
  fp32     the run's best.safetensors (config.json beside it rebuilds the network: shared/runs.py)
  pruned   sparse.safetensors: each pruned weight as a packed bit mask + its non-zero values (sparse.py)
  dynamic  int8.safetensors: int8 Linear weights with their scales, other tensors as they were (dynamic_int8.py)
  static / qat   model.pt2: an exported int8 program (PT2E, X86 inductor quantizer; exported.py); model.x86.pt2
                 beside it is its AOTInductor build for this machine's CPU (a cache, rebuilt when stale: compiled.py)
  onnx_fp32 / onnx_int8   model.onnx, run by ONNX Runtime (onnx_model.py)
  structured  structured.safetensors + shapes.json: a narrower dense network (shared/structured.py)
  openvino_fp32 / openvino_int8   model.xml + model.bin, an OpenVINO IR (NNCF int8), run by OpenVINO
                 (openvino_model.py)
None of them runs pickled code when loaded.
"""
