"""Device choice (octa3d.utils.dist): an unknown or unavailable --device is an error, never a silent CPU run."""

import pytest
import torch

from octa3d.errors import ConfigError
from octa3d.utils import dist


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_and_auto_without_cuda(no_cuda):
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("auto") == torch.device("cpu")
    assert dist.init_from_env("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu0", "gpu", "CUDA", "cuda:x", "cuda0", "", "tpu"])
def test_unknown_device_strings_are_refused(spec):
    with pytest.raises(ConfigError, match="--device.*choose auto, cpu, cuda"):
        dist.init_from_env(spec)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_machine_without_cuda_is_an_error(no_cuda, spec):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        dist.init_from_env(spec)


def test_gpu_index_beyond_the_gpus_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 GPU"):
        dist.resolve_device("cuda:2")


def test_mps_where_it_is_missing(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device mps"):
        dist.resolve_device("mps")
