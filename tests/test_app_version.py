"""`dnnrl --version`: the versions and what the compiled extension can run here, the first
lines a bug report needs."""
import subprocess
import sys

import pytest
import torch

import dnnrl
import dnnrl_ext
from dnnrl import cli


def test_version_runs_as_a_command_and_matches_this_build():
    proc = subprocess.run([sys.executable, "-m", "dnnrl", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("dnnrl %s, dnnrl_ext %s, torch %s;" % (dnnrl.__version__, dnnrl_ext.__version__,
                                                                   torch.__version__))
    if not dnnrl_ext.extension_available():
        assert "not loaded" in line
    elif dnnrl_ext.has_cuda_kernels():
        assert "CPU and CUDA kernels" in line
    else:
        assert "built without CUDA kernels" in line


def test_version_needs_no_subcommand_and_wins_over_one(capsys):
    for argv in (["--version"], ["--version", "train"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 0
        assert capsys.readouterr().out.strip() == cli.version_text()


@pytest.mark.parametrize("loaded, cuda_built, cuda_seen, usable, expected", [
    (False, False, False, False, "compiled kernels not loaded (reference ops only): boom"),
    (True, False, True, True, "CPU kernels (built without CUDA kernels)"),
    (True, True, False, False, "CPU and CUDA kernels (no CUDA device visible)"),
    (True, True, True, True, "CPU and CUDA kernels; Card X: usable"),
    (True, True, True, False, "CPU and CUDA kernels; Card X: too old for the CUDA kernels"),
])
def test_version_names_the_extension_state(monkeypatch, loaded, cuda_built, cuda_seen, usable, expected):
    monkeypatch.setattr(dnnrl_ext, "extension_available", lambda: loaded)
    monkeypatch.setattr(dnnrl_ext._extension, "_LOAD_ERROR", None if loaded else "boom")
    monkeypatch.setattr(dnnrl_ext, "has_cuda_kernels", lambda: cuda_built)
    monkeypatch.setattr(dnnrl_ext, "kernels_available", lambda device: usable)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_seen)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Card X")
    assert cli.version_text().endswith("; " + expected)
