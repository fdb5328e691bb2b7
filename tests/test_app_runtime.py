"""dnnrl.runtime: which backend a run gets when the compiled kernels cannot serve its device."""
import logging

import pytest
import torch

import dnnrl_ext
from dnnrl import runtime


@pytest.fixture
def no_kernels(monkeypatch):
    """The extension as a machine without a build would see it."""
    monkeypatch.setattr(dnnrl_ext, "extension_available", lambda: False)
    monkeypatch.setattr(dnnrl_ext, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(runtime, "_warned_backend", False)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_without_kernels_auto_falls_back_to_the_reference_and_warns_once(no_kernels):
    # a handler of our own: the "dnnrl" logger does not propagate once a run set up logging
    seen = _Records()
    runtime.log.addHandler(seen)
    try:
        cpu = torch.device("cpu")
        assert runtime.resolve_backend("auto", cpu) == "reference"
        assert runtime.resolve_backend("auto", cpu) == "reference"
    finally:
        runtime.log.removeHandler(seen)
    warnings = [r for r in seen.records if "reference backend" in r.getMessage()]
    assert len(warnings) == 1 and "unavailable on cpu" in warnings[0].getMessage()


def test_without_kernels_compiled_is_an_error_naming_the_device(no_kernels):
    with pytest.raises(dnnrl_ext.ExtensionNotAvailable, match="backend='compiled'.*cpu"):
        runtime.resolve_backend("compiled", torch.device("cpu"))


def test_reference_is_always_granted_and_cuda_needs_cuda_kernels(monkeypatch):
    monkeypatch.setattr(dnnrl_ext, "extension_available", lambda: True)
    monkeypatch.setattr(dnnrl_ext, "has_cuda_kernels", lambda: False)  # a CPU-only build
    monkeypatch.setattr(runtime, "_warned_backend", True)
    assert runtime.resolve_backend("reference", torch.device("cpu")) == "reference"
    assert runtime.resolve_backend("auto", torch.device("cpu")) == "auto"
    assert runtime.resolve_backend("auto", torch.device("cuda")) == "reference"
    with pytest.raises(dnnrl_ext.ExtensionNotAvailable, match="cuda"):
        runtime.resolve_backend("compiled", torch.device("cuda"))
