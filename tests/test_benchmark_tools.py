"""The helper scripts of benchmarks/: embedding_report.py (effective dimension, k-NN vs
softmax head), ingest_gpu_session.py's --ship checks, bench_train.py, count_step_ops.py."""
import collections
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import dnnrl_ext

from dnnrl.config import Config
from dnnrl.model import DNNRLNet
from dnnrl.synthetic import make_synthetic
from dnnrl.train import save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_variance_shares_find_the_rank():
    rep = _load("embedding_report")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g) @ torch.randn(3, 64, generator=g)  # rank 3 in 64 dims
    share = rep.variance_shares(x)
    assert share.shape == (64,) and share.sum() == pytest.approx(1.0)
    assert np.all(np.diff(share) <= 1e-12) and share[2] > 1e-3 and share[3:].sum() < 1e-10
    assert rep.variance_shares(torch.randn(400, 64, generator=g))[:10].sum() < 0.3  # full rank: spread


def test_embedding_report_cli(tmp_path, capsys):
    rep = _load("embedding_report")
    ds = make_synthetic(8, 4, 0, seed=5)
    path = tmp_path / "d.csv"
    usage = {"train": "Training", "val": "PublicTest"}
    with open(path, "w") as fh:
        fh.write("emotion,pixels,Usage\n")
        for s in ("train", "val"):
            for img, lab in zip(*ds.splits[s]):
                fh.write('%d,"%s",%s\n' % (lab, " ".join(map(str, img.ravel())), usage[s]))
    torch.manual_seed(0)
    cfg = Config(image_size=32, width=0.125, method="dnnrl", preset="cpu", out=str(tmp_path / "run"))
    os.makedirs(cfg.out)
    save_model(os.path.join(cfg.out, "best.pt"), DNNRLNet(num_classes=7, width=cfg.width).eval(), cfg,
               list(ds.class_names), {"epoch": 1, "val_loss": 1.0})
    out = tmp_path / "r.json"
    assert rep.main([cfg.out, "--data", str(path), "--knn", "--k-max", "5", "--out", str(out)]) == 0
    r = json.load(open(out))[0]
    assert r["method"] == "dnnrl" and 1 <= r["dims_99"] <= r["dims_999"] <= 28  # 28 val rows: rank <= 27
    assert 1 <= r["k"] <= 5 and 0 <= r["knn_accuracy"] <= 1 and 0 <= r["knn_head_agreement"] <= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == r


def _bundle_file(path, meta):
    torch.save({"format": "dnnrl-bundle-1", "meta": meta}, path)
    return str(path)


def test_ingest_refuses_bundles_that_break_the_rules(tmp_path, monkeypatch):
    ing = _load("ingest_gpu_session")
    good = {"val_accuracy": 0.712, "val_accuracy_float32": 0.714, "val_size": 3589}
    assert ing._not_shippable(_bundle_file(tmp_path / "a.pt", good)) is None
    lossy = dict(good, val_accuracy=0.709)
    assert "0.3 points" in ing._not_shippable(_bundle_file(tmp_path / "b.pt", lossy))
    subset = dict(good, val_size=1000)
    assert "3,589" in ing._not_shippable(_bundle_file(tmp_path / "c.pt", subset))
    from dnnrl import bundle as B
    monkeypatch.setattr(B, "SHIP_LIMIT_BYTES", 100)  # the limit is the package's own
    assert "over the" in ing._not_shippable(str(tmp_path / "a.pt"))
    monkeypatch.undo()
    # --ship end to end, into a scratch results folder and asset path
    src = tmp_path / "files"
    src.mkdir()
    monkeypatch.setattr(ing, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(ing, "ASSET", str(tmp_path / "assets" / "m.pt"))
    _bundle_file(src / "dnnrl_bundle.pt", lossy)
    assert ing.main([str(src), "--ship", "--date", "2026-01-01"]) == 1 and not os.path.exists(ing.ASSET)
    _bundle_file(src / "dnnrl_bundle.pt", good)
    assert ing.main([str(src), "--ship", "--date", "2026-01-01"]) == 0 and os.path.exists(ing.ASSET)
    # a worse model does not replace the packaged one, unless forced
    worse = dict(good, val_accuracy=0.60, val_accuracy_float32=0.60)
    _bundle_file(src / "dnnrl_bundle.pt", worse)
    assert ing.main([str(src), "--ship", "--date", "2026-01-01"]) == 1
    assert ing._bundle_meta(ing.ASSET)["val_accuracy"] == 0.712
    assert ing.main([str(src), "--ship", "--force", "--date", "2026-01-01"]) == 0
    assert ing._bundle_meta(ing.ASSET)["val_accuracy"] == 0.60
    _bundle_file(src / "dnnrl_bundle.pt", dict(worse, val_accuracy=0.601, val_accuracy_float32=0.601))
    assert ing.main([str(src), "--ship", "--date", "2026-01-01"]) == 0  # better: shipped
    assert ing._bundle_meta(ing.ASSET)["val_accuracy"] == 0.601


def test_bench_train_times_each_method_and_cudnn_setting(tmp_path, capsys):
    """bench_train.py on the CPU with the synthetic set: a row per (method, setting), the
    session recipe among the training options, the images a P x K step really holds
    (7 classes x 4 of --batch-size 30) and ms/step from the epochs' own times."""
    bt = _load("bench_train")
    out = tmp_path / "bt.json"
    assert bt.main(["--method", "dnnrl", "--method", "dnn", "--batches", "2", "--repeats", "2", "--out", str(out),
                    "--image-size", "32", "--width", "0.125", "--batch-size", "30", "--device", "cpu",
                    "--seed", "3"]) == 0
    res = json.load(open(out))
    rows = res["rows"]
    assert [(r["method"], r["cudnn_benchmark"]) for r in rows] == [
        ("dnnrl", "on"), ("dnnrl", "off"), ("dnn", "on"), ("dnn", "off")]
    for r in rows:
        assert len(r["images_per_s_all"]) == 2 and all(v > 0 for v in r["images_per_s_all"])
        assert r["images_per_s"] == pytest.approx(float(np.median(r["images_per_s_all"])))
        assert r["images_per_step"] == 28
        per_epoch_ms = [1000 * 28 / v for v in r["images_per_s_all"]]
        assert min(per_epoch_ms) * (1 - 1e-6) <= r["ms_per_step"] <= max(per_epoch_ms) * (1 + 1e-6)
        assert (r["batch_size"], r["image_size"], r["steps_per_epoch"]) == (30, 32, 2)
    assert res["train_options"][:8] == bt.RECIPE and "--seed" in res["train_options"]
    assert res["device_name"].startswith("cpu") and res["machine"]["cores"] >= 1
    assert all(r["cuda_graph"] == "off" and r["graph_replays"] == 0 for r in rows)
    assert "dnnrl  cudnn benchmark off cuda graph off batch 30 (28 images)" in capsys.readouterr().out


def test_bench_train_times_each_batch_size_in_its_own_trainer(tmp_path):
    bt = _load("bench_train")
    out = tmp_path / "bt.json"
    assert bt.main(["--batch-sizes", "14,21", "--cudnn", "off", "--batches", "2", "--repeats", "1", "--out", str(out),
                    "--image-size", "32", "--width", "0.125", "--batch-size", "700", "--device", "cpu"]) == 0
    rows = json.load(open(out))["rows"]
    assert [(r["method"], r["batch_size"], r["images_per_step"]) for r in rows] == [("dnnrl", 14, 14),
                                                                                    ("dnnrl", 21, 21)]


def test_bench_train_profiles_steps_when_asked(tmp_path):
    """--profile-steps: a profile per row (wall ms per step; device figures only on a
    card) and the op tables beside the JSON."""
    bt = _load("bench_train")
    out = tmp_path / "bt.json"
    assert bt.main(["--cudnn", "off", "--batches", "2", "--repeats", "1", "--profile-steps", "2", "--out", str(out),
                    "--image-size", "32", "--width", "0.125", "--batch-size", "14", "--device", "cpu"]) == 0
    (row,) = json.load(open(out))["rows"]
    prof = row["profile"]
    assert prof["steps"] == 2 and prof["wall_ms_per_step"] > 0
    assert prof["device_ms_per_step"] is None and prof["device_busy_fraction"] is None
    text = open(tmp_path / "bt.profile.txt").read()
    assert text.startswith("## dnnrl, cudnn benchmark off, cuda graph off, batch 14")
    assert "aten::convolution_backward" in text  # the step's backward ran under the profiler


def test_ingest_files_the_solo_throughput_and_prints_its_profile(tmp_path, monkeypatch, capsys):
    import tarfile
    ing = _load("ingest_gpu_session")
    monkeypatch.setattr(ing, "RESULTS", str(tmp_path / "results"))
    src, tb = tmp_path / "files", tmp_path / "tb"
    src.mkdir(), tb.mkdir()
    row = {"method": "dnnrl", "batch_size": 128, "cudnn_benchmark": "on", "cuda_graph": "off", "images_per_s": 14000.0,
           "ms_per_step": 9.0, "peak_mib": 900.0,
           "profile": {"steps": 20, "wall_ms_per_step": 9.5, "device_ms_per_step": 7.6,
                       "device_busy_fraction": 0.8, "device_ops_per_step": 512.0}}
    json.dump({"device_name": "Card X", "rows": [row]}, open(tb / "bench_train.json", "w"))
    (tb / "bench_train.profile.txt").write_text("## dnnrl\n")
    with tarfile.open(src / "train_bench.tar.gz", "w:gz") as t:
        t.add(tb / "bench_train.json", "bench_train.json")
        t.add(tb / "bench_train.profile.txt", "bench_train.profile.txt")
    assert ing.main([str(src), "--date", "2026-01-01"]) == 0
    out = capsys.readouterr().out
    assert "14000 images/s, 9.00 ms/step" in out
    assert "7.60 ms of kernels on the card (busy 80 %), 512 kernels and copies per step" in out
    assert (tmp_path / "results" / "train-bench-gpu-2026-01-01" / "bench_train.profile.txt").exists()


def test_bench_train_rejects_bad_settings():
    bt = _load("bench_train")
    for argv in (["--cudnn", "maybe"], ["--batches", "0"], ["--cudnn", ","], ["--batch-sizes", "128,x"],
                 ["--cuda-graphs", "yes"], ["--cuda-graphs", ","], ["--cuda-graphs", "off,on"],
                 ["--batch-sizes", "0"], ["--batch-sizes", ","], ["--profile-steps", "-1"]):
        with pytest.raises(SystemExit) as e:
            bt.parse(argv)
        assert e.value.code == 2


def _gpu_payload():
    return {"machine": {"gpu": "Card X", "torch": "2.x", "date": "2026-11-28"},
            "loss": [{"dtype": "float32", "B": 1024, "dnnrl_ext_ms": 0.5, "plain_pytorch_ms": 2.5,
                      "pml_ms": "error: no bf16", "dnnrl_ext_mib": 2.0, "plain_pytorch_mib": 26.0},
                     {"dtype": "float32", "B": 128, "dnnrl_ext_ms": 0.6, "plain_pytorch_ms": 2.7, "pml_ms": 3.9},
                     {"dtype": "bfloat16", "B": 128, "dnnrl_ext_ms": 0.4}],
            "knn_vote": [{"Q": 3589, "N": 28709, "data": "random", "dnnrl_ext_ms": 2.0, "dnnrl_ext_exact_ms": 5.0,
                          "chunked_torch_ms": 6.0},
                         {"Q": 3589, "N": 1000000, "dnnrl_ext_ms": 100.0, "chunked_torch_ms": "error: oom"}]}


def test_plot_bench_reads_both_result_formats(tmp_path):
    pb = _load("plot_bench")
    lines = pb.loss_lines(_gpu_payload()["loss"])
    assert lines[("dnnrl_ext", "float32")] == ([128, 1024], [0.6, 0.5])  # sorted by B
    assert lines[("pml", "float32")] == ([128], [3.9])                    # the error left out
    assert lines[("dnnrl_ext", "bfloat16")] == ([128], [0.4]) and ("pml", "bfloat16") not in lines
    assert pb.loss_lines(_gpu_payload()["loss"], "mib") == {("dnnrl_ext", "float32"): ([1024], [2.0]),
                                                            ("plain_pytorch", "float32"): ([1024], [26.0])}
    groups, bars, unit = pb.knn_bars(_gpu_payload())
    assert groups == ["3,589 x 28,709, random", "3,589 x 1,000,000"] and unit == "ms"
    assert bars == {"dnnrl_ext": [2.0, 100.0], "dnnrl_ext, exact pass": [5.0, None],
                    "chunked torch (cdist + topk)": [6.0, None]}
    cpu = json.load(open(os.path.join(ROOT, "benchmarks", "results", "cpu-2core-2026-11-28-onednn.json")))
    groups, bars, unit = pb.knn_bars(cpu)
    assert unit == "s" and len(groups) == 1 and list(bars)[0] == "dnnrl_ext"
    assert bars["dnnrl_ext"] == [pytest.approx(0.2481139)] and "faiss-cpu IndexFlatL2 + vote" in bars
    assert pb.knn_bars(cpu, memory=True)[1]["dnnrl_ext"] == [pytest.approx(25.72265625)]


def test_plot_bench_draws_the_numbers(tmp_path):
    pb = _load("plot_bench")
    fig = pb.draw(_gpu_payload())
    try:
        ax_t, ax_m, ax_k = fig.axes
        ours = next(ln for ln in ax_t.lines if ln.get_label() == "dnnrl_ext (float32)")
        np.testing.assert_allclose(ours.get_ydata(), [0.6, 0.5])
        heights = sorted(round(p.get_height(), 6) for p in ax_k.patches)
        assert heights == [2.0, 5.0, 6.0, 100.0]
        assert sorted(t.get_text() for t in ax_k.texts) == ["2.5x", "3.0x"]  # exact pass, chunked vs ours
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    src = tmp_path / "r.json"
    src.write_text(json.dumps(_gpu_payload()))
    out = pb.plot_file(str(src))
    assert out == str(tmp_path / "r.png") and open(out, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="neither a 'loss' nor a 'knn_vote'"):
        pb.draw({"machine": {}})
    assert pb.main([str(tmp_path / "missing.json")]) == 2


def test_filter_path_model_mirrors_the_kernel_and_its_proof_holds():
    """benchmarks/filter_path_model.py models the CUDA filter path (DNNRL_KNN_FILTER=1): its
    constants and stride rule must be the kernel's, and on inputs at a reduced scale the
    proof's premise (|approximate - exact| <= e) and conclusion (the true top k inside the
    re-ranked set) must hold, with no query over the slot cap."""
    import re
    mod = _load("filter_path_model")
    src = open(os.path.join(ROOT, "csrc", "cuda", "knn_cuda.cu")).read()
    assert int(re.search(r"kFilterCap = (\d+);", src).group(1)) == mod.CAP
    assert int(re.search(r"kFilterMaxStride = (\d+);", src).group(1)) == mod.MAX_STRIDE
    assert int(re.search(r"kBoundBuckets = (\d+);", src).group(1)) == mod.BUCKETS
    assert int(re.search(r"kBoundMaxSplits = (\d+);", src).group(1)) == mod.MAX_SPLITS
    assert int(re.search(r"kFilterChunk = (\d+);", src).group(1)) == mod.CHUNK
    assert "int64_t mult = %d;" % mod.MULT in src
    # the subset: every stride-th row once; its groups: 32 per split, at most 8 splits
    cols = mod.subset_columns(28709, 10)
    assert torch.equal(cols.sort().values, torch.arange(0, 28709, 12)) and not torch.equal(cols, cols.sort().values)
    grp = mod.bound_groups(3589, cols.numel())
    assert int(grp.max()) + 1 == 256 and torch.equal(grp[:32], torch.arange(32))
    # the group-minimum bound is never below the subset's own k-th smallest
    sub = torch.rand(5, 300, generator=torch.Generator().manual_seed(0))
    assert (mod.group_bound(sub, 10, torch.arange(300) % 32) >= sub.kthvalue(10, dim=1).values).all()
    assert torch.equal(mod.group_bound(sub, 10, torch.arange(300)), sub.kthvalue(10, dim=1).values)  # singletons
    assert "kFilterCap / (4 * k)" in src, "the model's stride rule is the kernel's"
    assert [mod.stride(28709, k) for k in (1, 10, 32)] == [16, 12, 4]
    assert mod.stride(33, 16) == 2 and mod.stride(5, 5) == 1  # ceil(N / s) >= k always
    for kind in ("random", "clustered", "sorted"):
        q, g = mod.inputs(kind, 300, 6000, 128, seed=1)
        for k in (1, 10):
            r = mod.model(q, g, k)
            assert r["max_err_over_e"] < 0.5, r
            assert r["top_k_covered"] == 1.0 and r["overflow_rows"] == 0, r
            assert k <= r["reranked_mean"] < 4 * k + 8, r  # the exact re-rank stays small


def test_machine_record_names_the_cpu_and_its_gemm_rate(monkeypatch):
    """CPU figures from two hosts of one pool ("AMD EPYC" both) differed 2x: the record
    carries family / model / ISA and a measured GEMM rate, and survives a missing /proc."""
    sys_path = os.path.join(ROOT, "benchmarks")
    monkeypatch.syspath_prepend(sys_path)
    common = _load("common")
    info = common.machine("cpu")
    assert {"cpu", "cpu_vendor", "cpu_family", "cpu_model", "cpu_isa", "cpu_tile_gemm", "cores", "torch"} <= set(info)
    assert info["cpu_tile_gemm"] in ("onednn", "mm", None)  # None: no compiled extension
    assert info["cpu_isa"] in ("avx512", "avx2", "other")
    threads = torch.get_num_threads()
    rates = common.cpu_gemm_gflops(64, 64, 64)
    assert rates["mkl"] > 0 and all(r > 0 for r in rates.values())
    assert torch.get_num_threads() == threads  # restored

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")
    monkeypatch.setattr("builtins.open", no_proc)
    bare = common.cpu_details()
    assert {k: v for k, v in bare.items() if k != "cpu_tile_gemm"} == {
        "cpu_vendor": None, "cpu_family": None, "cpu_model": None, "cpu_isa": "other"}
    assert common.cpu_name()  # platform's name or "unknown cpu"


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "easy_positive"])
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_benchmark_alternatives_compute_our_loss(monkeypatch, mining, gamma):
    """The plain-PyTorch columns of bench_cpu / bench_gpu time the same loss as ours
    (SPEC semantics, float64 to rounding), or the side-by-side compares unequal work."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    alt = _load("alternatives")
    plain = {"batch_hard": alt.plain_pytorch_exp_triplet, "semi_hard": alt.plain_pytorch_exp_triplet_semi_hard,
             "easy_positive": alt.plain_pytorch_exp_triplet_easy_positive}
    g = torch.Generator().manual_seed(3)
    for B, classes in ((6, 2), (64, 7), (300, 7)):
        x = torch.randn(B, 32, generator=g, dtype=torch.float64)
        y = torch.arange(B) % classes  # every anchor valid (plain PyTorch's mean of none is NaN)
        want = dnnrl_ext.triplet_loss(x, y, mining=mining, gamma=gamma, backend="reference")
        got = plain[mining](x, y, gamma=gamma)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if mining == "easy_positive":  # bench_cpu's / bench_gpu's third column: the app's earlier path
            got = alt.python_mining_easy_positive(x, y, gamma=gamma)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _small_trainer(method, seed=3):
    bt = _load("bench_train")
    return bt.trainer_for(method, bt.RECIPE + ["--image-size", "32", "--width", "0.125", "--batch-size", "14",
                                               "--device", "cpu", "--seed", str(seed)], 2)


def test_count_step_ops_phases_are_the_training_step():
    """The counted phases dispatch exactly the compute ops of Trainer.train_step (same
    names, same counts): the script must not drift from the step it stands for."""
    cs = _load("count_step_ops")
    phases = cs.count_step(_small_trainer("dnnrl"))
    counted = sum((collections.Counter(phases[p]["counts"]) for p in cs.PHASES), collections.Counter())
    whole = _small_trainer("dnnrl")
    batches = whole.sampler.epoch(whole.sample_gen)
    whole.train_step(next(batches))
    idx = next(batches)
    with cs.OpCounter() as c:
        whole.train_step(idx)

    def work(counts):  # train_step's own return adds two detach views, no work
        return {k: v for k, v in counts.items() if k not in cs.METADATA_OPS}
    assert work(counted) == work(c.counts) and len(work(counted)) > 20
    assert "dnnrl_ext.triplet_loss" in phases["forward_loss"]["counts"]  # the recipe mines in the op
    assert "dnnrl_ext.triplet_loss_backward" in phases["backward"]["counts"]
    assert "aten.grid_sampler_2d" in phases["augment"]["counts"]
    assert phases["total_compute"] == sum(phases[p]["compute"] for p in cs.PHASES)
    assert all(0 < phases[p]["compute"] <= phases[p]["all"] for p in cs.PHASES)


def test_count_step_ops_cli_counts_each_method(tmp_path, capsys):
    cs = _load("count_step_ops")
    out = tmp_path / "ops.json"
    assert cs.main(["--method", "dnn", "--method", "dnnrl", "--out", str(out), "--preset", "cpu",
                    "--image-size", "32", "--width", "0.125", "--batch-size", "14"]) == 0
    res = json.load(open(out))
    rows = res["methods"]
    assert sorted(rows) == ["dnn", "dnnrl"] and res["train_options"][:8] == _load("bench_train").RECIPE
    assert rows["dnn"]["device"] == "cpu" and rows["dnn"]["image_size"] == 32
    # the triplet loss's mining and loss add ops to the joint forward; DNN has none of them
    assert rows["dnnrl"]["forward_loss"]["compute"] > rows["dnn"]["forward_loss"]["compute"]
    assert "dnnrl_ext.triplet_loss_indexed" not in rows["dnn"]["forward_loss"]["counts"]
    assert "dnnrl  compute ops: augment" in capsys.readouterr().out


def test_count_step_ops_leaves_views_out_of_the_compute_count():
    cs = _load("count_step_ops")
    counts = collections.Counter({"aten.view": 3, "aten.select": 2, "aten.mul": 4, "aten.convolution": 1})
    assert cs.compute_ops(counts) == 5


def test_bench_gpu_easy_positive_section_runs_on_the_cpu(monkeypatch):
    """bench_gpu.py's last section, run on the CPU with a CPU timer in place of the CUDA
    one (its first real run is on a GPU): a row per B with the three columns, the ratios,
    and the fused loss equal to the app's PyTorch-ops path."""
    if not dnnrl_ext.kernels_available("cpu"):
        pytest.skip("compiled CPU kernels not built")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    bg = _load("bench_gpu")
    monkeypatch.setattr(bg, "DEV", "cpu")
    calls = []

    def cpu_measure(fn, repeats):
        fn()
        calls.append(repeats)
        return 1e-3 * (1 + len(calls)), 0.5

    monkeypatch.setattr(bg, "measure", cpu_measure)
    rows = bg.bench_easy_positive((16, 40), 2)
    assert [r["B"] for r in rows] == [16, 40] and calls == [2] * 6
    for r in rows:
        assert r["loss_diff"] < 1e-6
        assert r["x_vs_python_mining"] == pytest.approx(r["python_mining_ms"] / r["dnnrl_ext_ms"])
        assert r["x_vs_plain_pytorch"] == pytest.approx(r["plain_pytorch_ms"] / r["dnnrl_ext_ms"])
        assert r["dnnrl_ext_mib"] == 0.5


def test_bench_cpu_times_both_tile_gemms_and_restores_the_setting(monkeypatch):
    """bench_cpu's third section times our ops with the tiles through oneDNN and through
    at::mm (DNNRL_CPU_TILE_GEMM), one row per case, and leaves the user's setting as it was."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch has no oneDNN")
    if not dnnrl_ext.kernels_available("cpu"):
        pytest.skip("compiled CPU kernels not built")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    bench = _load("bench_cpu")
    seen = []
    real = bench.common.time_cpu

    def spy(fn, **kw):
        seen.append(os.environ.get("DNNRL_CPU_TILE_GEMM"))
        return real(fn, repeats=1, warmup=0)
    monkeypatch.setattr(bench.common, "time_cpu", spy)
    monkeypatch.setenv("DNNRL_CPU_TILE_GEMM", "auto")
    rows = bench.bench_tile_gemm((64,), Q=40, N=300, D=32, k=3, rounds=2)
    assert [r["case"] for r in rows] == ["loss fwd+bwd B=64", "knn_vote 40x300x32"]
    assert seen == ["onednn", "mm"] * 4  # alternating, two rounds per case
    assert all(r["onednn"] > 0 and r["mm"] > 0 and r["onednn_over_mm"] == r["onednn"] / r["mm"] for r in rows)
    assert os.environ["DNNRL_CPU_TILE_GEMM"] == "auto"
