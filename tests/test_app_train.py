"""dnnrl.train / cli: end-to-end tiny runs, resume equivalence, CLI help."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st
import torch

from dnnrl.cli import main as cli_main
from dnnrl.config import resolve
from dnnrl.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(preset="cpu", image_size=32, width=0.125, batch_size=28, max_epochs=2, patience=5,
            synthetic_train_per_class=12, synthetic_val_per_class=4, synthetic_test_per_class=4,
            monitor_gallery=40, k_max=5, progress=False, eval_batch_size=64)


def _cfg(out, **kw):
    return resolve(dict(TINY, out=str(out), **kw))


@pytest.mark.parametrize("method", ["dnnrl", "tdnn", "dnn"])
def test_tiny_run_writes_results(tmp_path, method):
    res = train(_cfg(tmp_path / method, method=method))
    run = tmp_path / method
    for f in ("results.json", "config.json", "log.jsonl", "checkpoint.pt", "best.pt", "report.md",
              "confusion_test.png", "confusion_test.json", "confusion_val.json", "curves.png", "k_curve.png"):
        assert (run / f).exists(), f
    saved = json.load(open(run / "results.json"))
    assert set(("val_accuracy", "test_accuracy", "k")) <= set(saved)
    assert 0 <= saved["val_accuracy"] <= 1 and 0 <= saved["test_accuracy"] <= 1
    assert (saved["k"] is None) == (method == "dnn")
    assert json.load(open(run / "config.json"))["method"] == method
    lines = [json.loads(x) for x in open(run / "log.jsonl")]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert res["val_accuracy"] == saved["val_accuracy"]
    assert "![k curve](k_curve.png)" in open(run / "report.md").read()
    assert sorted(map(int, saved["val_accuracy_per_k"])) == list(range(1, 6))  # k_max 5


def test_resume_matches_uninterrupted(tmp_path):
    # on the CPU, where every run of the same config is bitwise the same (cuDNN's
    # algorithm choice and atomics make two GPU runs differ in the last bits)
    kw = dict(max_epochs=3, method="dnnrl", device="cpu")
    full = train(_cfg(tmp_path / "full", **kw))
    cfg = _cfg(tmp_path / "cut", **kw)
    assert train(cfg, stop_after=1) is None            # "interrupted" after epoch 1
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = train(_cfg(tmp_path / "cut", **kw), resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in a["history"]] == [r[key] for r in b["history"]], key
    assert full["val_accuracy"] == resumed["val_accuracy"] and full["k"] == resumed["k"]
    assert len(open(tmp_path / "cut" / "log.jsonl").readlines()) == 3


def _fake_val_losses(monkeypatch, losses):
    """Trainer.validate reports these validation losses, one per epoch, in order."""
    from dnnrl import train as train_mod
    losses = iter(losses)
    orig = train_mod.Trainer.validate

    def fake_validate(self):
        out = orig(self)
        out["val_loss"] = next(losses)
        return out
    monkeypatch.setattr(train_mod.Trainer, "validate", fake_validate)


def test_protocol_lr_drop_and_reload(tmp_path, monkeypatch):
    """A validation loss > 10 % above the best divides the lr by 10 and reloads the best."""
    _fake_val_losses(monkeypatch, [1.0, 1.2, 0.9, 0.95, 2.0, 2.0, 2.0])
    train(_cfg(tmp_path / "p", max_epochs=7, patience=3, lr=0.01, lr_min=0.0005, select_by="val_loss"))
    hist = [json.loads(x) for x in open(tmp_path / "p" / "log.jsonl")]
    assert [r["lr"] for r in hist] == [0.01, 0.01, 0.001, 0.001, 0.001, 0.0005]
    assert [r["event"] for r in hist] == ["best", "lr_drop_reload_best", "best", None,
                                          "lr_drop_reload_best", "lr_drop_reload_best"]
    assert len(hist) == 6  # 3 epochs without a new best after epoch 3 -> stop


def test_protocol_lr_drop_reloads_the_best_weights_and_resets_momentum(tmp_path, monkeypatch):
    """After the drop at epoch 2 the run continues from epoch 1's weights (best.pt), with
    a fresh optimiser (no momentum carried over from the rejected epoch)."""
    _fake_val_losses(monkeypatch, [1.0, 1.5])
    cfg = _cfg(tmp_path / "r", max_epochs=5, patience=3, lr=0.05, select_by="val_loss", device="cpu")
    assert train(cfg, stop_after=2) is None
    ck = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert [r["event"] for r in ck["history"]] == ["best", "lr_drop_reload_best"]
    assert best["epoch"] == 1
    for k, v in best["model"].items():
        assert torch.equal(ck["model"][k].cpu(), v), k
    assert ck["optimizer"]["state"] == {} and ck["lr"] == 0.005


def test_cli_help_each_command():
    import argparse
    from dnnrl.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = sorted(sub.choices)
    assert {"train", "eval", "embed", "predict", "export", "reproduce", "plot"} <= set(commands)
    for cmd in [["--help"]] + [[c, "--help"] for c in commands]:
        out = subprocess.run([sys.executable, "-m", "dnnrl"] + cmd, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                 [os.path.join(ROOT, "python"), ROOT, os.environ.get("PYTHONPATH", "")])))
        assert out.returncode == 0, out.stderr
        assert "usage: dnnrl" in out.stdout
        # argparse %-formats help strings a second time: a stray "%" leaks its action dict
        assert "option_strings" not in out.stdout and "%" not in out.stdout.replace("%%", "")
        if cmd == ["--help"]:  # the top-level usage (its lines up to the first blank one) names every subcommand
            usage = out.stdout.split("\n\n")[0]
            assert all(c in usage for c in commands), usage
    assert "--data" in out.stdout


def test_cli_train_eval_embed_on_csv(tmp_path, capsys):
    # a small CSV in the challenge format, drawn from the synthetic generator
    from dnnrl.synthetic import make_synthetic
    ds = make_synthetic(10, 4, 4, seed=3)
    path = tmp_path / "fer.csv"
    usage = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}
    with open(path, "w") as fh:
        fh.write("emotion, pixels, Usage\n")
        for s, (x, y) in ds.splits.items():
            for img, lab in zip(x, y):
                fh.write('%d,"%s",%s\n' % (lab, " ".join(map(str, img.ravel())), usage[s]))
    run = tmp_path / "run"
    args = ["train", "--data", str(path), "--out", str(run), "--preset", "cpu", "--image-size", "32",
            "--width", "0.125", "--batch-size", "28", "--max-epochs", "1", "--no-progress",
            "--cache-dir", str(tmp_path / "cache"), "--monitor-gallery", "20", "--k-max", "5"]
    assert cli_main(args) == 0
    res = json.load(open(run / "results.json"))
    assert res["test_accuracy"] is not None and res["k"] >= 1
    assert cli_main(["eval", str(run), "--data", str(path), "--out", str(tmp_path / "ev"),
                     "--cache-dir", str(tmp_path / "cache"), "--k-max", "5"]) == 0
    ev = json.load(open(tmp_path / "ev" / "results.json"))
    assert ev["val_accuracy"] == res["val_accuracy"] and ev["k"] == res["k"]
    assert (tmp_path / "ev" / "confusion_test.png").exists()
    # a run directory is evaluated from its best.pt, with the run's own settings
    from dnnrl.runtime import resolve_backend
    saved = json.load(open(run / "config.json"))
    assert ev["checkpoint"] == str(run / "best.pt") and ev["tta"] == saved["tta"] and ev["amp"] == saved["amp"]
    assert ev["backend"] == resolve_backend("auto", torch.device("cpu")) and ev["device"] == "cpu"
    # the options override them: --tta flip (the averaging itself: test_flip_tta_averages_an_image_and_its_mirror)
    assert saved["tta"] != "flip"
    assert cli_main(["eval", str(run), "--data", str(path), "--out", str(tmp_path / "ev_tta"),
                     "--cache-dir", str(tmp_path / "cache"), "--k-max", "5", "--tta", "flip",
                     "--backend", "reference", "--amp", "bf16"]) == 0
    ev_tta = json.load(open(tmp_path / "ev_tta" / "results.json"))
    assert 0 <= ev_tta["val_accuracy"] <= 1
    assert (ev_tta["tta"], ev_tta["backend"], ev_tta["amp"]) == ("flip", "reference", "bf16")
    out = tmp_path / "emb.npz"
    assert cli_main(["embed", str(run / "best.pt"), "--data", str(path), "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    z = np.load(out)
    assert z["train_embeddings"].shape == (70, 512) and z["test_labels"].shape == (28,)
    np.testing.assert_allclose(np.linalg.norm(z["val_embeddings"], axis=1), 1, rtol=1e-4)
    # a .pt loads with torch.load's default (weights_only): the class names are plain str
    assert cli_main(["embed", str(run / "best.pt"), "--data", str(path), "--out", str(tmp_path / "emb.pt"),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    zt = torch.load(tmp_path / "emb.pt")
    assert zt["class_names"] == list(z["class_names"]) and type(zt["class_names"][0]) is str
    assert torch.equal(zt["val_embeddings"], torch.from_numpy(z["val_embeddings"]))
    # a checkpoint.pt holds the last weights and the best ones: embed (and eval) take the best
    st = torch.load(run / "checkpoint.pt", weights_only=False)
    assert st["best_state"] is not None
    st["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in st["model"].items()}  # last != best
    torch.save(st, tmp_path / "last_not_best.pt")
    assert cli_main(["embed", str(tmp_path / "last_not_best.pt"), "--data", str(path), "--out",
                     str(tmp_path / "emb2.npz"), "--cache-dir", str(tmp_path / "cache")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "emb2.npz")["val_embeddings"], z["val_embeddings"])


def test_select_by_val_knn_uses_the_monitor(tmp_path):
    train(_cfg(tmp_path / "k", select_by="val_knn", max_epochs=2))
    hist = [json.loads(x) for x in open(tmp_path / "k" / "log.jsonl")]
    for r in hist:
        assert r["protocol_metric"] == pytest.approx(1 - r["val_knn_accuracy"])


@pytest.mark.parametrize("method,key", [("dnn", "val_accuracy"), ("dnnrl", "val_knn_accuracy")])
def test_select_by_val_accuracy_scores_each_method_by_its_own_accuracy(tmp_path, method, key):
    """val_accuracy: the softmax head's error for dnn, the k-NN monitor's for the others;
    the best epoch is the one with the highest of that accuracy."""
    train(_cfg(tmp_path / method, method=method, select_by="val_accuracy", max_epochs=3))
    hist = [json.loads(x) for x in open(tmp_path / method / "log.jsonl")]
    for r in hist:
        assert r["protocol_metric"] == pytest.approx(1 - r[key])
    best = max(hist, key=lambda r: (r[key], -r["epoch"]))
    assert hist[-1]["best_epoch"] == best["epoch"]
    assert "val error" in open(tmp_path / method / "report.md").read()


def test_select_by_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="select_by must be one of"):
        _cfg(tmp_path / "x", select_by="val_acc")


def test_random_triplets_are_valid_and_resume_exactly(tmp_path):
    from dnnrl.train import random_triplets
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3 have no positive
    g = torch.Generator().manual_seed(0)
    a, p, n = random_triplets(y, g)
    assert a.tolist() == [0, 1, 2, 3, 4]
    assert bool((y[a] == y[p]).all()) and bool((a != p).all()) and bool((y[a] != y[n]).all())
    # the paper's literal sampling through the CLI option, interrupted and resumed
    kw = dict(max_epochs=2, method="dnnrl", mining="random_triplets", sampler="random", device="cpu")
    train(_cfg(tmp_path / "full", **kw))
    assert train(_cfg(tmp_path / "cut", **kw), stop_after=1) is None
    train(_cfg(tmp_path / "cut", **kw), resume=True)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    # the losses too: epoch 2 raises the validation loss here, so both runs reload epoch 1's
    # weights, and equal weights alone would not show that epoch 2 drew the same triplets
    for key in ("train_loss", "val_loss", "train_active_fraction"):
        assert [r[key] for r in a["history"]] == [r[key] for r in b["history"]], key
    assert 0.3 < a["history"][0]["train_active_fraction"] < 1.0  # random triplets: ~half satisfied


def test_init_from_starts_from_another_runs_best_weights(tmp_path):
    """--init-from: a triplet run starts from a softmax run's best weights (fine-tuning)."""
    from dnnrl.train import Trainer
    train(_cfg(tmp_path / "dnn", method="dnn"))
    best = torch.load(tmp_path / "dnn" / "best.pt", weights_only=False)
    src = best.get("best_state") or best["model"]
    for init in (tmp_path / "dnn", tmp_path / "dnn" / "best.pt"):  # a run dir or a file
        t = Trainer(_cfg(tmp_path / "ft", method="dnnrl", init_from=str(init)))
        for k, v in t.model.state_dict().items():
            torch.testing.assert_close(v, src[k], rtol=0, atol=0, msg=k)
    fresh = Trainer(_cfg(tmp_path / "fresh", method="dnnrl"))
    assert any(not torch.equal(v, src[k]) for k, v in fresh.model.state_dict().items())
    res = train(_cfg(tmp_path / "ft", method="dnnrl", init_from=str(tmp_path / "dnn")))
    assert json.load(open(tmp_path / "ft" / "config.json"))["init_from"] == str(tmp_path / "dnn")
    assert 0 <= res["val_accuracy"] <= 1


def test_sgd_is_torch_default_off_cuda(tmp_path):
    """The fused SGD kernel is for CUDA runs; elsewhere torch's default implementation."""
    from dnnrl.train import Trainer
    t = Trainer(_cfg(tmp_path / "cpu", method="dnn"))
    assert not t.optimizer.defaults.get("fused")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sgd_is_fused_on_cuda_and_after_a_resume(tmp_path):
    """CUDA runs step with fused SGD (one kernel per step), a resumed run too, and its
    update follows the default implementation's to rounding."""
    from dnnrl.train import Trainer
    cfg = _cfg(tmp_path / "gpu", method="dnn", device="cuda", max_epochs=1)
    train(cfg)
    t = Trainer(resolve(dict(TINY, out=str(tmp_path / "gpu"), method="dnn", device="cuda", max_epochs=2)),
                resume=True)
    assert t.optimizer.defaults.get("fused") and t.optimizer.param_groups[0]["fused"]
    params = [torch.randn(50, 7, device="cuda", requires_grad=True) for _ in range(2)]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    fused = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=2e-3, fused=True)
    plain = torch.optim.SGD(copies, lr=0.05, momentum=0.9, weight_decay=2e-3)
    for _ in range(5):
        for ps, opt in ((params, fused), (copies, plain)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in ps).backward()
            opt.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", [
    dict(method="dnnrl", mining="easy_positive", softmax_weight=1.0, reduction="mean", flip=True),  # the recipe
    dict(method="dnnrl", mining="batch_hard"),
    dict(method="tdnn", mining="semi_hard", sampler="random"),
    dict(method="dnnrl", mining="random_triplets"),
    dict(method="dnn"),
    dict(method="dnnrl", mining="easy_positive", softmax_weight=1.0, reduction="mean", cuda_graph="on"),
], ids=["recipe", "dnnrl_batch_hard", "tdnn_random_batches", "random_triplets", "dnn", "recipe_cuda_graph"])
def test_training_steps_make_no_host_sync_on_cuda(tmp_path, variant):
    """After the first steps (cuDNN's algorithm search, a graph capture) a training step,
    batch drawing included, queues its work without waiting for the card: a blocking
    host-to-device copy or a read-back raises under the sync debug mode. (Two such syncs
    per step, the P x K batch's copy and a torch.tensor(inf) in the easy-positive mining,
    held the host back until session 9.)"""
    from dnnrl.train import Trainer
    t = Trainer(_cfg(tmp_path / "run", device="cuda", batch_size=14, **variant))
    t.model.train()
    batches = t.sampler.epoch(t.sample_gen)
    for _ in range(3):  # warm-up: cuDNN's benchmark mode and a graph capture synchronise
        t.train_step(next(batches))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss, _act = t.train_step(next(batches))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    if variant.get("cuda_graph") == "on":
        assert t._graph.replays >= 3


def test_init_from_errors_name_the_option(tmp_path):
    from dnnrl.train import Trainer
    with pytest.raises(FileNotFoundError, match="--init-from"):
        Trainer(_cfg(tmp_path / "a", init_from=str(tmp_path / "missing")))
    train(_cfg(tmp_path / "dnn", method="dnn", max_epochs=1))
    with pytest.raises(ValueError, match="--init-from.*another shape"):
        Trainer(_cfg(tmp_path / "b", width=0.25, init_from=str(tmp_path / "dnn")))


@given(B=st.integers(0, 40), C=st.integers(1, 5), D=st.integers(1, 6), seed=st.integers(0, 2 ** 31),
       grid=st.booleans())
def test_easy_positive_triplets_match_a_loop(B, C, D, seed, grid):
    """Nearest positive / nearest negative per anchor (ties: smaller index), by brute force."""
    from dnnrl.train import easy_positive_triplets
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    if grid:  # small integers: exact distances with many ties
        x = torch.randint(-2, 3, (B, D), generator=g).float()
    y = torch.randint(0, C, (B,), generator=g)
    a, p, n = easy_positive_triplets(x, y)
    want = []
    d = ((x[:, None, :].double() - x[None, :, :].double()) ** 2).sum(-1)
    for i in range(B):
        pos = [j for j in range(B) if j != i and y[j] == y[i]]
        neg = [j for j in range(B) if y[j] != y[i]]
        if pos and neg:
            want.append((i, min(pos, key=lambda j: (d[i, j], j)), min(neg, key=lambda j: (d[i, j], j))))
    got = list(zip(a.tolist(), p.tolist(), n.tolist()))
    if grid:
        assert got == want
    else:  # continuous: compare the chosen distances (float32 vs float64 near-ties)
        assert [t[0] for t in got] == [t[0] for t in want]
        for (i, pg, ng), (_, pw, nw) in zip(got, want):
            assert abs(d[i, pg] - d[i, pw]) < 1e-4 and abs(d[i, ng] - d[i, nw]) < 1e-4


def test_easy_positive_triplets_by_hand():
    """Points on a line: 0 (class 0), 1 (class 0), 3 (class 1), 7 (class 0), 4 (class 1),
    and a lone class-2 point at 20. Anchor 0's nearest positive is 1 (not the farthest,
    7), its nearest negative 3; anchor 4's nearest negatives 1 and 7 tie (distance 3)
    and the smaller index wins; the class-2 point has no positive and is dropped."""
    from dnnrl.train import easy_positive_triplets
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [4.0], [20.0]])
    y = torch.tensor([0, 0, 1, 0, 1, 2])
    a, p, n = easy_positive_triplets(x, y)
    assert a.tolist() == [0, 1, 2, 3, 4]
    assert p.tolist() == [1, 0, 4, 1, 2]
    assert n.tolist() == [2, 2, 1, 4, 1]
    # one class only: no anchor has a negative, so no triplet at all
    a, p, n = easy_positive_triplets(x[:2], y[:2])
    assert a.numel() == p.numel() == n.numel() == 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_the_apps_easy_positive_loss_is_the_ops_easy_positive_mining(backend):
    """The app's easy-positive criterion (mining in Python + the indexed op) and the
    library's mining="easy_positive" (mined inside the op) choose the same triplets on
    tie-free inputs and give the same loss, details and gradient."""
    import dnnrl_ext
    from dnnrl.train import ExplicitTripletLoss
    if backend == "auto" and not dnnrl_ext.kernels_available("cpu"):
        pytest.skip("compiled CPU kernels not built")
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(96, 16, generator=g), dim=1)
    y = torch.randint(0, 7, (96,), generator=g)
    kw = dict(alpha=0.2, gamma=-0.3, reduction="mean")
    app = ExplicitTripletLoss("exp", margin=0.2, backend=backend, mining="easy_positive", **kw)
    outs, grads = [], []
    for fn in (lambda e: app(e, y, return_details=True),
               lambda e: dnnrl_ext.triplet_loss(e, y, mining="easy_positive", backend=backend,
                                                return_details=True, **kw)):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf)
        out.loss.backward()
        outs.append(out)
        grads.append(leaf.grad)
    (a, b), (ga, gb) = outs, grads
    assert torch.equal(a.pos, b.pos) and torch.equal(a.neg, b.neg) and torch.equal(a.valid, b.valid)
    assert a.valid.sum() == 96
    torch.testing.assert_close(a.r, b.r, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mining", ["easy_positive", "random_triplets", "batch_hard", "semi_hard"])
@pytest.mark.parametrize("method", ["dnnrl", "tdnn"])
def test_each_method_trains_its_own_loss(method, mining):
    """DNNRL trains the exponential triplet loss, T-DNN the hinge, under every mining
    (the explicit-triplet minings are built in Python, the others by the op)."""
    import dnnrl_ext
    from dnnrl.config import Config
    from dnnrl.train import easy_positive_triplets, make_criterion, random_triplets
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64)
    y = torch.arange(24) % 4
    cfg = Config(method=method, mining=mining, alpha=0.5, gamma=-0.3, margin=0.7, reduction="sum")
    got = make_criterion(cfg, "reference", generator=torch.Generator().manual_seed(1))(x, y)
    kind = "exp" if method == "dnnrl" else "hinge"
    kw = dict(loss=kind, alpha=0.5, gamma=-0.3 if kind == "exp" else 0.0, margin=0.7, reduction="sum",
              backend="reference")
    if mining in ("easy_positive", "random_triplets"):
        a, p, n = (easy_positive_triplets(x, y) if mining == "easy_positive"
                   else random_triplets(y, torch.Generator().manual_seed(1)))

        def loss_of(**k):
            return dnnrl_ext.triplet_loss_from_triplets(x, a, p, n, **k)
    else:
        def loss_of(**k):
            return dnnrl_ext.triplet_loss(x, y, mining=mining, **k)
    torch.testing.assert_close(got, loss_of(**kw))
    assert not torch.allclose(got, loss_of(**dict(kw, loss="hinge" if kind == "exp" else "exp", gamma=-0.3)))


@pytest.mark.parametrize("in_python", ["0", "1"])
def test_easy_positive_mining_trains(tmp_path, monkeypatch, in_python):
    """The recipe's mining trains with its triplets mined by the op (the default) or formed
    in Python (DNNRL_EASY_POSITIVE_IN_PYTHON=1), and results.json says which."""
    monkeypatch.setenv("DNNRL_EASY_POSITIVE_IN_PYTHON", in_python)
    res = train(_cfg(tmp_path / "ep", method="dnnrl", mining="easy_positive"))
    hist = [json.loads(x) for x in open(tmp_path / "ep" / "log.jsonl")]
    assert all(0 <= h["train_active_fraction"] <= 1 for h in hist)
    assert 0 <= res["val_accuracy"] <= 1
    assert res["training"]["triplets_formed_by"] == ("python" if in_python == "1" else "op")
    from dnnrl.train import ExplicitTripletLoss
    with pytest.raises(ValueError, match="mining"):
        ExplicitTripletLoss("exp", 0.2, 0.0, 0.2, "sum", "reference", mining="hardest")


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_softmax_weight_trains_the_head_only_when_asked(tmp_path, weight):
    """--softmax-weight W: triplet loss + W x cross-entropy of the head (joint training);
    with W = 0 the head gets no gradient (the paper's pure triplet loss)."""
    from dnnrl.train import Trainer
    cfg = _cfg(tmp_path / str(weight), method="dnnrl", softmax_weight=weight, max_epochs=1)
    head0 = Trainer(cfg).model.head.weight.detach().clone()  # same seed: the run's initial head
    train(cfg)
    head1 = torch.load(tmp_path / str(weight) / "checkpoint.pt", weights_only=False)["model"]["head.weight"]
    assert torch.equal(head0, head1) == (weight == 0.0)
    with pytest.raises(ValueError, match="softmax_weight"):
        Trainer(_cfg(tmp_path / "bad", method="dnnrl", softmax_weight=-1.0))


def test_label_smoothing_applies_to_training_steps_only(tmp_path):
    """--label-smoothing eps: the head's training cross-entropy is torch's smoothed one; the
    validation loss (the protocol's metric) stays unsmoothed; bad values name the option."""
    import torch.nn.functional as F
    from dnnrl.train import Trainer
    tr = Trainer(_cfg(tmp_path / "ls", method="dnn", label_smoothing=0.2, max_epochs=1))
    logits = torch.randn(9, 7, generator=torch.Generator().manual_seed(0))
    y = torch.arange(9) % 7
    tr.model.train()
    torch.testing.assert_close(tr._cross_entropy(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2))
    assert not torch.allclose(tr._cross_entropy(logits, y), F.cross_entropy(logits, y))
    tr.model.eval()
    torch.testing.assert_close(tr._cross_entropy(logits, y), F.cross_entropy(logits, y))
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            _cfg(tmp_path / "bad", label_smoothing=bad)


@pytest.mark.parametrize("method", ["dnnrl", "dnn"])
def test_erase_and_label_smoothing_train(tmp_path, method):
    """A run with random erasing and label smoothing trains and evaluates; both reach the
    augmentation and config.json."""
    from dnnrl.train import augment_config
    cfg = _cfg(tmp_path / method, method=method, erase=0.5, label_smoothing=0.1, softmax_weight=1.0)
    assert augment_config(cfg).erase_prob == 0.5
    res = train(cfg)
    assert 0 <= res["val_accuracy"] <= 1
    saved = json.load(open(tmp_path / method / "config.json"))
    assert saved["erase"] == 0.5 and saved["label_smoothing"] == 0.1
    for bad in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="erase must be a probability"):
            _cfg(tmp_path / "bad", erase=bad)


def test_every_train_option_reaches_the_config(tmp_path):
    """Each `dnnrl train` option whose name is a Config field lands in config.json
    (the new options once did not: the CLI kept a hand-written list)."""
    from dnnrl.cli import build_parser
    from dnnrl.config import Config
    train_parser = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train_parser._actions}
    fields = {f.name for f in dataclasses.fields(Config)}
    for name in ("init_from", "softmax_weight", "mining", "gamma", "width", "tta"):
        assert name in dests & fields, name
    run = tmp_path / "cli"
    argv = ["train", "--out", str(run), "--image-size", "32", "--width", "0.125", "--batch-size", "28",
            "--max-epochs", "1", "--monitor-gallery", "40", "--k-max", "5", "--no-progress",
            "--train-subset", "140", "--val-subset", "56",
            "--softmax-weight", "0.5", "--mining", "easy_positive", "--reduction", "mean"]
    assert cli_main(argv) == 0
    saved = json.load(open(run / "config.json"))
    assert (saved["softmax_weight"], saved["mining"], saved["reduction"]) == (0.5, "easy_positive", "mean")


def test_cli_reports_bad_option_values_in_one_line(tmp_path, capsys):
    assert cli_main(["train", "--out", str(tmp_path / "x"), "--softmax-weight", "-1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "softmax_weight must be >= 0" in err and "Traceback" not in err
    assert cli_main(["train", "--out", str(tmp_path / "y"), "--init-from", str(tmp_path / "nope")]) == 2
    assert "--init-from" in capsys.readouterr().err


def test_flip_tta_averages_an_image_and_its_mirror():
    import torch.nn.functional as F
    from dnnrl.model import DNNRLNet
    from dnnrl.runtime import embed
    from dnnrl.transforms import AugmentConfig
    torch.manual_seed(0)
    model = DNNRLNet(width=0.125)
    imgs = torch.randint(0, 256, (5, 48, 48), dtype=torch.uint8)
    plain = AugmentConfig(out_size=32)
    tta = dataclasses.replace(plain, tta_flip=True)
    cpu = torch.device("cpu")
    want = F.normalize(embed(model, imgs, plain, cpu) + embed(model, imgs.flip(-1), plain, cpu), dim=1)
    torch.testing.assert_close(embed(model, imgs, tta, cpu), want)
    want_logits = (embed(model, imgs, plain, cpu, head=True) + embed(model, imgs.flip(-1), plain, cpu, head=True)) / 2
    torch.testing.assert_close(embed(model, imgs, tta, cpu, head=True), want_logits)
    sym = torch.cat([imgs[:, :, :24], imgs[:, :, :24].flip(-1)], -1)  # mirror-symmetric images
    torch.testing.assert_close(embed(model, sym, tta, cpu), embed(model, sym, plain, cpu), atol=1e-5, rtol=0)
    assert not torch.allclose(embed(model, imgs, tta, cpu), embed(model, imgs, plain, cpu))
    with pytest.raises(ValueError, match="tta"):
        _cfg("unused", tta="five-crop")


def test_shifted_view_is_the_image_moved_by_that_many_pixels():
    from dnnrl.transforms import AugmentConfig, evaluate_transform
    imgs = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    cfg = AugmentConfig(out_size=108)
    base = evaluate_transform(imgs, cfg)
    right_down = evaluate_transform(imgs, cfg, shift=(4.0, 4.0))
    torch.testing.assert_close(right_down[..., 4:, 4:], base[..., :-4, :-4], atol=1e-4, rtol=0)
    half = AugmentConfig(out_size=54)  # shifts are in 108-px units: 2 px at half size
    torch.testing.assert_close(evaluate_transform(imgs, half, shift=(-4.0, 0.0))[..., :, :-2],
                               evaluate_transform(imgs, half)[..., :, 2:], atol=1e-4, rtol=0)


def test_crops_tta_averages_ten_views():
    import torch.nn.functional as F
    from dnnrl.model import DNNRLNet
    from dnnrl.runtime import embed
    from dnnrl.train import TTA_CROP_SHIFT, augment_config
    from dnnrl.transforms import AugmentConfig, evaluate_transform
    aug = augment_config(_cfg("unused", tta="crops", image_size=32))
    assert aug.tta_flip and aug.tta_shift == TTA_CROP_SHIFT == 4.0
    torch.manual_seed(0)
    model = DNNRLNet(width=0.125).eval()
    imgs = torch.randint(0, 256, (4, 48, 48), dtype=torch.uint8)
    views = []
    for sh in [(0, 0), (-4, -4), (4, -4), (-4, 4), (4, 4)]:
        x = evaluate_transform(imgs, AugmentConfig(out_size=32), shift=sh)
        views += [x, x.flip(-1)]
    with torch.no_grad():
        want = F.normalize(sum(model(v) for v in views), dim=1)
        want_logits = sum(model.logits(v) for v in views) / 10
    cpu = torch.device("cpu")
    torch.testing.assert_close(embed(model, imgs, aug, cpu), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embed(model, imgs, aug, cpu, head=True), want_logits, atol=1e-5, rtol=1e-5)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    from dnnrl import distributed
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda m, mode="default": (seen.update(mode=mode), m)[1])
    ctx = distributed.DistContext()  # one process
    model = torch.nn.Linear(2, 2)
    distributed.wrap_model(model, ctx, uses_head=False, compile=True, compile_mode="reduce-overhead")
    assert seen["mode"] == "reduce-overhead"
    with pytest.raises(ValueError, match="compile_mode"):
        _cfg("unused", compile_mode="fastest")


@pytest.mark.parametrize("mining", ["random_triplets", "easy_positive"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss", ["exp", "hinge"])
def test_explicit_triplet_loss_equals_the_dropped_anchor_form(mining, reduction, loss):
    """The sync-free masked form equals the loss and gradient over the kept triplets."""
    import dnnrl_ext
    from dnnrl.train import ExplicitTripletLoss, easy_positive_triplets, random_triplets
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0] * 10 + [1] * 10 + [2] * 9 + [3])  # class 3: no positive
    crit = ExplicitTripletLoss(loss, 0.5, -0.5, 0.3, reduction, "reference",
                               generator=torch.Generator().manual_seed(1), mining=mining)
    x1 = x.clone().requires_grad_(True)
    out = crit(x1, y, return_details=True)
    out.loss.backward()
    a, p, n = (random_triplets(y, torch.Generator().manual_seed(1)) if mining == "random_triplets"
               else easy_positive_triplets(x, y))
    assert a.tolist() == list(range(29))
    x2 = x.clone().requires_grad_(True)
    want = dnnrl_ext.triplet_loss_from_triplets(x2, a, p, n, loss=loss, alpha=0.5, gamma=-0.5, margin=0.3,
                                                reduction=reduction, backend="reference")
    want.backward()
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert out.valid.tolist() == [True] * 29 + [False]
    assert out.pos[29] == -1 and out.neg[29] == -1 and out.r[29] == 0
    assert torch.equal(out.pos[:29], p) and torch.equal(out.neg[:29], n)


def test_cosine_schedule_anneals_to_lr_min_without_reloads(tmp_path):
    import math
    train(_cfg(tmp_path / "c", max_epochs=4, patience=10, lr=0.01, lr_min=0.001, schedule="cosine"))
    hist = [json.loads(x) for x in open(tmp_path / "c" / "log.jsonl")]
    want = [0.001 + 0.5 * 0.009 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    np.testing.assert_allclose([r["lr"] for r in hist], want, rtol=1e-12)
    assert all(r["event"] in ("best", None) for r in hist)
    assert json.load(open(tmp_path / "c" / "results.json"))["training"]["schedule"] == "cosine"


def test_time_budget_stops_before_an_epoch_that_would_overrun(tmp_path, monkeypatch):
    """Epochs 'take' 10 s each (a fake clock): a 35 s budget runs 3 epochs, records why it
    stopped, and still evaluates; the cosine lr follows the budget, not max_epochs."""
    from dnnrl import train as train_mod
    clock = {"t": 0.0}
    orig_train_epoch = train_mod.Trainer.train_epoch

    def slow_epoch(self):
        clock["t"] += 10.0
        return orig_train_epoch(self)
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", slow_epoch)
    monkeypatch.setattr(train_mod.time, "time", lambda: clock["t"])
    res = train(_cfg(tmp_path / "b", max_epochs=50, patience=50, lr=0.01, lr_min=0.0, schedule="cosine",
                     time_budget=35.0))
    hist = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    assert [r["epoch_seconds"] for r in hist] == [10.0, 10.0, 10.0]
    np.testing.assert_allclose([r["lr"] for r in hist], [0.01, 0.005 * (1 + np.cos(np.pi * 10 / 35)),
                                                          0.005 * (1 + np.cos(np.pi * 20 / 35))])
    training = json.load(open(tmp_path / "b" / "results.json"))["training"]
    assert training["stopped_by"] == "time_budget" and training["epochs"] == 3
    assert res["val_accuracy"] is not None


def test_time_budget_leaves_the_warm_up_epoch_out_of_its_estimate(tmp_path, monkeypatch):
    """The first epoch carries the warm-up (on the H200 2-3x the next ones): a fake clock
    of 30 s, then 10 s per epoch, and a 65 s budget. After three epochs (50 s) the next one
    is estimated at 10 s, not at the mean 16.7 s, so a fourth runs (60 s) and no fifth."""
    from dnnrl import train as train_mod
    clock = {"t": 0.0, "n": 0}
    orig_train_epoch = train_mod.Trainer.train_epoch

    def timed_epoch(self):
        clock["t"] += 30.0 if clock["n"] == 0 else 10.0
        clock["n"] += 1
        return orig_train_epoch(self)
    monkeypatch.setattr(train_mod.Trainer, "train_epoch", timed_epoch)
    monkeypatch.setattr(train_mod.time, "time", lambda: clock["t"])
    train(_cfg(tmp_path / "w", max_epochs=50, patience=50, schedule="cosine", time_budget=65.0))
    hist = [json.loads(x) for x in open(tmp_path / "w" / "log.jsonl")]
    assert [r["epoch_seconds"] for r in hist] == [30.0, 10.0, 10.0, 10.0]
    assert json.load(open(tmp_path / "w" / "results.json"))["training"]["stopped_by"] == "time_budget"


def test_schedule_and_budget_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="schedule must be one of"):
        _cfg(tmp_path / "x", schedule="linear")
    with pytest.raises(ValueError, match="time_budget must be a positive"):
        _cfg(tmp_path / "x", time_budget=0)


def test_late_cosine_keeps_the_plateau_protocol_then_anneals(tmp_path, monkeypatch):
    """late_cosine, 8 epochs, anneal_fraction 0.25: epochs 1-6 follow the plateau protocol
    (a rise of the val loss divides the lr by 10), epochs 7-8 a cosine from the lr reached
    to lr_min; a resumed run continues the same way."""
    import math
    from dnnrl import train as train_mod
    orig = train_mod.Trainer.validate

    def fake_validate(self):
        out = orig(self)
        out["val_loss"] = [1.0, 1.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4][self.epoch]
        return out
    monkeypatch.setattr(train_mod.Trainer, "validate", fake_validate)
    kw = dict(max_epochs=8, patience=10, lr=0.01, lr_min=0.0001, schedule="late_cosine", anneal_fraction=0.25,
              select_by="val_loss")
    train(_cfg(tmp_path / "a", **kw))
    hist = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    tail = [0.0001 + 0.5 * (0.001 - 0.0001) * (1 + math.cos(math.pi * q)) for q in (0.0, 0.5)]
    np.testing.assert_allclose([r["lr"] for r in hist], [0.01, 0.01, 0.001, 0.001, 0.001, 0.001] + tail)
    assert hist[1]["event"] == "lr_drop_reload_best"
    assert train(_cfg(tmp_path / "b", **kw), stop_after=7) is None
    train(_cfg(tmp_path / "b", **kw), resume=True)
    again = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    np.testing.assert_allclose([r["lr"] for r in again], [r["lr"] for r in hist])
    with pytest.raises(ValueError, match="anneal_fraction"):
        _cfg(tmp_path / "x", anneal_fraction=0)


def test_monitor_uses_flip_views_only_under_crops_tta(tmp_path, monkeypatch):
    from dnnrl import train as train_mod
    seen = []
    orig = train_mod.embed

    def spy(model, images, aug, *a, **kw):
        seen.append((aug.tta_flip, aug.tta_shift))
        return orig(model, images, aug, *a, **kw)
    monkeypatch.setattr(train_mod, "embed", spy)
    trainer = train_mod.Trainer(_cfg(tmp_path / "m", tta="crops", max_epochs=1))
    trainer._monitor_knn()
    assert seen and all(s == (True, 0.0) for s in seen)
    assert trainer.aug.tta_shift == 4.0  # the final evaluation keeps the 10 views


def test_monitor_scores_the_best_k_up_to_20(tmp_path):
    """The per-epoch k-NN monitor: validation accuracy of the vote over the fixed gallery
    subset, at the best k in 1..min(20, gallery), the same number a KNNClassifier fitted
    on those embeddings reports. Seeds where k = 1 is not the best, so that k = 1 alone
    could not pass."""
    from dnnrl import train as train_mod
    from dnnrl_ext import KNNClassifier
    checked = 0
    for seed in range(6):
        trainer = train_mod.Trainer(_cfg(tmp_path / str(seed), seed=seed, max_epochs=1))
        aug = dataclasses.replace(trainer.aug, tta_shift=0.0)
        xg = trainer.data["train"][0][trainer._monitor_idx]
        yg = trainer.data["train"][1][trainer._monitor_idx]
        g = train_mod.embed(trainer.model, xg, aug, trainer.device)
        q = train_mod.embed(trainer.model, trainer.data["val"][0], aug, trainer.device)
        clf = KNNClassifier(num_classes=len(trainer.class_names), backend="reference")
        clf.fit(g, yg, val=(q, trainer.data["val"][1]), k_max=min(20, g.shape[0]))
        per_k = clf.val_accuracy_per_k
        assert trainer._monitor_knn() == pytest.approx(max(per_k.values()), abs=1e-9)
        checked += per_k[1] < max(per_k.values())
    assert checked, "k = 1 was the best k for every seed: the test cannot tell"


def test_cli_resume_keeps_the_run_length_and_writes_where_resumed(tmp_path):
    """`dnnrl train --out DIR --resume` with no other option: the saved max_epochs rules
    (the CLI's preset default must not replace it), and a run directory moved since its
    first epochs is continued in place, not in the directory it was created in."""
    import shutil
    first = tmp_path / "first"
    cfg = _cfg(first, max_epochs=3)
    assert train(cfg, stop_after=1) is None
    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))
    argv = ["train", "--out", str(moved), "--resume", "--no-progress"]
    assert cli_main(argv) == 0
    assert not first.exists()
    hist = [json.loads(x) for x in open(moved / "log.jsonl")]
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    saved = json.load(open(moved / "config.json"))
    assert saved["max_epochs"] == 3 and saved["out"] == str(moved)
    assert (moved / "results.json").exists()
    # an explicit --max-epochs extends the run
    assert cli_main(argv + ["--max-epochs", "4"]) == 0
    assert [json.loads(x)["epoch"] for x in open(moved / "log.jsonl")] == [1, 2, 3, 4]


def test_cli_resume_names_the_options_it_ignores_and_takes_the_machine_ones(tmp_path):
    """Options that would change what the run computes are not applied on --resume, and a
    warning names those given with a new value (before: dropped silently); the device,
    backend and the like of the machine it resumes on are applied."""
    run = tmp_path / "run"
    assert train(_cfg(run, max_epochs=2, lr=0.01), stop_after=1) is None
    argv = ["train", "--out", str(run), "--resume", "--no-progress", "--lr", "0.5", "--batch-size", "28",
            "--device", "cpu", "--backend", "reference", "--eval-batch-size", "32"]
    assert cli_main(argv) == 0
    log_text = open(run / "run.log").read()
    assert "ignoring the given lr (a resumed run may change only max_epochs" in log_text
    assert "batch_size" not in log_text.split("ignoring the given")[1].split("(")[0]  # same value: no warning
    saved = json.load(open(run / "config.json"))
    assert saved["lr"] == 0.01 and saved["backend"] == "reference" and saved["device"] == "cpu"
    assert saved["eval_batch_size"] == 32
    hist = [json.loads(x) for x in open(run / "log.jsonl")]
    assert [r["epoch"] for r in hist] == [1, 2] and hist[1]["lr"] <= 0.01  # not the given 0.5


def test_a_fresh_run_does_not_replace_an_unfinished_one(tmp_path, capsys):
    """The same command without --resume over an interrupted run stops with one line that
    names --resume and --overwrite (before: its first epoch replaced the checkpoint, and
    the interrupted run's progress was lost); a finished run may be rerun in place."""
    run = tmp_path / "run"
    assert train(_cfg(run, max_epochs=2), stop_after=1) is None
    before = (run / "checkpoint.pt").read_bytes()
    argv = ["train", "--out", str(run), "--no-progress", "--max-epochs", "2"]
    assert cli_main(argv) == 2
    assert "holds an unfinished run (checkpoint.pt, no results.json): --resume" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before
    with pytest.raises(ValueError, match="--overwrite starts over"):
        train(_cfg(run, max_epochs=2))
    assert train(_cfg(run, max_epochs=2), overwrite=True) is not None  # starts over: a fresh log
    assert [json.loads(x)["epoch"] for x in open(run / "log.jsonl")] == [1, 2]
    assert train(_cfg(run, max_epochs=1)) is not None  # a finished run: rerun in place


def test_cli_resume_from_a_damaged_checkpoint_names_the_file(tmp_path, capsys):
    """A checkpoint.pt that is not one (overwritten, truncated by a full disk) ends
    `dnnrl train --resume` with one line naming the file, not an unpickling traceback;
    so do --init-from and `dnnrl eval` on such a file."""
    run = tmp_path / "run"
    assert train(_cfg(run, max_epochs=3), stop_after=1) is None
    good = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt is not a dnnrl checkpoint" in err and "Traceback" not in err
    import torch as _torch
    _torch.save({"model": {}}, run / "checkpoint.pt")  # a torch file without the training state
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 2
    assert "no optimizer / rng / history in it" in capsys.readouterr().err
    (run / "best.pt").write_bytes(b"\x00" * 64)
    assert cli_main(["eval", str(run / "best.pt"), "--device", "cpu"]) == 2
    assert "best.pt is not a dnnrl checkpoint" in capsys.readouterr().err
    assert cli_main(["train", "--out", str(tmp_path / "new"), "--init-from", str(run / "best.pt"),
                     "--preset", "cpu", "--max-epochs", "1", "--no-progress"]) == 2
    assert "best.pt is not a dnnrl checkpoint" in capsys.readouterr().err


def test_resume_without_a_checkpoint_stops_before_reading_data(tmp_path, capsys, monkeypatch):
    """--resume into a directory with no checkpoint.pt says so before any data is read (it
    was found only after the data had loaded)."""
    import dnnrl.train

    def no_data(*a, **k):
        raise AssertionError("data read before the checkpoint was checked")
    monkeypatch.setattr(dnnrl.train, "load_data", no_data)
    assert cli_main(["train", "--out", str(tmp_path / "none"), "--resume", "--no-progress"]) == 2
    assert "--resume: no checkpoint at %s" % (tmp_path / "none" / "checkpoint.pt") in capsys.readouterr().err


def test_ctrl_c_says_how_to_go_on(tmp_path, capsys, monkeypatch):
    """Ctrl-C during `dnnrl train` ends with one line (exit 130) that names the checkpoint
    and the --resume command, not an 85-line KeyboardInterrupt traceback."""
    import dnnrl.train

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(dnnrl.train, "train", interrupted)
    run = tmp_path / "run"
    assert cli_main(["train", "--out", str(run), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "dnnrl train: interrupted; no epoch had finished, so there is no checkpoint to resume from"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    assert cli_main(["train", "--out", str(run), "--no-progress"]) == 130
    assert "`dnnrl train --out %s --resume` continues from it" % run in capsys.readouterr().err
    monkeypatch.setenv("DNNRL_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        cli_main(["train", "--out", str(run), "--no-progress"])


def test_options_a_run_ignores_are_named(tmp_path, capsys, monkeypatch):
    """An option given on the command line that the method ignores (--margin for dnnrl,
    --compile-mode without --compile, ...) is named in a warning, not dropped in silence."""
    import dnnrl.train
    from dnnrl.config import ignored_options
    monkeypatch.setattr(dnnrl.train, "train", lambda *a, **k: None)
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--method", "dnnrl", "--margin", "0.5", "--alpha", "0.3",
                     "--compile-mode", "max-autotune", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "dnnrl train: warning: --margin has no effect here: margin is the hinge loss's (method tdnn)" in err
    assert "--compile-mode has no effect here" in err and "--alpha" not in err
    assert cli_main(["train", "--out", str(tmp_path / "r"), "--method", "dnn", "--mining", "semi_hard",
                     "--softmax-weight", "1", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--mining has no effect here" in err and "--softmax-weight has no effect here" in err
    cfg = _cfg(tmp_path, method="tdnn", softmax_weight=0.0)
    assert [n for n, _ in ignored_options(cfg, ["alpha", "margin", "label_smoothing", "gamma"])] == [
        "alpha", "label_smoothing"]
    assert ignored_options(_cfg(tmp_path, method="tdnn", softmax_weight=1.0), ["label_smoothing", "margin"]) == []


def test_the_start_of_run_line_names_the_methods_own_loss_settings(tmp_path):
    for method, want, absent in (("dnnrl", "exp triplet loss: mining", "margin"),
                                 ("tdnn", "hinge triplet loss: mining", "alpha"),
                                 ("dnn", "softmax loss", "mining")):
        run = tmp_path / method
        train(_cfg(run, method=method, max_epochs=1), stop_after=1)
        line = [x for x in open(run / "run.log") if "method %s, device" % method in x][0]
        assert want in line and absent not in line, line


def test_selection_metric_names_what_a_run_selects_by(tmp_path):
    """The k-NN monitor's metrics need the monitor: --monitor-gallery 0 (and dnn for
    val_knn) select by the val loss; the run warns, and a resume logs the right name."""
    from dnnrl.train import selection_metric
    assert selection_metric(_cfg(tmp_path, select_by="val_knn")) == "val_knn"
    assert selection_metric(_cfg(tmp_path, select_by="val_knn", monitor_gallery=0)) == "val_loss"
    assert selection_metric(_cfg(tmp_path, select_by="val_knn", method="dnn")) == "val_loss"
    assert selection_metric(_cfg(tmp_path, select_by="val_accuracy", method="dnn", monitor_gallery=0)) \
        == "val_accuracy"
    assert selection_metric(_cfg(tmp_path, select_by="val_accuracy", monitor_gallery=0)) == "val_loss"
    run = tmp_path / "run"
    assert train(_cfg(run, select_by="val_knn", max_epochs=2), stop_after=1) is None
    assert cli_main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert "best val k-NN error" in open(run / "run.log").read()
    run0 = tmp_path / "run0"
    assert train(_cfg(run0, select_by="val_knn", monitor_gallery=0, max_epochs=1)) is not None
    assert "--monitor-gallery 0 turns off: this run selects its best epoch" in open(run0 / "run.log").read()


def test_results_record_the_device_and_seconds_per_phase(tmp_path):
    """results.json: the device's name and the seconds of every phase, the training and
    validation ones summed over all epochs (also across a resume)."""
    from dnnrl.runtime import device_name
    cfg = _cfg(tmp_path / "ph", max_epochs=3, method="dnnrl", device="cpu")
    assert train(cfg, stop_after=1) is None
    train(_cfg(tmp_path / "ph", max_epochs=3, method="dnnrl", device="cpu"), resume=True)
    tr = json.load(open(tmp_path / "ph" / "results.json"))["training"]
    log = [json.loads(x) for x in open(tmp_path / "ph" / "log.jsonl")]
    ph = tr["phases"]
    assert list(ph) == ["setup_s", "train_s", "validate_s", "evaluate_s", "total_s"]
    assert ph["train_s"] == pytest.approx(sum(r["train_seconds"] for r in log))
    assert ph["validate_s"] == pytest.approx(sum(r["epoch_seconds"] - r["train_seconds"] for r in log))
    assert all(v > 0 for v in ph.values())
    assert ph["total_s"] == pytest.approx(ph["setup_s"] + ph["train_s"] + ph["validate_s"] + ph["evaluate_s"])
    assert tr["device_name"] == device_name(torch.device("cpu"))
    report = open(tmp_path / "ph" / "report.md").read()
    assert "Seconds per phase (total = their sum" in report and "): setup %.1f" % ph["setup_s"] in report
    assert "evaluate %.1f" % ph["evaluate_s"] in report


@pytest.mark.parametrize("mode, expected", [("on", True), ("off", False), ("auto", False)])
def test_cudnn_benchmark_follows_the_option(tmp_path, monkeypatch, mode, expected):
    """--cudnn-benchmark sets cuDNN's algorithm search for the run ("auto": on CUDA only;
    these runs are on the CPU)."""
    from dnnrl.train import Trainer
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not expected)  # restored afterwards
    Trainer(_cfg(tmp_path / mode, cudnn_benchmark=mode, device="cpu"))
    assert torch.backends.cudnn.benchmark is expected


def test_cudnn_benchmark_option_is_checked():
    with pytest.raises(ValueError, match="cudnn_benchmark must be one of"):
        resolve(dict(TINY, out="x", cudnn_benchmark="yes"))
    from dnnrl.runtime import use_cudnn_benchmark
    assert use_cudnn_benchmark("auto", torch.device("cuda")) and not use_cudnn_benchmark("auto", torch.device("cpu"))


@pytest.mark.parametrize("method", ["dnnrl", "tdnn"])
def test_easy_positive_is_mined_by_the_op_unless_asked(monkeypatch, method):
    """mining="easy_positive" builds the library's loss module (mined inside the op);
    DNNRL_EASY_POSITIVE_IN_PYTHON=1 the Python-formed triplets; random_triplets is always
    formed in Python; a value other than 0 / 1 is an error naming the variable. Both forms
    give the same loss and gradient."""
    import dnnrl_ext
    from dnnrl.config import Config
    from dnnrl.train import ExplicitTripletLoss, make_criterion
    cfg = Config(method=method, mining="easy_positive", alpha=0.5, gamma=-0.3, margin=0.7, reduction="sum")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (40,), generator=g)
    values, grads = [], []
    for env, kind in (("0", dnnrl_ext.ExpTripletLoss if method == "dnnrl" else dnnrl_ext.TripletLoss),
                      ("", dnnrl_ext.ExpTripletLoss if method == "dnnrl" else dnnrl_ext.TripletLoss),
                      ("1", ExplicitTripletLoss)):
        monkeypatch.setenv("DNNRL_EASY_POSITIVE_IN_PYTHON", env)
        crit = make_criterion(cfg, "reference")
        assert type(crit) is kind
        assert isinstance(make_criterion(dataclasses.replace(cfg, mining="random_triplets"), "reference"),
                          ExplicitTripletLoss)
        leaf = x.clone().requires_grad_(True)
        loss = crit(leaf, y)
        loss.backward()
        values.append(loss)
        grads.append(leaf.grad)
    torch.testing.assert_close(values[0], values[2])
    torch.testing.assert_close(grads[0], grads[2])
    assert grads[0].abs().sum() > 0
    monkeypatch.setenv("DNNRL_EASY_POSITIVE_IN_PYTHON", "yes")
    with pytest.raises(ValueError, match="DNNRL_EASY_POSITIVE_IN_PYTHON"):
        make_criterion(cfg, "reference")
