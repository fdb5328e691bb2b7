"""The scripts a GPU session runs still work with the code they call.

A GPU session is the scarcest thing this project has (15 minutes, one in five
sessions): a recipe option that the CLI renamed, a value that config.validate now
rejects, or a helper a benchmark script imports under an old name would cost a whole
call. These tests read the command lines out of benchmarks/gpu_session.sh itself and
check them the way `dnnrl reproduce`, `dnnrl train` and bench_train.py do, without
training anything; they check that every benchmarks/*.sh passes `bash -n` and that
every benchmarks/*.py imports and uses only names that exist.
"""
import dataclasses
import os
import re
import shlex

import pytest

from dnnrl.cli import build_parser
from dnnrl.config import Config, resolve
from dnnrl.reproduce import _PASSTHROUGH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = open(os.path.join(ROOT, "benchmarks", "gpu_session.sh")).read()


def _default(var: str, env: str) -> str:
    """The default of ``VAR=${ENV:-"..."}`` in the script."""
    m = re.search(r'%s=\$\{%s:-"([^"]*)"\}' % (var, env), SCRIPT)
    assert m, "%s's default not found in gpu_session.sh" % var
    return m.group(1)


RECIPE = shlex.split(_default("FLAGS", "FER_FLAGS"))
GRAPH = ["--cuda-graph", "on"]                 # what the CUDA-graph probe may add
REFERENCE = ["--backend", "reference"]         # what a failed smoke check adds
ARCHIVE = "fer2013.tar.xz"


def test_the_script_passes_the_switches_these_tests_add():
    assert 'print("--cuda-graph on")' in SCRIPT and 'BACKEND_FLAG="--backend reference"' in SCRIPT
    assert "$FLAGS $BACKEND_FLAG $GRAPH_FLAG" in SCRIPT  # reproduce
    assert "$EXTRA_FLAGS $BACKEND_FLAG $GRAPH_FLAG" in SCRIPT  # the extra run


@pytest.mark.parametrize("extra", [[], GRAPH, REFERENCE], ids=["eager", "graph", "reference"])
def test_reproduce_recipe_parses_and_validates_for_every_method(extra):
    argv = ["reproduce", "--data", ARCHIVE, "--out", "runs/t2", "--jobs", "3", "--no-progress",
            "--time-budget", "290"] + RECIPE + extra
    args = build_parser().parse_args(argv)
    for method in ("dnn", "tdnn", "dnnrl"):
        overrides = {k: getattr(args, k, None) for k in _PASSTHROUGH}
        overrides.update(method=method, out="runs/t2/" + method)
        cfg = resolve(overrides)  # raises on a value config.validate rejects
        assert cfg.schedule == "cosine" and cfg.time_budget == 290 and cfg.select_by == "val_accuracy"
        assert cfg.flip and cfg.tta == "crops" and cfg.mining == "easy_positive"
        assert (cfg.lr, cfg.weight_decay) == (0.05, 0.002)
        assert cfg.cuda_graph == ("on" if extra == GRAPH else "off")


def _train_config(argv):
    args = build_parser().parse_args(["train"] + argv)
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    return resolve(over)


@pytest.mark.parametrize("add, check", [
    ("--erase 0.5", lambda c: c.erase == 0.5),                       # the planned erase run
    ("--erase 0.5 --label-smoothing 0.1", lambda c: c.erase == 0.5 and c.label_smoothing == 0.1),
])
def test_extra_run_with_added_options(add, check):
    cfg = _train_config(["--method", "dnnrl", "--data", ARCHIVE, "--out", "x", "--overwrite", "--no-progress",
                         "--time-budget", "290"] + RECIPE + shlex.split(add) + GRAPH)
    assert cfg.method == "dnnrl" and check(cfg)


def test_default_extra_run_is_dnn_at_weight_decay_1e3():
    m = re.search(r'EXTRA_FLAGS=\$\{EXTRA_FLAGS:-"--method dnn \$\{FLAGS/--weight-decay 0.002/'
                  r'--weight-decay 0.001\}"\}', SCRIPT)
    assert m, "the default extra run's line changed: update this test"
    flags = [f if f != "0.002" else "0.001" for f in RECIPE]
    assert "0.001" in flags
    cfg = _train_config(["--method", "dnn", "--data", ARCHIVE, "--out", "x"] + flags)
    assert cfg.weight_decay == 0.001


def test_a_renamed_option_would_fail_here():
    """The check can fail: an option the CLI does not know stops argparse."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "--data", ARCHIVE, "--out", "x", "--no-such-option", "1"])
    with pytest.raises(ValueError):
        resolve({"data": ARCHIVE, "lr": -1.0})


def _command_lines(command: str):
    """The arguments of each ``command ...`` line of the script, continuation lines
    joined, shell variables replaced by what they hold on a GPU machine."""
    joined = SCRIPT.replace("\\\n", " ")
    lines = re.findall(re.escape(command) + r" ([^\n]*)", joined)
    subs = {'"$FER_ARCHIVE"': ARCHIVE, "$graphs_timed": "off,on", "$BACKEND_FLAG": "",
            "${TRAIN_BENCH_FLAGS:-}": "", "${GALLERY_DIM:-auto}": "auto"}
    out = []
    for line in lines:
        for k, v in subs.items():
            line = line.replace(k, v)
        line = re.sub(r'"\$WORK/([^"]*)"', r"/tmp/\1", line)
        line = re.sub(r'--note "[^"]*"', "--note NOTE", line)  # free text (shell variables inside)
        line = re.split(r"\s+>", line)[0]  # up to the redirection
        assert "$" not in line, "a shell variable this test does not know: " + line
        out.append(shlex.split(line))
    return out


def test_export_command_line_parses():
    lines = _command_lines("python3 -m dnnrl export")
    assert len(lines) == 1
    args = build_parser().parse_args(["export"] + lines[0])
    assert args.sweep_dims == "64,96,128" and args.gallery_dim == "auto" and args.note == "NOTE"


def test_bench_train_command_lines_parse():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "benchmarks", "bench_train.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lines = _command_lines("python3 benchmarks/bench_train.py")
    assert len(lines) == 2  # the CUDA-graph probe and the solo throughput benchmark
    for argv in lines:
        args, train_argv = bench.parse(argv)
        assert args.cuda_graphs == ["off", "on"] and args.cudnn == ["on"]
        # what trainer_for hands to `dnnrl train`'s parser, checked as it would be
        cfg = _train_config(["--out", "x", "--method", "dnnrl", "--no-progress"] + bench.RECIPE + train_argv)
        assert cfg.data == ARCHIVE and cfg.mining == "easy_positive"


@pytest.mark.parametrize("script", sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".sh")))
def test_benchmark_shell_scripts_have_valid_syntax(script):
    import subprocess
    res = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_device_build_tells_the_tests_its_arch_list():
    """The device build compiles sm_90 only; the variable must stay exported, or the GPU
    tests (-k "cuda or build") would hold that build to the default list's PTX."""
    import subprocess
    common = os.path.join(ROOT, "benchmarks", "gpu_common.sh")
    # every command build_inplace runs is a no-op function here: no compiler starts
    probe = ('step() { :; }; timeout() { return 0; }; grep() { :; }; source "%s"; '
             'unset TORCH_CUDA_ARCH_LIST; build_inplace /dev/null; echo "list=$(printenv TORCH_CUDA_ARCH_LIST)"' % common)
    res = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.strip().endswith("list=9.0"), res.stdout + res.stderr


def _benchmark_scripts():
    return sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py"))


@pytest.mark.parametrize("script", _benchmark_scripts())
def test_benchmark_scripts_import(script, monkeypatch):
    """Every benchmarks/*.py compiles, and each one guarded by ``__main__`` imports: the
    names it takes from dnnrl, dnnrl_ext and its sibling modules still exist. Most of
    these scripts only run on a GPU machine, where an ImportError would cost the call."""
    import importlib.util
    import sys
    path = os.path.join(ROOT, "benchmarks", script)
    source = open(path).read()
    compile(source, path, "exec")
    if 'if __name__ == "__main__":' not in source:
        return  # a script without a guard runs on import; compiling it is what can be checked here
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    name = "_bench_" + script[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)
    spec.loader.exec_module(mod)
    # module.attribute uses of the modules it imported (common.time_cuda, dnnrl_ext.knn, ...):
    # an import does not check those, a renamed function would fail only when called
    import ast
    missing = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and isinstance(node.ctx, ast.Load):
            owner = getattr(mod, node.value.id, None)
            if isinstance(owner, type(sys)) and owner.__name__.split(".")[0] in _OURS:
                if not hasattr(owner, node.attr):
                    missing.append("%s.%s (line %d)" % (node.value.id, node.attr, node.lineno))
    assert not missing, "names these scripts use that no longer exist: " + ", ".join(missing)


# the modules whose names the check above follows (not torch's or numpy's)
_OURS = {"dnnrl", "dnnrl_ext", "common", "alternatives", "filter_path_model", "bench_train", "bench_gpu"}


def test_the_gpu_tests_leave_the_emulator_cases_to_ci():
    """test_cuda_*_paths.py run each test on "cuda" and on "emu" (the CPU emulator): the GPU
    session's pytest filter must keep only the former, or its minutes go to CPU emulation."""
    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    assert 'TEST_FILTER=${TEST_FILTER:-"(cuda or build) and not emu"}' in text
