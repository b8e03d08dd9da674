"""Working dtypes of the ops, torchvision's rules, and the autocast kernels that apply them.

- Box maths (areas, IoUs, widths) runs in the boxes' dtype upcast as torchvision's `_upcast`:
  float16 / bfloat16 -> float32 (a 300 x 300 px area is inf in float16), int8 / int16 / uint8 ->
  int32 (a 100 x 100 px area wraps in int8). float32, float64, int32, int64 stay as they are.
- NMS, RoIAlign and RoIPool compute coordinates, bilinear weights and sums of low-precision
  input in float32 and cast the result back to the input dtype (torchvision's autocast kernels:
  `roi_align(input.float(), rois.float(), ...).to(input.dtype)`). float32 and float64 input takes
  the unchanged fast path.
- Under torch.autocast the RoI ops and NMS get an Autocast kernel that does the same cast
  (float32 in, input dtype out), so autocast treats them as it treats torchvision's ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

LOW_FLOATS = (torch.float16, torch.bfloat16)
_SMALL_INTS = (torch.int8, torch.int16, torch.uint8)


def upcast_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype box maths runs in for boxes of `dtype` (torchvision's `_upcast`)."""
    if dtype in LOW_FLOATS:
        return torch.float32
    if dtype in _SMALL_INTS:
        return torch.int32
    return dtype


def upcast(t: Tensor) -> Tensor:
    """t in `upcast_dtype(t.dtype)`; float32 / float64 / int32 / int64 tensors come back as they are."""
    dtype = upcast_dtype(t.dtype)
    return t if dtype == t.dtype else t.to(dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype RoI ops compute in for features of `dtype`: float32 for float16 / bfloat16."""
    return torch.float32 if dtype in LOW_FLOATS else dtype


# --- autocast -----------------------------------------------------------------------------------


def _to_float32(value, device_type: str):
    """Floating tensors (also inside lists) on device_type, except float64, to float32: the
    inputs torch.autocast casts for an op that runs in float32 (as torch.library's rule)."""
    if isinstance(value, Tensor):
        cast = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.float() if cast else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v, device_type) for v in value)
    return value


def _first_tensor(args) -> Tensor:
    first = args[0]
    return first[0] if isinstance(first, (list, tuple)) else first


_AUTOCAST_LIB = torch.library.Library("frcnn", "FRAGMENT")


def register_float32_autocast(op_name: str, cast_back: Callable[[object, torch.dtype], object] | None) -> None:
    """Run frcnn::<op_name> in float32 under autocast (CPU and CUDA).

    cast_back(output, dtype) returns the output in the dtype of the op's first tensor input (the
    features), as torchvision's RoI ops do; None leaves the output alone (NMS: int64 indices).
    """
    op = getattr(torch.ops.frcnn, op_name).default
    for device_type in ("cpu", "cuda"):
        if not torch.amp.is_autocast_available(device_type):
            continue
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        # the same exclusion torch.library.register_autocast uses: re-dispatch past autocast
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=exclude):
            dtype = _first_tensor(args).dtype
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                out = op(*_to_float32(args, _device_type))
            return out if cast_back is None else cast_back(out, dtype)

        _AUTOCAST_LIB.impl(op_name, kernel, key, with_keyset=True)
