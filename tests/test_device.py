"""Where ``load_shard`` puts a shard inside an engine's process: ``device="cuda"`` is the process's current GPU as an
explicit index, ``cuda:N`` is honoured, anything else is one clear error (torch.cuda mocked: no GPU here; the
GPU run itself is ``benchmarks/gpu_device_check.py``)."""

from __future__ import annotations

import pytest
import torch

import raydist_loader as rl
from raydist_loader.errors import ConfigError
from raydist_loader.load.worker import ShardLoader, _resolve_device
from raydist_loader.testing.tiny_models import make_tiny_checkpoint

from .shards import stored_manifest


@pytest.fixture
def four_gpus_current_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that sees four GPUs and chose cuda:2 (``torch.cuda.set_device(2)``, as a TP worker does)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)


def test_cuda_is_the_current_device_with_its_index(four_gpus_current_2):
    assert _resolve_device("cuda") == torch.device("cuda", 2)
    assert _resolve_device("auto") == torch.device("cuda", 2)
    assert _resolve_device("cuda:1") == torch.device("cuda", 1), "an explicit index is honoured"
    assert _resolve_device("cuda:0") == torch.device("cuda", 0)
    assert _resolve_device("cpu") == torch.device("cpu")


def test_an_index_beyond_the_visible_gpus_is_one_error(four_gpus_current_2):
    with pytest.raises(ConfigError, match=r"device='cuda:7', but this process sees 4 CUDA device\(s\) \(0 to 3"):
        _resolve_device("cuda:7")


def test_without_cuda_auto_is_cpu_and_cuda_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="sees no CUDA device; use device='cpu' or 'auto'"):
        _resolve_device("cuda")


@pytest.mark.parametrize("bad", ["gpu", "meta", "cuda:x", ""])
def test_unknown_devices_are_one_error(bad):
    with pytest.raises(ConfigError, match=rf"device: got {bad!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        _resolve_device(bad)


def test_load_shard_resolves_before_any_read(tmp_path, four_gpus_current_2, monkeypatch: pytest.MonkeyPatch):
    """The loader an engine's worker builds records the resolved index (the copy path then uses it); a device
    this process cannot use fails before the store is read."""
    ckpt = make_tiny_checkpoint("llama", tmp_path / "llama")
    url = f"file://{tmp_path}/store"
    rl.publish(ckpt, url, "m", max_tp=2)
    raw = stored_manifest(url, "m")
    assert ShardLoader(url, raw, 2, 1, device="cuda").device == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        rl.load_shard("m", url, 2, 1, device="cuda")
