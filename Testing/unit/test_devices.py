"""Device choice: what ``--device`` accepts and how it refuses an absent or misspelt device."""
import pytest
import torch

from USBLib.core.devices import pick_device
from USBLib.errors import InputError


@pytest.mark.parametrize("name", ["tpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0.5", "gpu", "cuda:²"])
def test_a_misspelt_device_is_refused_by_name(name):
    with pytest.raises(InputError, match=f"unknown device '{name}'.*cuda:N"):
        pick_device(name)


def test_a_gpu_number_past_the_machine_s_gpus_is_refused(monkeypatch):
    """On a one-GPU machine ``cuda:0`` is taken and ``cuda:1`` refused before any work (it failed inside torch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("CUDA:0") == torch.device("cuda:0")
    with pytest.raises(InputError, match="'cuda:1' was asked for but this machine has 1 CUDA GPU"):
        pick_device("cuda:1")


def test_cpu_and_auto_always_work():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(None).type in ("cpu", "cuda", "mps")
