"""TensorRT 10 backend: runs an engine built by `python -m export tensorrt` behind the Backend protocol.

    backend = TensorRTBackend("model.engine")
    raw = backend(images: Tensor[B, 3, H, W] float32, image_sizes: Tensor[B, 2] int64) -> RawDetections

Inputs are bound with set_input_shape / set_tensor_address; execute_async_v3 runs on a torch CUDA
stream. Raw graphs have a data-dependent R (NonMaxSuppression -> INMSLayer, NonZero), so every
output goes through an IOutputAllocator that TensorRT calls with the real size once it is known.
Needs TensorRT 10 and a CUDA device; importing this module without them raises ImportError with
what to install.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from runtime.backends.graph_metadata import GraphMetadataMixin
from runtime.backends.tensorrt_io import import_tensorrt, read_sidecar
from runtime.contract import INPUT_NAMES, check_output_names

trt = import_tensorrt()

_TORCH_DTYPES = {
    trt.DataType.FLOAT: torch.float32,
    trt.DataType.HALF: torch.float16,
    trt.DataType.INT32: torch.int32,
    trt.DataType.INT64: torch.int64,
    trt.DataType.BOOL: torch.bool,
}


class _OutputAllocator(trt.IOutputAllocator):
    """Grows one torch CUDA buffer per output on demand and records the final shape."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.buffer = torch.empty(0, dtype=torch.uint8, device="cuda")
        self.shape: tuple[int, ...] = ()

    def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
        size = max(int(size), 1)
        if self.buffer.numel() < size:
            self.buffer = torch.empty(size, dtype=torch.uint8, device="cuda")
        return self.buffer.data_ptr()

    def reallocate_output(self, tensor_name, memory, size, alignment):  # pre-10.x entry point
        return self.reallocate_output_async(tensor_name, memory, size, alignment, None)

    def notify_shape(self, tensor_name, shape):
        self.shape = tuple(shape)

    def tensor(self) -> Tensor:
        n = 1
        for d in self.shape:
            n *= d
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return self.buffer[: n * itemsize].view(self.dtype).reshape(self.shape)


class TensorRTBackend(GraphMetadataMixin):
    name = "tensorrt"

    def __init__(self, path: str | Path, *, device: int = 0):
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA device")
        self.path = Path(path)
        self.device = torch.device("cuda", device)
        self.metadata, self.sidecar = read_sidecar(self.path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.path}: TensorRT could not deserialize the engine (version mismatch?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if set(inputs) != set(INPUT_NAMES):
            raise ValueError(f"engine inputs {inputs} != contract {INPUT_NAMES}")
        check_output_names(self.output_names, with_nms=self.metadata.with_nms)
        self.allocators = {}
        for n in self.output_names:
            alloc = _OutputAllocator(_TORCH_DTYPES[self.engine.get_tensor_dtype(n)])
            self.context.set_output_allocator(n, alloc)
            self.allocators[n] = alloc
        self.input_dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n)] for n in INPUT_NAMES}
        self.stream = torch.cuda.Stream(device=self.device)

    def run(self, images: Tensor, image_sizes: Tensor) -> list[Tensor]:
        """The engine's outputs as CPU tensors, in contract order."""
        feeds = {"images": images, "image_sizes": image_sizes}
        with torch.cuda.stream(self.stream):
            bound = {}
            for n, t in feeds.items():
                t = t.to(self.device, self.input_dtypes[n], non_blocking=True).contiguous()
                bound[n] = t  # keep alive until the stream is synchronised
                if not self.context.set_input_shape(n, tuple(t.shape)):
                    raise ValueError(f"{n} shape {tuple(t.shape)} outside the engine's profile "
                                     f"{self.sidecar.get('profile')}")
                self.context.set_tensor_address(n, t.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            self.stream.synchronize()
        return [self.allocators[n].tensor().cpu().clone() for n in self.output_names]

    def __call__(self, images: Tensor, image_sizes: Tensor):
        outs = self.run(images, image_sizes)
        if self.metadata.with_nms:
            from runtime.backends.onnxruntime_backend import nms_outputs_to_raw

            boxes, scores, labels, num = outs
            return nms_outputs_to_raw(boxes.float(), scores.float(), labels.long(), num.long(),
                                      num_classes=len(self.metadata.class_names))
        from model.postprocess import RawDetections

        batch_idx, scores, boxes = outs
        return RawDetections(batch_idx=batch_idx.long(), scores=scores.float(), boxes=boxes.float())
