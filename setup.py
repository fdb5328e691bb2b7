"""Build of dnnrl_ext._C (C++ always, CUDA when available) and the two packages.

Environment switches (pytorch_scatter's convention):
  FORCE_CUDA=1   build the CUDA kernels even where torch.cuda.is_available() is False
                 (e.g. a CI machine without a GPU); fails if nvcc is missing.
  FORCE_CPU=1    build the CPU kernels only.
  TORCH_CUDA_ARCH_LIST  architectures for nvcc (default "8.0;9.0+PTX": sm_80 and sm_90 code,
                        plus compute_90 PTX that the driver compiles for newer cards).
  DNNRL_DEBUG=1  -O0 -g builds.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pip's build isolation hides torch: say how to install instead
    sys.stderr.write(
        "dnnrl: torch is not importable in this build environment; install torch first, "
        "then run: pip install --no-build-isolation .\n")
    sys.exit(1)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    """torch's detection can pick /usr/local through a wrapper nvcc; prefer a real toolkit."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda():
    if _flag("FORCE_CPU"):
        return False, "FORCE_CPU=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        if _flag("FORCE_CUDA"):
            sys.exit("dnnrl: FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found"
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_ext
    cpp_ext.CUDA_HOME = cuda_home
    if _flag("FORCE_CUDA") or torch.cuda.is_available():
        return True, "FORCE_CUDA=1" if _flag("FORCE_CUDA") else "torch.cuda.is_available()"
    # Default: build CUDA whenever torch has CUDA and nvcc is found, GPU or not.
    return True, "torch has CUDA and nvcc is at " + cuda_home


def _nvidia_wheel_includes():
    """torch's CUDA headers include cuSPARSE/cuBLAS headers that ship in the nvidia wheels
    (wherever they are installed: this environment, or a base one a venv sees)."""
    roots = set()
    try:
        import nvidia  # namespace package of the nvidia-* wheels that come with torch
        roots.update(nvidia.__path__)
    except ImportError:
        pass
    roots.add(os.path.join(sysconfig.get_paths()["purelib"], "nvidia"))
    found = []
    for root in sorted(roots):
        found += sorted(glob.glob(os.path.join(root, "*", "include")))
        found += sorted(glob.glob(os.path.join(root, "*", "*", "include")))
    return found


def make_extension():
    with_cuda, why = _want_cuda()
    debug = _flag("DNNRL_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = [os.path.join("csrc", "ops.cpp"), os.path.join("csrc", "autograd.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = opt + ["-std=c++20", "-fopenmp", "-march=x86-64-v2", "-mtune=generic"]
    if not debug:
        cxx += ["-ffp-contract=off"]  # keep CPU results reproducible across builds
    define_macros = []
    extra_link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        # +PTX: B200 (sm_100) and RTX 50xx (sm_120) run the compute_90 PTX, compiled by the
        # driver on first use (ptxas takes ~8 s for all three files; the driver caches it)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        define_macros.append(("DNNRL_WITH_CUDA", None))
        include_dirs += _nvidia_wheel_includes()
        nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        if _flag("DNNRL_PTXAS_VERBOSE"):
            nvcc.append("-Xptxas=-v")
        ext = CUDAExtension(
            "dnnrl_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)
    else:
        ext = CppExtension(
            "dnnrl_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
    print("dnnrl: building dnnrl_ext._C with CUDA=%s (%s), arch list=%s, torch %s, %s"
          % (with_cuda, why, os.environ.get("TORCH_CUDA_ARCH_LIST", "-") if with_cuda else "-",
             torch.__version__, "debug" if debug else "release"), flush=True)
    return ext


setup(
    packages=find_packages(include=["dnnrl_ext", "dnnrl_ext.*"])
    + find_packages("python", include=["dnnrl", "dnnrl.*"]),
    package_dir={"dnnrl": "python/dnnrl"},
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    include_package_data=True,
)
