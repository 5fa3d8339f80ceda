"""Input checks shared by the native wrappers and their twins: the same clear errors either way."""
from __future__ import annotations

import numpy as np


def int_array(values, name: str, *, ndim: int = 1) -> np.ndarray:
    """Return `values` as an int32/int64 numpy array, raising TypeError/ValueError that name `name`."""
    if isinstance(values, np.ndarray):
        arr = values
    else:
        try:
            arr = np.asarray(values)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of integers: {exc}") from exc
        if arr.size == 0:
            arr = arr.astype(np.int64)
    if arr.dtype.kind == "u" and arr.dtype.itemsize < 8:
        arr = arr.astype(np.int64)
    if arr.dtype not in (np.int32, np.int64):
        raise TypeError(f"{name} must be an int32 or int64 array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (strides {arr.strides}); "
                         f"pass np.ascontiguousarray({name})")
    return arr


def check_impl(impl: str) -> None:
    if impl not in ("native", "python"):
        raise ValueError(f"impl must be 'native' or 'python', got {impl!r}")
