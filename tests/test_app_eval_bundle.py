"""``dnnrl eval`` of a model bundle: the packaged model (or --bundle / a bundle file) is
scored on the val / test splits of --data with its own stored gallery and k.

The bundle is exported from a randomly initialised small network with a synthetic
gallery, so the accuracies are near chance; what is checked is that they are exactly
the accuracies of the bundle's own classifier, split by split.
"""
import json
import os

import numpy as np
import pytest
import torch

from dnnrl import bundle as B
from dnnrl.cli import main
from dnnrl.config import Config
from dnnrl.evaluate import evaluate_bundle
from dnnrl.model import DNNRLNet
from dnnrl.runtime import embed
from dnnrl.synthetic import make_synthetic
from dnnrl.train import augment_config, save_model

USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


def _write_csv(path, ds, splits=("train", "val", "test")):
    with open(path, "w") as fh:
        fh.write("emotion,pixels,Usage\n")
        for s in splits:
            x, y = ds.splits[s]
            for img, lab in zip(x, y):
                fh.write('%d,"%s",%s\n' % (lab, " ".join(map(str, img.ravel())), USAGE[s]))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(workdir, synthetic Dataset, CSV of it, {method: bundle path})."""
    wd = tmp_path_factory.mktemp("evalbundle")
    ds = make_synthetic(12, 5, 4, seed=7)
    csv = _write_csv(wd / "fer.csv", ds)
    bundles = {}
    for method in ("dnnrl", "dnn"):
        torch.manual_seed(1)
        cfg = Config(image_size=32, width=0.125, method=method, preset="cpu", tta="flip",
                     out=str(wd / ("run_" + method)))
        os.makedirs(cfg.out, exist_ok=True)
        save_model(os.path.join(cfg.out, "best.pt"), DNNRLNet(num_classes=7, width=cfg.width).eval(), cfg,
                   list(ds.class_names), {"epoch": 1, "val_loss": 1.0})
        bundles[method] = str(wd / ("%s.pt" % method))
        B.export_bundle(cfg.out, ds, bundles[method], k_max=7, gallery_dim=24, device="cpu")
    return wd, ds, csv, bundles


def _expected(bundle_path, ds, head=False, tta=None):
    """{split: accuracy} of the bundle's own classifier (or softmax head) on val / test
    (with its own test-time views, or ``tta``'s)."""
    model, clf, _, cfg, _ = B.load_bundle(bundle_path)
    cfg.tta = tta or cfg.tta
    out = {}
    for s in ("val", "test"):
        x, y = ds.splits[s]
        e = embed(model, torch.from_numpy(x), augment_config(cfg), torch.device("cpu"), amp="off", head=head)
        pred = e.argmax(1) if head else clf.predict(e)
        out[s] = float((pred == torch.from_numpy(y)).float().mean())
    return out, clf.k


def test_eval_bundle_file_scores_val_and_test_with_the_stored_gallery(setup):
    wd, ds, csv, bundles = setup
    out = wd / "ev_file"
    assert main(["eval", bundles["dnnrl"], "--data", csv, "--out", str(out),
                 "--cache-dir", str(wd / "cache"), "--device", "cpu"]) == 0
    res = json.load(open(out / "results.json"))
    want, k = _expected(bundles["dnnrl"], ds)
    assert res["k"] == k and res["sizes"] == {"val": 35, "test": 28}
    assert res["val_accuracy"] == pytest.approx(want["val"]) and res["test_accuracy"] == pytest.approx(want["test"])
    assert res["bundle_meta"]["gallery_dim"] == 24 and res["tta"] == "flip"
    assert (out / "confusion_val.png").exists() and (out / "confusion_test.json").exists()
    cm = json.load(open(out / "confusion_test.json"))["matrix"]
    assert np.trace(cm) / np.sum(cm) == pytest.approx(want["test"])
    # --bundle FILE is the same thing
    assert main(["eval", "--bundle", bundles["dnnrl"], "--data", csv, "--out", str(wd / "ev_opt"),
                 "--cache-dir", str(wd / "cache"), "--device", "cpu"]) == 0
    assert json.load(open(wd / "ev_opt" / "results.json"))["val_accuracy"] == res["val_accuracy"]
    # --tta overrides the bundle's views (flip here): one view, and the record says so
    assert main(["eval", bundles["dnnrl"], "--data", csv, "--out", str(wd / "ev_none"), "--tta", "none",
                 "--cache-dir", str(wd / "cache"), "--device", "cpu"]) == 0
    res_none = json.load(open(wd / "ev_none" / "results.json"))
    want_none, _ = _expected(bundles["dnnrl"], ds, tta="none")
    assert res_none["tta"] == "none" and res_none["val_accuracy"] == pytest.approx(want_none["val"])
    assert res_none["test_accuracy"] == pytest.approx(want_none["test"])


def test_eval_without_a_checkpoint_uses_the_packaged_model(setup, monkeypatch, capsys):
    wd, ds, csv, bundles = setup
    monkeypatch.setattr(B, "DEFAULT_BUNDLE", bundles["dnnrl"])
    monkeypatch.delenv("DNNRL_BUNDLE", raising=False)
    monkeypatch.chdir(wd)
    assert main(["eval", "--data", csv, "--cache-dir", str(wd / "cache"), "--device", "cpu"]) == 0
    res = json.load(open(wd / "runs" / "eval-dnnrl" / "results.json"))  # default --out
    want, _ = _expected(bundles["dnnrl"], ds)
    assert res["val_accuracy"] == pytest.approx(want["val"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["val_accuracy"] == res["val_accuracy"]
    # $DNNRL_BUNDLE overrides the packaged file
    monkeypatch.setattr(B, "DEFAULT_BUNDLE", str(wd / "absent.pt"))
    monkeypatch.setenv("DNNRL_BUNDLE", bundles["dnn"])
    assert main(["eval", "--data", csv, "--out", str(wd / "ev_env"), "--cache-dir", str(wd / "cache"),
                 "--device", "cpu"]) == 0
    assert json.load(open(wd / "ev_env" / "results.json"))["method"] == "dnn"


def test_eval_dnn_bundle_scores_its_knn_vote_and_reports_the_head(setup):
    """A bundle answers with its k-NN vote in dnnrl predict, so eval scores that for a dnn
    bundle too (it scored the softmax head before, with k None), the head alongside."""
    wd, ds, csv, bundles = setup
    assert main(["eval", bundles["dnn"], "--data", csv, "--out", str(wd / "ev_dnn"),
                 "--cache-dir", str(wd / "cache"), "--device", "cpu"]) == 0
    res = json.load(open(wd / "ev_dnn" / "results.json"))
    head, _ = _expected(bundles["dnn"], ds, head=True)
    knn, k = _expected(bundles["dnn"], ds)
    assert res["k"] == k
    assert res["val_accuracy"] == pytest.approx(knn["val"]) and res["test_accuracy"] == pytest.approx(knn["test"])
    assert res["head_val_accuracy"] == pytest.approx(head["val"])
    assert res["head_test_accuracy"] == pytest.approx(head["test"])
    assert "softmax head: val" in open(wd / "ev_dnn" / "report.md").read()


def test_eval_bundle_bad_input_is_clear(setup, monkeypatch, capsys):
    wd, ds, csv, bundles = setup
    assert main(["eval", bundles["dnnrl"], "--device", "cpu"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["eval", bundles["dnnrl"], "--bundle", bundles["dnn"], "--data", csv]) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.delenv("DNNRL_BUNDLE", raising=False)
    monkeypatch.setattr(B, "DEFAULT_BUNDLE", str(wd / "absent.pt"))
    assert main(["eval", "--data", csv]) == 2
    assert "no default model" in capsys.readouterr().err
    with pytest.raises(B.BundleError, match="--bundle FILE"):
        B.default_bundle_path()
    assert main(["eval", "--bundle", str(wd / "absent.pt"), "--data", csv]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("DNNRL_BUNDLE", str(wd / "nowhere.pt"))  # the override is named, not the packaged file
    assert main(["eval", "--data", csv]) == 2
    assert "$DNNRL_BUNDLE names %s, which does not exist" % (wd / "nowhere.pt") in capsys.readouterr().err
    monkeypatch.delenv("DNNRL_BUNDLE")
    # a directory is a training run, not a bundle
    assert main(["eval", str(wd), "--data", csv]) == 2
    assert "no best.pt" in capsys.readouterr().err


def test_export_from_a_missing_or_foreign_checkpoint_is_clear(setup, tmp_path):
    wd, ds, csv, bundles = setup
    with pytest.raises(B.BundleError, match="absent.pt does not exist"):
        B.export_bundle(str(tmp_path / "absent.pt"), ds, str(tmp_path / "out.pt"), device="cpu")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)  # a torch file, not a dnnrl run
    with pytest.raises(B.BundleError, match="foreign.pt is not a dnnrl checkpoint"):
        B.export_bundle(str(foreign), ds, str(tmp_path / "out.pt"), device="cpu")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(B.BundleError, match="garbage.pt is not a dnnrl checkpoint"):
        B.export_bundle(str(garbage), ds, str(tmp_path / "out.pt"), device="cpu")
    assert not (tmp_path / "out.pt").exists()
    assert not B.is_bundle_file(str(garbage)) and not B.is_bundle_file(str(tmp_path))
    assert B.is_bundle_file(bundles["dnn"])


def test_eval_bundle_on_data_without_val_or_test_scores_what_there_is(setup, tmp_path):
    wd, ds, _, bundles = setup
    csv = _write_csv(tmp_path / "train_only.csv", ds, splits=("train",))
    assert main(["eval", bundles["dnnrl"], "--data", csv, "--out", str(tmp_path / "ev"),
                 "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    res = json.load(open(tmp_path / "ev" / "results.json"))
    assert res["sizes"] == {"train": 84} and 0 <= res["train_accuracy"] <= 1
    assert res["val_accuracy"] is None and "| train |" in open(tmp_path / "ev" / "report.md").read()


def test_evaluate_bundle_empty_split(setup, tmp_path):
    wd, ds, _, bundles = setup
    model, clf, names, cfg, _ = B.load_bundle(bundles["dnnrl"])
    empty = {"val": (torch.zeros(0, 48, 48, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))}
    res = evaluate_bundle(model, clf, empty, names, augment_config(cfg), torch.device("cpu"), "dnnrl",
                          str(tmp_path), amp="off")
    assert res["val_accuracy"] is None and res["sizes"] == {"val": 0}


def test_export_tta_is_stored_and_used(setup, tmp_path):
    wd, ds, csv, bundles = setup
    path = str(tmp_path / "crops.pt")
    facts = B.export_bundle(str(wd / "run_dnnrl"), ds, path, k_max=7, gallery_dim=24, device="cpu", tta="crops")
    raw = torch.load(path, weights_only=False)
    assert raw["config"]["tta"] == "crops"
    # the gallery was embedded with the 10 views: the stored rows are the PCA of those
    model, clf, _, cfg, _ = B.load_bundle(path)
    x = torch.from_numpy(ds.splits["train"][0])
    e10 = embed(model, x, augment_config(cfg), torch.device("cpu"), amp="off")
    assert cfg.tta == "crops" and augment_config(cfg).tta_shift > 0
    assert torch.allclose(clf.project(e10), raw["gallery"].float(), atol=2e-2)
    assert clf.score(embed(model, torch.from_numpy(ds.splits["val"][0]), augment_config(cfg),
                           torch.device("cpu"), amp="off"), ds.splits["val"][1]) == pytest.approx(
        facts["val_accuracy"])
    with pytest.raises(B.BundleError, match="tta must be one of"):
        B.export_bundle(str(wd / "run_dnnrl"), ds, str(tmp_path / "bad.pt"), device="cpu", tta="ten")


def test_export_gallery_dim_auto_fills_the_ship_limit(setup, tmp_path, monkeypatch):
    wd, ds, _, _ = setup
    rng = np.random.default_rng(0)
    data = {"train": (rng.integers(0, 256, (600, 48, 48), dtype=np.uint8), np.arange(600) % 7),
            "val": ds.splits["val"]}
    full = str(tmp_path / "full.pt")
    B.export_bundle(str(wd / "run_dnnrl"), data, full, k_max=5, device="cpu", gallery_dim="auto")
    raw = torch.load(full, weights_only=False)
    assert raw["projection"] is None and raw["gallery"].shape == (600, 512)  # fits: no PCA
    limit = os.path.getsize(full) - 250_000
    monkeypatch.setattr(B, "SHIP_LIMIT_BYTES", limit)
    path = str(tmp_path / "auto.pt")
    facts = B.export_bundle(str(wd / "run_dnnrl"), data, path, k_max=5, device="cpu", gallery_dim="auto")
    d = facts["gallery_dim"]
    assert torch.load(path, weights_only=False)["gallery"].shape == (600, d) and 1 <= d < 512
    size = os.path.getsize(path)
    per_dim = 2 * 600 + 4 * 512
    assert limit - 64 * 1024 - 2 * per_dim < size < limit  # the most dims that fit, within the slack
    with pytest.raises(B.BundleError, match="gallery_dim"):
        B.export_bundle(str(wd / "run_dnnrl"), data, path, device="cpu", gallery_dim="many")
    monkeypatch.setattr(B, "SHIP_LIMIT_BYTES", 1000)
    with pytest.raises(B.BundleError, match="no room"):
        B.export_bundle(str(wd / "run_dnnrl"), data, path, device="cpu", gallery_dim="auto")


def test_export_cli_gallery_dim_argument():
    from dnnrl.cli import build_parser
    ap = build_parser()
    base = ["export", "--checkpoint", "r", "--data", "d", "--out", "o"]
    assert ap.parse_args(base + ["--gallery-dim", "auto"]).gallery_dim == "auto"
    assert ap.parse_args(base + ["--gallery-dim", "96"]).gallery_dim == 96
    for bad in ("0", "-3", "ninety"):
        with pytest.raises(SystemExit):
            ap.parse_args(base + ["--gallery-dim", bad])


def test_reduce_gallery_dim_equals_an_export_at_that_dim(setup, tmp_path):
    """Cutting a 24-dim PCA gallery to 10 gives what an export at 10 writes (same
    components, same float16 gallery), and the cut bundle classifies like it; bad dims
    and a bundle without a projection are refused by name."""
    wd, ds, _, bundles = setup
    at10 = str(tmp_path / "at10.pt")
    B.export_bundle(str(wd / "run_dnnrl"), ds, at10, k_max=7, gallery_dim=10, device="cpu")
    raw24 = torch.load(bundles["dnnrl"], map_location="cpu", weights_only=False)
    raw10 = torch.load(at10, map_location="cpu", weights_only=False)
    cut = B.reduce_gallery_dim(raw24, 10)
    assert cut["gallery"].shape == (raw24["gallery"].shape[0], 10) and cut["meta"]["gallery_dim"] == 10
    torch.testing.assert_close(cut["projection"]["components"], raw10["projection"]["components"],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(cut["gallery"].float(), raw10["gallery"].float(), rtol=0, atol=2e-3)
    assert raw24["gallery"].shape[1] == 24  # the input is left as it was
    cut["k"] = raw10["k"]
    path = str(tmp_path / "cut.pt")
    B.save_bundle(cut, path)
    got, _ = _expected(path, ds)
    want, _ = _expected(at10, ds)
    assert got == want
    for bad in (0, 25, 2.0, True):
        with pytest.raises(B.BundleError, match="dim must be an int"):
            B.reduce_gallery_dim(raw24, bad)
    with pytest.raises(B.BundleError, match="no PCA projection"):
        B.reduce_gallery_dim(dict(raw24, projection=None), 5)


@pytest.mark.parametrize("rows", [400, 12])  # N > D: the covariance's eigenvectors; N <= D: an SVD
def test_fit_pca_orders_components_by_variance(rows):
    """Six axes of the data carry spreads 6, 5, ..., 1 (in a shuffled order of axes; the
    columns are centred and orthogonal, so the axes are the principal directions exactly)
    and the rest none: the i-th component must be the axis with the i-th largest spread,
    its sign fixed positive, and the mean the offset the data was moved by."""
    g = torch.Generator().manual_seed(0)
    D = 16
    axes = torch.randperm(D, generator=g)[:6]
    a = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(a - a.mean(0))[0]  # orthonormal, zero-mean columns
    x = torch.full((rows, D), 3.0, dtype=torch.float64)
    x[:, axes] += q * torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64) * rows ** 0.5
    mean, comps = B.fit_pca(x, 4)
    assert comps.shape == (D, 4) and mean.shape == (D,)
    torch.testing.assert_close(mean, torch.full((D,), 3.0), atol=1e-5, rtol=0)
    for i in range(4):
        assert int(comps[:, i].abs().argmax()) == int(axes[i]), (i, comps[:, i])
        assert float(comps[int(axes[i]), i]) > 0.999


def test_projected_vote_shares_are_votes_over_k():
    """ProjectedKNNClassifier.vote (what dnnrl predict reports as "scores"): the predicted
    class and each class's share of the k votes, summing to 1 per query, from a search of
    the PCA coordinates ((q - mean) @ components)."""
    from dnnrl_ext import knn_vote
    g = torch.Generator().manual_seed(1)
    D, d, C, k = 12, 5, 4, 7
    mean, comps = torch.randn(D, generator=g), torch.linalg.qr(torch.randn(D, d, generator=g))[0]
    gallery, labels = torch.randn(60, d, generator=g), torch.randint(0, C, (60,), generator=g)
    clf = B.ProjectedKNNClassifier(k=k, num_classes=C, backend="reference", mean=mean, components=comps)
    clf.fit(gallery, labels)
    clf.k = k
    q = torch.randn(9, D, generator=g)
    pred, shares = clf.vote(q)
    want_pred, votes = knn_vote((q - mean) @ comps, gallery, labels, k, C, return_votes=True, backend="reference")
    torch.testing.assert_close(pred, want_pred)
    torch.testing.assert_close(shares, votes.float() / k)
    torch.testing.assert_close(shares.sum(1), torch.ones(9))


def test_export_on_the_cpu_embeds_in_float32_and_refuses_other_classes(setup):
    """A CPU export's gallery is the float32 network's embeddings (bf16 autocast is for
    CUDA, even where the run trained with it), and data whose classes are not the model's
    is refused before anything is embedded."""
    from dnnrl.data import Dataset
    wd, ds, _, _ = setup
    run = str(wd / "run_dnnrl")
    st = torch.load(os.path.join(run, "best.pt"), weights_only=False)
    st["config"] = dict(st["config"], amp="bf16")
    bf16_run = os.path.join(str(wd), "run_bf16")
    os.makedirs(bf16_run, exist_ok=True)
    torch.save(st, os.path.join(bf16_run, "best.pt"))
    bundle, _ = B.build_bundle(bf16_run, ds, k_max=5, half=False, device="cpu")
    _, cfg, _, state = B.load_checkpoint(bf16_run)
    assert cfg.amp == "bf16"
    model = B.model_from_state(cfg, 7, state)
    want = embed(model, torch.from_numpy(ds.splits["train"][0]), augment_config(cfg), torch.device("cpu"), amp="off")
    torch.testing.assert_close(bundle["gallery"], want, atol=1e-6, rtol=0)
    other = Dataset({s: v for s, v in ds.splits.items()}, ["c%d" % i for i in range(7)], "other")
    with pytest.raises(B.BundleError, match="differ from the model's"):
        B.build_bundle(run, other, device="cpu")
