"""Device arguments are checked up front and refused by name."""
import pytest
import torch

from hipro_fast.devices import check_device
from hipro_fast.errors import InvalidInputError, InvalidTypeError


def test_devices_this_machine_has_are_taken_as_torch_devices():
    assert check_device("cpu", "x") == torch.device("cpu")
    assert check_device(torch.device("cpu"), "x") == torch.device("cpu")
    assert check_device("meta", "x") == torch.device("meta")
    if torch.cuda.is_available():
        assert check_device(0, "x") == torch.device("cuda:0")
        assert check_device("cuda", "x") == torch.device("cuda")


@pytest.mark.parametrize("device, error, message", [
    ("gpu", InvalidInputError, r"where: 'gpu' is not a device \(Expected one of cpu"),
    ("cuda:x", InvalidInputError, r"where: 'cuda:x' is not a device"),
    (1.0, InvalidTypeError, "where: device must be a string, torch.device or CUDA index, got float"),
    (True, InvalidTypeError, "got bool"),
    (None, InvalidTypeError, "got NoneType"),
])
def test_what_is_not_a_device_is_named(device, error, message):
    with pytest.raises(error, match=message):
        check_device(device, "where")


def test_a_cuda_device_this_machine_lacks_is_named():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    why = "has no usable CUDA device" if count == 0 else f"has {count} CUDA device"
    for device in ("cuda", f"cuda:{count}", count):
        if count and device != f"cuda:{count}" and device != count:
            continue  # present on this machine
        with pytest.raises(InvalidInputError, match=why):
            check_device(device, "where")
