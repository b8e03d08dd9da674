"""frcnn.export: checkpoint -> ONNX (custom-op lowering, dynamic batch/size), parity verification,
TensorRT engine build, Triton model repository. `python -m export --help`.

The graph contract (input/output names, shapes, dtypes, metadata keys) lives in runtime/contract.py.
Nothing heavy is imported here: `import export.onnx_export` etc. when needed.
"""
