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


def cpu_tile_gemm():
    """The GEMM that the CPU kernels' float32 tiles take now: "onednn" or "mm" (at::mm,
    i.e. MKL), or None without the extension. Default: oneDNN on non-Intel CPUs, where MKL
    runs its AVX2 code; DNNRL_CPU_TILE_GEMM=onednn|mm|auto and torch.backends.mkldnn.enabled
    change it (csrc/cpu/tile_product.h). Benchmarks record it beside their CPU figures."""
    return None if _C is None else str(_C.cpu_tile_gemm())


# The CUDA kernels use what Ampere brought (cp.async, bfloat16 and TF32 tensor cores). The
# default build holds sm_80 and sm_90 code plus compute_90 PTX, which the driver compiles
# for newer cards (sm_100, sm_120) on first use; an older card would fail at its first
# launch with "no kernel image is available", which does not say what to do.
MIN_CUDA_CAPABILITY = (8, 0)
_cuda_capability = {}  # device index -> (major, minor), read once per device


def _unavailable_reason(device: torch.device):
    """Why the compiled kernels cannot run on `device`, or None when they can."""
    if _C is None:
        return "dnnrl_ext._C could not be loaded (%s); %s" % (_LOAD_ERROR, REBUILD_HINT)
    if device.type == "cuda":
        if not _C.compiled_with_cuda():
            return ("dnnrl_ext._C was built without CUDA kernels, so it cannot run on %s; %s"
                    % (device, REBUILD_HINT))
        if torch.compiler.is_compiling():  # checked in eager calls; keep traces free of it
            return None
        capability = _cuda_capability.get(device.index)  # the per-call path: one dict lookup
        if capability is None:
            if not torch.cuda.is_available():
                return "no CUDA device is available here (torch.cuda.is_available() is False)"
            index = device.index if device.index is not None else torch.cuda.current_device()
            capability = _cuda_capability[index] = tuple(torch.cuda.get_device_capability(index))
        else:
            index = device.index
        major, minor = capability
        if (major, minor) < MIN_CUDA_CAPABILITY:
            return ("dnnrl_ext's CUDA kernels need compute capability %d.%d or newer (Ampere: A100, "
                    "RTX 30xx and later); cuda:%d (%s) has %d.%d" % (
                        MIN_CUDA_CAPABILITY + (index, torch.cuda.get_device_name(index), major, minor)))
        return None
    if device.type not in ("cpu", "meta"):
        return "dnnrl_ext has kernels for cpu and cuda tensors, got device %s" % device
    return None


def kernels_available(device) -> bool:
    """True when the compiled kernels can run on `device` (a torch.device or string):
    the extension loaded, and for a CUDA device it has CUDA kernels and the card is an
    Ampere (compute capability 8.0) or newer one."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:  # torch's own message lists every device type there is
        raise ValueError("device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got %r (%s)"
                         % (device, exc)) from None
    return _unavailable_reason(device) is None


def require(device: torch.device) -> None:
    """Raise ExtensionNotAvailable, saying why, unless the compiled kernels can run on `device`."""
    reason = _unavailable_reason(device)
    if reason is not None:
        raise ExtensionNotAvailable(reason + ", or pass backend='reference'")
