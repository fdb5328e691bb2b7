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
"""
import os
import sys
from collections import namedtuple

import pytest
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
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import dnnrl_ext  # noqa: E402  (after the settings so collection errors are readable)
from ops_testutil import DEVICES, require_compiled  # noqa: E402

Impl = namedtuple("Impl", "backend device")


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


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend dnnrl_ext._C failed to load."""
    monkeypatch.setattr(dnnrl_ext._extension, "_C", None)
    monkeypatch.setattr(dnnrl_ext._extension, "_LOAD_ERROR", "simulated: _C missing")
