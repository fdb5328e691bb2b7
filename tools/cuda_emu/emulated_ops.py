"""Build and load the CUDA kernels of dnnrl_ext as CPU code (the kernel emulator).

The kernels' own source (csrc/cuda) is rewritten in a few mechanical ways, compiled by
the host compiler with include/dnnrl_cuda_emu.h in front, and registered as the operator
library ``dnnrl_emu`` with the same schemas as ``dnnrl_ext``, taking CPU tensors:

    ops = load()
    loss, pos, neg, r, valid = ops.triplet_loss(x_cpu, labels_cpu, 0, 0, 1.0, 1.0, 0.0, 1)

The rewrites: ``kern<<<cfg>>>(args)`` -> ``Launch(cfg).go(kern, args)``; ``extern
__shared__ ... name[];`` -> the block's emulated dynamic shared memory; a static
``__shared__`` variable is poisoned (0xFF) once per block; the CUDA runtime calls go to
the emulator's; ``__noinline__`` -> the GNU attribute; ``TORCH_LIBRARY_IMPL(dnnrl_ext, CUDA)`` -> ``(dnnrl_emu, CPU)``;
``is_cuda()`` -> ``is_cpu()``. Everything else compiles as written: a rewrite that fails
to match raises, so the emulator never tests something other than the kernels.

Why a hand-made emulator: no library runs CUDA C++ on a CPU with the checks we want
(barrier divergence, warp-collective masks, cp.async ordering); see the header for
what it models and what it cannot find.
"""
import functools
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(ROOT, "build", "cuda_emu")

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?unsigned\s+char\s+(\w+)\[\];")
_STATIC_SHARED = re.compile(r"(?<!extern )__shared__\s+([\w:<>, ]+?)\s+(\w+)(\s*\[[^\]]*\])?\s*;")
_RUNTIME_CALLS = re.compile(
    r"(?<![\w:])(cudaGetDevice|cudaMemsetAsync|cudaFuncGetAttributes|cudaFuncSetAttribute|"
    r"cudaOccupancyMaxActiveBlocksPerMultiprocessor)\s*\(")
_IMPL = "TORCH_LIBRARY_IMPL(dnnrl_ext, CUDA, m)"


def cuda_include_dir():
    """Directory with cuda_fp16.h / cuda_runtime_api.h (the toolkit's, else the nvidia wheel's), or None."""
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "include"))
    cands.append("/usr/local/cuda/include")
    try:
        import nvidia
        for root in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    for c in cands:
        if os.path.exists(os.path.join(c, "cuda_fp16.h")) and os.path.exists(os.path.join(c, "cuda_runtime_api.h")):
            return c
    return None


def rewrite(text, name):
    """The emulator's form of one CUDA source file (see the module docstring)."""
    n_launch = len(_LAUNCH.findall(text))
    text = _LAUNCH.sub(lambda m: "::dnnrl_emu::Launch(%s).go(%s, " % (m.group(2), m.group(1)), text)
    if "<<<" in text:
        raise RuntimeError("%s: a kernel launch the emulator's rewrite does not understand" % name)
    text = _EXTERN_SHARED.sub(
        lambda m: "unsigned char* %s = static_cast<unsigned char*>(::dnnrl_emu::dynamic_smem());" % m.group(1), text)
    if "extern __shared__" in text:
        raise RuntimeError("%s: an extern __shared__ declaration that is not `unsigned char name[]`" % name)
    text = _STATIC_SHARED.sub(
        lambda m: "%s ::dnnrl_emu::shared_decl(&%s, sizeof(%s));" % (m.group(0), m.group(2), m.group(2)), text)
    text = _RUNTIME_CALLS.sub(lambda m: "::dnnrl_emu::%s(" % m.group(1), text)
    text = text.replace(_IMPL, "TORCH_LIBRARY_IMPL(dnnrl_emu, CPU, m)")
    text = text.replace(".is_cuda()", ".is_cpu()")
    # nvcc's keyword; a macro of that name would break libstdc++'s __attribute__((__noinline__)).
    text = re.sub(r"\b__noinline__\b", "__attribute__((noinline))", text)
    if "TORCH_LIBRARY_IMPL(dnnrl_ext" in text:
        raise RuntimeError("%s: a registration the emulator's rewrite does not understand" % name)
    return text, n_launch


def schemas():
    """The m.def(...) schema strings of csrc/ops.cpp's TORCH_LIBRARY(dnnrl_ext, m) block."""
    src = open(os.path.join(CSRC, "ops.cpp")).read()
    block = src[src.index("TORCH_LIBRARY(dnnrl_ext, m)"):]
    block = block[:block.index("\n}\n")]
    out = []
    for m in re.finditer(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)\)", block):
        out.append("".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", m.group(1))))
    if not out:
        raise RuntimeError("no schemas found in csrc/ops.cpp")
    return out


def write_sources(dest):
    """Write the rewritten sources and the registration file under dest; returns the .cpp paths."""
    os.makedirs(os.path.join(dest, "cuda"), exist_ok=True)
    _write_if_changed(os.path.join(dest, "common.h"), open(os.path.join(CSRC, "common.h")).read())
    cpps = []
    for path in sorted(glob.glob(os.path.join(CSRC, "cuda", "*"))) + [os.path.join(HERE, "selftest_kernels.cu")]:
        name = os.path.basename(path)
        text, _ = rewrite(open(path).read(), name)
        out = os.path.join(dest, "cuda", name[:-3] + ".cpp" if name.endswith(".cu") else name)
        _write_if_changed(out, text)
        if out.endswith(".cpp"):
            cpps.append(out)
    defs = "\n".join('  m.def("%s");' % s for s in schemas())
    reg = os.path.join(dest, "emu_library.cpp")
    _write_if_changed(reg, "// Generated by tools/cuda_emu/emulated_ops.py: dnnrl_ext's schemas as dnnrl_emu.\n"
                           "#include <torch/library.h>\n\nTORCH_LIBRARY(dnnrl_emu, m) {\n%s\n}\n" % defs)
    return cpps + [reg, os.path.join(HERE, "emu_runtime.cpp")]


def _write_if_changed(path, text):
    if os.path.exists(path) and open(path).read() == text:
        return  # keep the mtime, so ninja does not rebuild it
    with open(path, "w") as f:
        f.write(text)


def asan_requested():
    """DNNRL_EMU_ASAN=1: build (into build/cuda_emu_asan) and load the AddressSanitizer variant;
    the process must have libasan preloaded (tools/cuda_emu/memcheck.sh does it)."""
    return os.environ.get("DNNRL_EMU_ASAN", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def load(verbose=False):
    """Build (incrementally) and load the emulated kernels; returns torch.ops.dnnrl_emu."""
    import torch
    from torch.utils import cpp_extension

    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise RuntimeError("the CUDA emulator needs cuda_fp16.h "
                           "(a CUDA toolkit or the nvidia wheels that come with torch)")
    asan = asan_requested()
    build = BUILD + ("_asan" if asan else "")
    src = os.path.join(build, "src")
    sources = write_sources(src)
    os.makedirs(os.path.join(build, "obj"), exist_ok=True)
    flags = ["-O2", "-include", "dnnrl_cuda_emu.h", "-Wno-unknown-pragmas", "-Wno-unused-variable",
             "-Wno-unused-function", "-DDNNRL_CUDA_EMU=1"]
    ldflags = []
    if asan:  # memcheck.sh: AddressSanitizer on the kernels' global and shared memory accesses
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer", "-O1"]
        ldflags += ["-fsanitize=address"]
    # the compiler and linker run without the preloaded sanitizer runtime (this process keeps it)
    preload = os.environ.pop("LD_PRELOAD", None) if asan else None
    try:
        path = cpp_extension.load(
            name="dnnrl_cuda_emu" + ("_asan" if asan else ""), sources=sources, extra_cflags=flags,
            extra_ldflags=ldflags, extra_include_paths=[os.path.join(HERE, "include"), cuda_inc],
            build_directory=os.path.join(build, "obj"), is_python_module=False, verbose=verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    if isinstance(path, str):
        torch.ops.load_library(path)
    return torch.ops.dnnrl_emu


if __name__ == "__main__":
    load(verbose="-v" in sys.argv)
    print("dnnrl_emu loaded")


OPS = ("triplet_loss", "triplet_loss_indexed", "triplet_loss_backward", "knn", "knn_vote")


class emulated_cpu_kernels:
    """Context manager: while open, dnnrl_ext's CPU kernels are the emulated CUDA kernels.

    Everything that reaches ``torch.ops.dnnrl_ext`` with CPU tensors (the public wrappers,
    the C++ autograd, the loss modules) then runs the CUDA code path, so the op tests'
    CPU cases test the CUDA kernels with their own tolerances. The dispatcher keeps the
    CPU kernel underneath and restores it on exit.
    """

    def __enter__(self):
        import warnings

        import torch
        from dnnrl_ext import ops  # defines the dnnrl_ext library first
        emu = load()
        self._lib = torch.library.Library("dnnrl_ext", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel": the point
            for name in OPS:
                self._lib.impl(name, getattr(emu, name).default, "CPU")
        # DNNRL_KNN_STATS: the wrappers read the counters of the emulated kernels for CPU tensors.
        self._ops, self._warn = ops, ops._warn_knn_stats

        def warn_knn_stats(query, gallery, k):
            if os.environ.get("DNNRL_KNN_STATS", "0") in ("", "0") or not ops._eager():
                return
            ops._knn_stats_warning(*emu.knn_candidate_stats(), query, gallery, k)

        ops._warn_knn_stats = warn_knn_stats
        return emu

    def __exit__(self, *exc):
        self._ops._warn_knn_stats = self._warn
        self._lib._destroy()
        return False
