"""Shared pytest configuration of the dnnrl test suite.

* Hypothesis profiles: "ci" (default, modest example counts so the suite runs in a
  few minutes on two cores), "dev" (more examples) and "soak" (1000 per test, a longer
  search run by hand now and then). Pick one with
  ``HYPOTHESIS_PROFILE=dev python3 -m pytest tests``.
* ``impl`` fixture: (backend, device) pairs, "reference" always, "compiled" when
  ``dnnrl_ext._C`` is built; "cuda" devices only where CUDA is available.
* Compiled-op tests skip with a clear reason when the extension is not built, except
  where ``DNNRL_REQUIRE_EXTENSION=1`` (or ``CI`` is set): there they fail, because CI
  builds the extension and a silent skip would hide a broken build.
* ``DNNRL_TEST_EMULATED_CUDA=1``: for the whole session dnnrl_ext's CPU kernels are the
  CUDA kernels run by the emulator (tools/cuda_emu), so the CPU cases of the op tests
  test the CUDA code path without a GPU (slow: pair it with a small profile, e.g.
  ``HYPOTHESIS_PROFILE=quick``; docs/testing.md).
"""
import os
import sys
from collections import namedtuple

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # ops_testutil

settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=False, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "dev", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(  # a longer search, run by hand now and then (docs/testing.md)
    "soak", max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(  # with DNNRL_TEST_EMULATED_CUDA=1: emulated kernels are ~100x slower
    "quick", max_examples=10, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import dnnrl_ext  # noqa: E402  (after the settings so collection errors are readable)
from ops_testutil import DEVICES, require_compiled  # noqa: E402

Impl = namedtuple("Impl", "backend device")


@pytest.fixture(scope="session", autouse=True)
def _emulated_cuda_session():
    """DNNRL_TEST_EMULATED_CUDA=1: the CPU kernels are the emulated CUDA kernels throughout."""
    if os.environ.get("DNNRL_TEST_EMULATED_CUDA", "0") in ("", "0"):
        yield
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "cuda_emu"))
    import emulated_ops
    with emulated_ops.emulated_cpu_kernels():
        yield


def _impl_params():
    out = []
    for device in DEVICES:
        for backend in ("reference", "compiled"):
            marks = [pytest.mark.cuda] if device == "cuda" else []
            out.append(pytest.param(Impl(backend, device), id="%s-%s" % (backend, device), marks=marks))
    return out


@pytest.fixture(params=_impl_params())
def impl(request):
    """A (backend, device) pair; compiled pairs skip when the kernels are not built."""
    if request.param.backend == "compiled":
        require_compiled(request.param.device)
    return request.param


@pytest.fixture(params=[pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [])
                        for d in DEVICES])
def compiled_device(request):
    """A device whose compiled kernels exist (skips or, in CI, fails otherwise)."""
    require_compiled(request.param)
    return request.param


EMULATED_FULL = os.environ.get("DNNRL_TEST_EMULATED_CUDA", "0") not in ("", "0")


class GpuTarget:
    """Where a CUDA-kernel test runs: ``device`` for its tensors and ``sync()`` after its calls."""

    def __init__(self, name, device, sync):
        self.name, self.device, self.sync = name, device, sync

    def skip_slow_emulation(self, what: str) -> None:
        """In the emulator, skip a case that takes it most of a minute or more, unless
        DNNRL_TEST_EMULATED_CUDA=1 asks for everything (CI keeps the smaller cases)."""
        if self.name == "emu" and not EMULATED_FULL:
            pytest.skip("slow in the CPU emulator (%s); DNNRL_TEST_EMULATED_CUDA=1 runs it" % what)

    def __repr__(self):
        return "GpuTarget(%s)" % self.name


def load_emulator():
    """tools/cuda_emu's module, its library built and loaded; skips (fails in CI) where it cannot be built."""
    from ops_testutil import _must_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "tools", "cuda_emu"))
    import emulated_ops
    why = None
    if emulated_ops.cuda_include_dir() is None:
        why = "the CUDA emulator needs cuda_fp16.h (a CUDA toolkit or torch's nvidia wheels)"
    else:
        try:
            emulated_ops.load()
        except Exception as e:  # a compiler error: report it, in CI as a failure
            why = "the CUDA emulator did not build: %s" % str(e)[-2000:]
    if why is not None:
        if _must_run():
            pytest.fail(why + " -- DNNRL_REQUIRE_EXTENSION/CI is set")
        pytest.skip(why)
    return emulated_ops


@pytest.fixture(params=[pytest.param("cuda", marks=[pytest.mark.cuda]), "emu"])
def gpu(request):
    """The CUDA kernels, on a GPU ("cuda": skipped without one) or in the CPU emulator ("emu":
    CPU tensors, dnnrl_ext's CPU kernels replaced by the emulated CUDA kernels meanwhile)."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        require_compiled("cuda")
        yield GpuTarget("cuda", "cuda", torch.cuda.synchronize)
        return
    require_compiled("cpu")  # the schemas of dnnrl_ext
    with load_emulator().emulated_cpu_kernels():
        yield GpuTarget("emu", "cpu", lambda: None)


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend dnnrl_ext._C failed to load."""
    monkeypatch.setattr(dnnrl_ext._extension, "_C", None)
    monkeypatch.setattr(dnnrl_ext._extension, "_LOAD_ERROR", "simulated: _C missing")
