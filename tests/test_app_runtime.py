"""dnnrl.runtime: which backend a run gets when the compiled kernels cannot serve its device;
a data set without a validation split, or with fewer training images than a batch; the
stratified subsets; the autocast and memory-format modes."""
import json
import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch

import dnnrl_ext
from dnnrl import runtime


@pytest.fixture
def no_kernels(monkeypatch):
    """The extension as a machine without a build would see it."""
    monkeypatch.setattr(dnnrl_ext, "extension_available", lambda: False)
    monkeypatch.setattr(dnnrl_ext, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(runtime, "_warned_backend", False)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_without_kernels_auto_falls_back_to_the_reference_and_warns_once(no_kernels):
    # a handler of our own: the "dnnrl" logger does not propagate once a run set up logging
    seen = _Records()
    runtime.log.addHandler(seen)
    try:
        cpu = torch.device("cpu")
        assert runtime.resolve_backend("auto", cpu) == "reference"
        assert runtime.resolve_backend("auto", cpu) == "reference"
    finally:
        runtime.log.removeHandler(seen)
    warnings = [r for r in seen.records if "reference backend" in r.getMessage()]
    assert len(warnings) == 1 and "unavailable on cpu" in warnings[0].getMessage()


def test_without_kernels_compiled_is_an_error_naming_the_device(no_kernels):
    with pytest.raises(dnnrl_ext.ExtensionNotAvailable, match="backend='compiled'.*cpu"):
        runtime.resolve_backend("compiled", torch.device("cpu"))


def test_reference_is_always_granted_and_cuda_needs_cuda_kernels(monkeypatch):
    monkeypatch.setattr(dnnrl_ext, "extension_available", lambda: True)
    monkeypatch.setattr(dnnrl_ext, "has_cuda_kernels", lambda: False)  # a CPU-only build
    monkeypatch.setattr(runtime, "_warned_backend", True)
    assert runtime.resolve_backend("reference", torch.device("cpu")) == "reference"
    assert runtime.resolve_backend("auto", torch.device("cpu")) == "auto"
    assert runtime.resolve_backend("auto", torch.device("cuda")) == "reference"
    with pytest.raises(dnnrl_ext.ExtensionNotAvailable, match="cuda"):
        runtime.resolve_backend("compiled", torch.device("cuda"))


# --------------------------------------------------------------------------- no validation split
def _dataset(counts, with_val=False):
    from dnnrl.data import Dataset
    y = np.concatenate([np.full(n, c, dtype=np.int64) for c, n in enumerate(counts)])
    x = np.arange(y.size, dtype=np.uint8)[:, None, None].repeat(4, 1).repeat(4, 2)  # image i holds i
    splits = {"train": (x, y), "test": (x[:3], y[:3])}
    if with_val:
        splits["val"] = (x[:2], y[:2])
    return Dataset(splits=splits, class_names=["c%d" % c for c in range(len(counts))])


def test_carve_validation_takes_a_tenth_of_each_class_and_no_image_twice():
    ds = _dataset([50, 20, 1, 2])
    moved = runtime.carve_validation(ds)
    (xt, yt), (xv, yv) = ds.splits["train"], ds.splits["val"]
    assert moved == yv.size == 5 + 2 + 0 + 1
    assert np.bincount(yv, minlength=4).tolist() == [5, 2, 0, 1]
    assert np.bincount(yt, minlength=4).tolist() == [45, 18, 1, 1]  # a lone image stays in training
    ids = np.concatenate([xt[:, 0, 0], xv[:, 0, 0]])
    assert sorted(ids.tolist()) == list(range(73))  # a partition of the training images
    again = _dataset([50, 20, 1, 2])
    runtime.carve_validation(again)
    assert np.array_equal(again.splits["val"][0], xv)  # fixed: the same images every time


def test_carve_validation_leaves_a_validation_split_alone_and_needs_two_images_of_a_class():
    ds = _dataset([10, 10], with_val=True)
    assert runtime.carve_validation(ds) == 0 and ds.splits["train"][1].size == 20
    with pytest.raises(ValueError, match="no class has two training images"):
        runtime.carve_validation(_dataset([1, 1, 1]))


def test_an_empty_validation_split_is_carved_like_a_missing_one():
    ds = _dataset([50, 20])
    ds.splits["val"] = (ds.splits["train"][0][:0], ds.splits["train"][1][:0])  # e.g. an empty val/ folder
    assert runtime.carve_validation(ds) == 7 and ds.splits["val"][1].size == 7


def test_subsets_keep_the_class_proportions_and_follow_the_seed(monkeypatch):
    """--train-subset / --val-subset: a stratified draw (each class in its share, at least
    one image), sorted back into the data's order, and a different draw for another seed."""
    from dnnrl.config import Config
    monkeypatch.setattr(runtime, "load_dataset", lambda *a, **k: _dataset([150, 30, 15, 5], with_val=True))

    def subset(seed, n=80):
        return runtime.load_data(Config(data="fake.csv", train_subset=n, seed=seed)).splits
    a, b = subset(0), subset(1)
    (xa, ya), (xb, yb) = a["train"], b["train"]
    assert np.bincount(ya).tolist() == [60, 12, 6, 2]  # 80 * (150, 30, 15, 5) / 200
    ids = xa[:, 0, 0].astype(int)
    assert np.all(np.diff(ids) > 0)  # in the data's order, no image twice
    assert not np.array_equal(xa, xb) and np.bincount(yb).tolist() == [60, 12, 6, 2]
    assert np.array_equal(subset(0)["train"][0], xa)  # the same seed draws the same images
    # exactly 10 (rounding each class alone gave 8 + 2 + 1 + 1 = 12), at least one of each class
    assert np.bincount(subset(0, n=10)["train"][1]).tolist() == [7, 1, 1, 1]
    assert np.bincount(subset(0, n=81)["train"][1]).tolist() == [61, 12, 6, 2]  # the largest remainder rounds up


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 300), min_size=1, max_size=8), frac=st.floats(0.0, 1.0), seed=st.integers(0, 9))
def test_stratified_subsets_have_exactly_the_size_asked(counts, frac, seed):
    """n images, not n give or take the rounding of each class (--val-subset 350 gave 349);
    more only where a class's share is under one image and it still gets one."""
    y = np.repeat(np.arange(len(counts)), counts)
    n = 1 + int(frac * (y.size - 2)) if y.size > 1 else 1
    idx = runtime._stratified(y, n, np.random.default_rng(seed))
    got = np.bincount(y[idx], minlength=len(counts))
    assert len(np.unique(idx)) == idx.size and (got >= 1).all() and (got <= counts).all()
    share = n * np.array(counts) / y.size
    assert np.all(np.abs(got - share) < 1 + (share < 1))  # each class within one image of its share
    if (share >= 1).all():
        assert idx.size == n
    else:
        assert n <= idx.size < n + len(counts)


def test_channels_last_and_cudnn_benchmark_modes():
    """"auto": channels_last on CUDA and on the CPU (faster on both, measured), cuDNN's
    benchmark on CUDA only; "on" / "off" / a bool as given."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no card
    assert [runtime.use_channels_last(m, cpu) for m in ("auto", "on", "off", True, False)] == [
        True, True, False, True, False]
    assert runtime.use_channels_last("auto", cuda) and not runtime.use_channels_last("auto", torch.device("meta"))
    assert [runtime.use_cudnn_benchmark(m, cpu) for m in ("auto", "on", "off")] == [False, True, False]
    assert [runtime.use_cudnn_benchmark(m, cuda) for m in ("auto", "on", "off")] == [True, True, False]


def test_training_without_a_validation_split_carves_one(tmp_path):
    """A train/ + test/ folder pair (no val): the run steers by a carved validation split
    (before: the val loss was NaN every epoch and the protocol never saw a best), and 22
    training images with --batch-size 128 give one batch of 22 a step (before: none)."""
    from PIL import Image
    from dnnrl.config import resolve
    from dnnrl.train import train
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for c in ("happy", "sad"):
            d = tmp_path / "data" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(d / ("%d.png" % i))
    cfg = resolve(dict(data=str(tmp_path / "data"), out=str(tmp_path / "run"), preset="cpu", image_size=32,
                       width=0.125, max_epochs=2, batch_size=128, progress=False, method="dnn",
                       cache_dir=str(tmp_path / "cache")))
    seen = _Records()
    logging.getLogger("dnnrl").addHandler(seen)
    try:
        res = train(cfg)
    finally:
        logging.getLogger("dnnrl").removeHandler(seen)
    text = "\n".join(r.getMessage() for r in seen.records)
    assert "no validation split: 2 of its training images" in text
    assert "fewer than one batch of 128 (--batch-size): batches of 22" in text
    assert res["val_accuracy"] is not None and res["test_accuracy"] is not None
    hist = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert all(math.isfinite(r["val_loss"]) for r in hist) and all(r["steps"] == 1 for r in hist)
    # `dnnrl eval` of the run carves the same split, so it scores the same images
    from dnnrl.cli import main
    assert main(["eval", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ev"),
                 "--cache-dir", str(tmp_path / "cache"), "--k-max", str(cfg.k_max)]) == 0
    again = json.load(open(tmp_path / "ev" / "results.json"))
    assert (again["val_accuracy"], again["test_accuracy"]) == (res["val_accuracy"], res["test_accuracy"])


def test_a_training_split_of_one_image_is_an_error(tmp_path, monkeypatch):
    import dnnrl.train as T
    from dnnrl.config import resolve

    def one_training_image(cfg, need_val=False):
        ds = _dataset([1, 3], with_val=True)
        ds.splits["train"] = (ds.splits["train"][0][:1], ds.splits["train"][1][:1])
        return ds
    monkeypatch.setattr(T, "load_data", one_training_image)
    cfg = resolve(dict(out=str(tmp_path / "run"), preset="cpu", image_size=32, width=0.125, progress=False))
    with pytest.raises(ValueError, match="training split has 1 image"):
        T.Trainer(cfg)


def test_amp_modes_autocast_where_asked():
    """--amp: "auto" is bf16 autocast on CUDA only, "bf16" on every device, "off" never.
    The truth table, and what it does to embeddings on the CPU: "auto" gives the float32
    result bit for bit, "bf16" a different one (bf16 rounding) that still agrees to ~1e-2."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no card
    assert [runtime.amp_enabled(m, cpu) for m in ("auto", "bf16", "off")] == [False, True, False]
    assert [runtime.amp_enabled(m, cuda) for m in ("auto", "bf16", "off")] == [True, True, False]

    from dnnrl.model import DNNRLNet
    from dnnrl.transforms import AugmentConfig
    torch.manual_seed(0)
    model = DNNRLNet(num_classes=7, width=0.125).eval()
    images = torch.randint(0, 256, (6, 48, 48), dtype=torch.uint8)
    aug = AugmentConfig(out_size=48)
    off, auto, bf16 = (runtime.embed(model, images, aug, cpu, amp=m) for m in ("off", "auto", "bf16"))
    assert off.dtype == auto.dtype == bf16.dtype == torch.float32
    assert torch.equal(auto, off)
    assert not torch.equal(bf16, off)
    torch.testing.assert_close(bf16, off, atol=3e-2, rtol=0)
