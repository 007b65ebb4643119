"""Device arguments checked up front: a string, torch.device or CUDA index
that names a device this machine has, refused by name otherwise (instead of
torch's error from deep inside a model move, after the model is built).

Below every layer; imports nothing of the package but its errors.
"""
from __future__ import annotations

import torch

from .errors import InvalidInputError, InvalidTypeError


def check_device(device: str | torch.device | int, what: str) -> torch.device:
    """`device` as a torch.device ("cuda:1", torch.device("cpu"), 0 for cuda:0);
    raises InvalidTypeError / InvalidInputError naming `what` and the device when
    it is not one, or when it is a CUDA device this machine does not have."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise InvalidTypeError(f"{what}: device must be a string, torch.device or CUDA index, "
                               f"got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidInputError(f"{what}: {device!r} is not a device ({reason})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"{what}: device {str(dev)!r}, but this machine has no usable CUDA device "
                                    "(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(f"{what}: device {str(dev)!r}, but this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
    return dev
