"""Loading of the compiled extension dnnrl_ext._C.

Importing dnnrl_ext never fails because of the extension: when _C cannot be loaded
the reason is kept and every compiled op raises ExtensionNotAvailable saying why and
how to rebuild, while backend="reference" keeps working.
"""
import importlib
import importlib.util

import torch

_C = None
_LOAD_ERROR = None
if importlib.util.find_spec("dnnrl_ext._C") is None:
    _LOAD_ERROR = ("no compiled dnnrl_ext._C next to dnnrl_ext/__init__.py (the extension was not built)")
else:
    try:
        _C = importlib.import_module("dnnrl_ext._C")  # registers torch.ops.dnnrl_ext.*
    except Exception as exc:  # undefined symbols from a torch mismatch, a missing libcudart, ...
        _LOAD_ERROR = "%s: %s" % (type(exc).__name__, exc)

REBUILD_HINT = ("rebuild it against the installed torch with "
                "`pip install --no-build-isolation --force-reinstall --no-deps .` "
                "from the dnnrl source tree (FORCE_CUDA=1 to include the CUDA kernels)")


class ExtensionNotAvailable(RuntimeError):
    """The compiled kernels cannot run here; backend="reference" still can."""


def is_available() -> bool:
    """True when dnnrl_ext._C loaded and its ops are registered."""
    return _C is not None


def has_cuda_kernels() -> bool:
    """True when the loaded _C was built with the CUDA kernels."""
    return _C is not None and bool(_C.compiled_with_cuda())


def require(device: torch.device) -> None:
    """Raise ExtensionNotAvailable unless the compiled kernels can run on `device`."""
    if _C is None:
        raise ExtensionNotAvailable(
            "dnnrl_ext._C could not be loaded (%s); %s, or pass backend='reference'"
            % (_LOAD_ERROR, REBUILD_HINT))
    if device.type == "cuda" and not _C.compiled_with_cuda():
        raise ExtensionNotAvailable(
            "dnnrl_ext._C was built without CUDA kernels, so it cannot run on %s; %s, "
            "or pass backend='reference'" % (device, REBUILD_HINT))
    if device.type not in ("cpu", "cuda", "meta"):
        raise ExtensionNotAvailable(
            "dnnrl_ext has kernels for cpu and cuda tensors, got device %s; "
            "pass backend='reference'" % device)
