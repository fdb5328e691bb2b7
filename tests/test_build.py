"""The build itself: importing dnnrl_ext, and device code for sm_90 in the built _C."""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

import dnnrl_ext


def _cpu_only_on_purpose():
    if os.environ.get("FORCE_CPU", "0").lower() in ("1", "true", "yes", "on"):
        return "FORCE_CPU=1: CPU-only build requested"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    return None


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    for cand in ("/usr/local/cuda/bin/cuobjdump",):
        if os.path.exists(cand):
            return cand
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(cand):
            return cand
    except ImportError:
        pass
    return None


def _so_path():
    import dnnrl_ext._C as C  # noqa: N812
    return C.__file__


def test_import_reports_extension_state():
    """`import dnnrl_ext` works in a fresh interpreter and reports extension_available()."""
    code = "import dnnrl_ext; print(dnnrl_ext.extension_available(), dnnrl_ext.has_cuda_kernels())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    avail, cuda = out.stdout.split()[-2:]
    assert avail in ("True", "False") and cuda in ("True", "False")
    assert avail == str(dnnrl_ext.extension_available())
    assert cuda == str(dnnrl_ext.has_cuda_kernels())
    if cuda == "True":
        assert avail == "True"


def test_import_survives_a_broken_extension():
    """If _C fails to load (e.g. a torch mismatch), import still works, the reason is kept
    and the compiled ops raise ExtensionNotAvailable while the reference runs."""
    code = textwrap.dedent("""
        import importlib.abc, importlib.machinery, sys
        class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "dnnrl_ext._C":
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ImportError("undefined symbol: _ZN3c10simulated")
            def exec_module(self, module):
                pass
        sys.meta_path.insert(0, Broken())
        import torch, dnnrl_ext
        assert not dnnrl_ext.extension_available()
        x, y = torch.randn(4, 2), torch.tensor([0, 0, 1, 1])
        try:
            dnnrl_ext.triplet_loss(x, y)
        except dnnrl_ext.ExtensionNotAvailable as exc:
            assert "undefined symbol" in str(exc) and "rebuild" in str(exc), exc
        else:
            raise AssertionError("no ExtensionNotAvailable")
        print("OK", float(dnnrl_ext.triplet_loss(x, y, backend="reference")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "OK" in out.stdout


def test_extension_has_sm90_device_code():
    """CI builds the CUDA kernels: the .so must hold an sm_90 ELF (H100)."""
    why = _cpu_only_on_purpose()
    if why:
        pytest.skip(why)
    if not dnnrl_ext.has_cuda_kernels():
        pytest.fail("dnnrl_ext._C has no CUDA kernels (extension_available()=%s, load error: %s) "
                    "although torch has CUDA %s and FORCE_CPU is not set: CI must build them "
                    "(FORCE_CUDA=1 python3 setup.py build_ext --inplace)"
                    % (dnnrl_ext.extension_available(), dnnrl_ext._extension._LOAD_ERROR,
                       torch.version.cuda))
    tool = _cuobjdump()
    if tool is None:
        pytest.fail("cuobjdump not found (PATH, /usr/local/cuda/bin, triton's backends/nvidia/bin)")
    out = subprocess.run([tool, "--list-elf", _so_path()], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sm_90" in out.stdout, "no sm_90 ELF in %s:\n%s" % (_so_path(), out.stdout[-3000:])


def test_default_build_carries_ptx_for_newer_cards():
    """The default arch list ends in +PTX: compute_90 PTX in the .so is what lets a card
    newer than the built SASS (B200 sm_100, RTX 50xx sm_120) run the kernels at all."""
    why = _cpu_only_on_purpose()
    if why or not dnnrl_ext.has_cuda_kernels():
        pytest.skip(why or "no CUDA kernels in this build")
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        pytest.skip("TORCH_CUDA_ARCH_LIST=%s chooses the architectures" % os.environ["TORCH_CUDA_ARCH_LIST"])
    tool = _cuobjdump()
    if tool is None:
        pytest.fail("cuobjdump not found (PATH, /usr/local/cuda/bin, triton's backends/nvidia/bin)")
    out = subprocess.run([tool, "--list-ptx", _so_path()], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.count("sm_90.ptx") == 3, (
        "expected one compute_90 PTX per .cu file (default TORCH_CUDA_ARCH_LIST 8.0;9.0+PTX):\n"
        + out.stdout[-2000:] + out.stderr[-2000:])


def _quoted_includes(path):
    with open(path, encoding="utf-8") as f:
        return [line.split('"')[1] for line in f if line.lstrip().startswith("#include \"")]


def test_sdist_holds_everything_the_build_reads(tmp_path):
    """A source distribution builds: it carries every file of csrc/ (setuptools adds only
    the sources named in setup.py, not the headers they include; before MANIFEST.in an
    sdist stopped at `common.h: No such file`), every header a source includes, the CMake
    build, the licence and both Python packages with the packaged model."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(repo, "setup.py")):
        pytest.skip("not a source checkout")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
                           "sdist", "--dist-dir", str(tmp_path)], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (archive,) = tmp_path.glob("dnnrl-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = [os.path.relpath(os.path.join(d, f), repo).replace(os.sep, "/")
            for d, _, files in os.walk(os.path.join(repo, "csrc")) for f in files
            if not f.endswith((".o", ".so"))]
    assert any(p.endswith(".cuh") for p in csrc) and any(p.endswith(".h") for p in csrc)
    missing = [p for p in csrc if p not in names]
    for src in csrc:
        for inc in _quoted_includes(os.path.join(repo, src)):
            here = os.path.normpath(os.path.join(os.path.dirname(src), inc)).replace(os.sep, "/")
            if here not in names and "csrc/" + inc not in names:
                missing.append("%s (included by %s)" % (inc, src))
    package = [os.path.relpath(p, repo).replace(os.sep, "/")
               for sub in ("dnnrl_ext", os.path.join("python", "dnnrl"))
               for p in glob.glob(os.path.join(repo, sub, "*.py"))]
    assert package
    for required in ["setup.py", "pyproject.toml", "README.md", "LICENSE", "CMakeLists.txt",
                     "python/dnnrl/assets/dnnrl_fer2013.pt"] + package:
        if required not in names:
            missing.append(required)
    assert not missing, "the sdist lacks %s" % missing
