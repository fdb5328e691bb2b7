"""Bad options of the application: every one stops with an error that names it, before
any data is read, instead of a torch traceback minutes later or a run that silently
trains on a changed value (found by running each command with out-of-range values)."""
import dataclasses
import math
import os

import pytest
import torch

from dnnrl import bundle as B
from dnnrl import runtime
from dnnrl.cli import build_parser, main
from dnnrl.config import CHOICES, RANGES, Config, resolve, validate
from dnnrl.data import CLASS_NAMES
from dnnrl.model import DNNRLNet
from dnnrl.predict import Predictor
from dnnrl.train import save_model, train

TINY = dict(preset="cpu", image_size=32, width=0.125, batch_size=28, max_epochs=1, patience=5,
            synthetic_train_per_class=12, synthetic_val_per_class=4, synthetic_test_per_class=4,
            monitor_gallery=40, k_max=5, progress=False, eval_batch_size=64)

# fields a run reads as free text or a switch, with nothing to range-check
FREE_FORM = {"data", "out", "preset", "init_from", "flip", "skip_bad", "cache_dir", "device", "compile",
             "progress"}

BAD_VALUES = {
    "image_size": [0, 3, 15, 48.0], "width": [0, -1.0, math.nan, math.inf], "embed_dim": [0, -2],
    "dropout": [-0.1, 1.0, 1.5], "erase": [-0.5, 1.5, math.nan], "batch_size": [-5, 0, 1, True],
    "alpha": [math.inf, math.nan, 0, -1.0], "gamma": [math.nan, -math.inf], "margin": [math.nan],
    "softmax_weight": [-1.0, math.nan, math.inf], "label_smoothing": [-0.1, 1.0],
    "lr": [0, -1.0, math.nan, math.inf], "lr_min": [-1e-4, math.nan], "momentum": [-0.1, 1.0],
    "weight_decay": [-1.0, math.inf], "anneal_fraction": [0, 2.0], "rise_threshold": [-0.1, math.nan],
    "patience": [0, -1], "max_epochs": [0, -1, 2.5], "time_budget": [0, -3.0, math.nan],
    "epoch_batches": [0, -1], "train_subset": [0, -1], "val_subset": [0, -1], "k_max": [0],
    "monitor_gallery": [-1], "synthetic_train_per_class": [0], "synthetic_val_per_class": [0],
    "synthetic_test_per_class": [-1], "seed": [-1, 1.5], "log_every": [0, -1], "eval_batch_size": [0, -1],
}


def test_every_config_field_is_checked_or_declared_free_form():
    """A new numeric option cannot slip in unchecked: each field is a choice, a range or free text."""
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields == set(CHOICES) | set(RANGES) | FREE_FORM
    assert not set(CHOICES) & set(RANGES)
    assert set(BAD_VALUES) == set(RANGES)


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in BAD_VALUES.items() for v in vs])
def test_out_of_range_value_names_the_field(tmp_path, name, value):
    with pytest.raises(ValueError, match="^%s must be" % name):
        resolve(dict(TINY, out=str(tmp_path), **{name: value}))


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_unknown_choice_names_the_field(tmp_path, name):
    with pytest.raises(ValueError, match="^%s must be one of" % name):
        resolve(dict(TINY, out=str(tmp_path), **{name: "bogus"}))


def test_boundary_values_are_accepted(tmp_path):
    cfg = resolve(dict(TINY, out=str(tmp_path), image_size=16, batch_size=2, dropout=0.0, erase=1.0,
                       momentum=0.0, lr_min=0.0, anneal_fraction=1.0, patience=1, monitor_gallery=0,
                       epoch_batches=1, train_subset=1, val_subset=1, seed=0, gamma=-1.0, margin=-0.5,
                       lr=1, width=0.01))
    assert validate(cfg) is cfg
    assert validate(Config()) is not None  # the defaults themselves


def test_preset_follows_the_data_unless_given(tmp_path):
    """No data: the synthetic demo's "cpu" preset; data: the paper's. An explicit preset
    wins over that choice, an explicit option over the preset, and an unknown preset is
    named."""
    out = str(tmp_path)
    demo, paper = resolve(dict(out=out)), resolve(dict(out=out, data="fer.csv"))
    assert (demo.preset, paper.preset) == ("cpu", "paper")
    assert (demo.image_size, demo.lr, demo.select_by) == (48, 0.001, "val_knn")
    assert (paper.image_size, paper.lr, paper.select_by) == (Config().image_size, Config().lr, Config().select_by)
    assert resolve(dict(out=out, data="fer.csv", preset="cpu")).image_size == 48
    assert resolve(dict(out=out, preset="cpu", lr=0.05, image_size=None)).lr == 0.05
    with pytest.raises(ValueError, match="^preset must be one of"):
        resolve(dict(out=out, preset="fast"))


def test_lr_floor_above_the_lr(tmp_path):
    with pytest.raises(ValueError, match=r"lr_min \(0.5\) must not exceed lr \(0.1\)"):
        resolve(dict(TINY, out=str(tmp_path), lr=0.1, lr_min=0.5))


def test_api_config_and_resume_override_are_checked_before_training(tmp_path):
    """train() checks a Config built by hand (no resolve) and a resumed run's overrides."""
    cfg = resolve(dict(TINY, out=str(tmp_path / "run")))
    bad = dataclasses.replace(cfg, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be"):
        train(bad)
    assert not os.path.exists(bad.out)  # failed before writing anything
    train(cfg, stop_after=1)
    with pytest.raises(ValueError, match="max_epochs must be"):
        train(dataclasses.replace(cfg, max_epochs=0), resume=True)


def test_cli_train_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--batch-size", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "batch_size must be an integer >= 2, got 0" in err and "Traceback" not in err


# --------------------------------------------------------------------------- device
@pytest.mark.parametrize("name", ["bogus", "gpu", "cuda:x"])
def test_device_name_torch_cannot_parse(name):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got %r" % name):
        runtime.pick_device(name)


def test_cuda_device_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU here"):
        runtime.pick_device("cuda")
    assert runtime.pick_device("auto").type == "cpu"


def test_cuda_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert runtime.pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 CUDA GPU"):
        runtime.pick_device("cuda:2")


# --------------------------------------------------------------------------- other commands
@pytest.mark.parametrize("argv,where", [
    (["predict", "x.png", "--k", "0"], "--k"),
    (["predict", "x.png", "--k", "two"], "--k"),
    (["predict", "x.png", "--every", "0"], "--every"),
    (["predict", "x.png", "--batch-size", "0"], "--batch-size"),
    (["predict", "x.png", "--margin", "nan"], "--margin"),
    (["predict", "x.png", "--margin", "-0.5"], "--margin"),
    (["predict", "x.png", "--max-side", "0"], "--max-side"),
    (["predict", "x.png", "--min-neighbors", "-1"], "--min-neighbors"),
    (["predict", "x.png", "--threads", "0"], "--threads"),
    (["predict", "x.png", "--output", "out.xlsx"], "--output"),
    (["export", "--checkpoint", "r", "--data", "d", "--out", "o.pt", "--gallery-per-class", "0"],
     "--gallery-per-class"),
    (["export", "--checkpoint", "r", "--data", "d", "--out", "o.pt", "--k-max", "0"], "--k-max"),
    (["export", "--checkpoint", "r", "--data", "d", "--out", "o.pt", "--batch-size", "0"], "--batch-size"),
    (["eval", "run", "--k-max", "-3"], "--k-max"),
    (["eval", "run", "--eval-batch-size", "0"], "--eval-batch-size"),
    (["embed", "run", "--out", "emb.txt"], "--out"),
    (["train", "--eval-batch-size", "-1"], "--eval-batch-size"),
])
def test_option_out_of_range_stops_at_parse_time(argv, where, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "argument %s: expected" % where in capsys.readouterr().err


def test_annotate_into_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "x.png", "--annotate", str(f)])
    assert "exists and is not a directory" in capsys.readouterr().err
    assert build_parser().parse_args(["predict", "x.png", "--annotate", str(tmp_path / "new")]).annotate


def test_good_values_parse():
    a = build_parser().parse_args(["predict", "x.png", "--k", "1", "--margin", "-0.2", "--min-neighbors", "0",
                                   "--output", "r.CSV"])
    assert (a.k, a.margin, a.min_neighbors, a.output) == (1, -0.2, 0, "r.CSV")
    assert build_parser().parse_args(["embed", "run", "--out", "e.pt"]).out == "e.pt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_options") / "run"
    cfg = Config(image_size=32, width=0.125, embed_dim=24, method="dnnrl", preset="cpu", out=str(out))
    os.makedirs(cfg.out)
    save_model(os.path.join(cfg.out, "best.pt"), DNNRLNet(7, width=cfg.width, embed_dim=24), cfg,
               list(CLASS_NAMES), {"epoch": 1, "val_loss": 1.0})
    return cfg.out


@pytest.mark.parametrize("kw,match", [
    (dict(gallery_dim=25), r"gallery_dim must be an integer in \[1, 24\]"),
    (dict(gallery_dim=0), "gallery_dim must be"),
    (dict(gallery_dim="half"), "gallery_dim must be"),
    (dict(sweep_dims=(8, 0, 30)), "sweep_dims must be integers in .* got 0, 30"),
    (dict(gallery_per_class=0), "gallery_per_class must be"),
])
def test_bundle_dims_are_checked_before_any_data_is_read(checkpoint, kw, match):
    # the data path does not exist: the dims must fail first, not after minutes of embedding
    with pytest.raises(B.BundleError, match=match):
        B.build_bundle(checkpoint, "/nonexistent/data", device="cpu", **kw)


@pytest.mark.parametrize("kw", [dict(k=0), dict(k=-1), dict(k=2.5), dict(batch_size=0), dict(batch_size=True)])
def test_predictor_rejects_k_and_batch_size_below_one(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match="%s must be an integer >= 1" % name):
        Predictor(None, detect=False, device="cpu", **kw)


def test_eval_of_a_softmax_model_on_other_classes_is_an_error(tmp_path, capsys):
    """A dnn model's head scores only its own classes: on a cat/dog folder `dnnrl eval`
    stops with one line (before: a reshape traceback in the confusion matrix); a k-NN
    model takes its gallery from the data, so it is scored, with a warning."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        folder = tmp_path / "animals" / c
        folder.mkdir(parents=True)
        for i in range(10):
            Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(folder / ("%d.png" % i))
    argv = ["--data", str(tmp_path / "animals"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    for method in ("dnn", "dnnrl"):
        assert train(resolve(dict(TINY, out=str(tmp_path / method), method=method))) is not None
    assert main(["eval", str(tmp_path / "dnn"), "--out", str(tmp_path / "e1"), *argv]) == 2
    assert "differ from the model's" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "dnnrl"), "--out", str(tmp_path / "e2"), *argv]) == 0
