"""`dnnrl reproduce`: the paper's Table 2 from one command.

Trains DNN (softmax), T-DNN (hinge triplet + k-NN) and DNNRL (exponential triplet +
k-NN) one after another with the same data and protocol, each into its own run
directory under --out, then writes a Table 2-style comparison (table.md, table.json)
beside the paper's figures. A method whose results.json already exists is not
retrained, and an interrupted method resumes from its checkpoint, so rerunning the
same command after an interruption loses nothing.
"""
import argparse
import json
import os
import time
from typing import Dict, List, Optional

METHOD_ORDER = ("dnn", "tdnn", "dnnrl")
# Table 2 of the paper: FER-2013 test accuracy (trained on the FER-2013 training set).
PAPER_TEST_ACCURACY = {"dnnrl": 0.7060, "tdnn": 0.7013, "dnn": 0.6922}
NAMES = {"dnn": "DNN (softmax)", "tdnn": "T-DNN (hinge triplet + k-NN)", "dnnrl": "DNNRL (exp triplet + k-NN)"}

# Training options passed through to `dnnrl train` (None = the preset's value).
_PASSTHROUGH = ("data", "preset", "max_epochs", "patience", "epoch_batches", "train_subset", "val_subset",
                "batch_size", "seed", "device", "backend", "amp", "compile", "cudnn_benchmark", "cuda_graph",
                "skip_bad", "cache_dir",
                "lr", "lr_min", "weight_decay", "schedule", "anneal_fraction", "time_budget", "flip", "tta", "sampler",
                "mining", "gamma", "alpha", "reduction", "softmax_weight", "select_by", "erase",
                "label_smoothing")


def add_reproduce_parser(sub) -> argparse.ArgumentParser:
    from .cli import _Formatter, _bool  # the other subcommands' help: no "(default: None)"
    from .config import CHOICES, SCHEDULES, SELECT_BY, TTA_MODES
    p = sub.add_parser(
        "reproduce", help="train DNN, T-DNN and DNNRL and write a Table 2-style table",
        formatter_class=_Formatter,
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--data", default=None,
                   help="FER-2013 (CSV, Kaggle folders or an archive of them); default: the synthetic set")
    p.add_argument("--out", default="runs/table2", help="directory of the three runs and the table")
    p.add_argument("--method", action="append", choices=METHOD_ORDER, default=None,
                   help="train only this method (repeatable); default: all three")
    p.add_argument("--force", action="store_true", help="retrain methods that already have results.json")
    p.add_argument("--preset", default=None, choices=("cpu", "paper"),
                   help="training preset (default: paper with --data, cpu without)")
    p.add_argument("--max-epochs", type=int, default=None, help="epoch cap per method (preset)")
    p.add_argument("--patience", type=int, default=None, help="epochs without a new best before stopping (preset)")
    p.add_argument("--epoch-batches", type=int, default=None, help="cap batches per epoch (reduced runs)")
    p.add_argument("--train-subset", type=int, default=None, help="train on a stratified subset")
    p.add_argument("--val-subset", type=int, default=None, help="validate on a stratified subset")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (128)")
    p.add_argument("--lr", type=float, default=None, help="initial lr of every method (preset)")
    p.add_argument("--lr-min", type=float, default=None, help="lr floor (dnnrl train's)")
    p.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay (dnnrl train's)")
    p.add_argument("--select-by", default=None, choices=SELECT_BY,
                   help="protocol metric of every run (best weights, lr drops, stopping); val_accuracy "
                        "scores each method by its own accuracy (dnnrl train --help)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="lr schedule: plateau (the paper's) or cosine (dnnrl train --help)")
    p.add_argument("--anneal-fraction", type=float, default=None,
                   help="late_cosine: final fraction of the run that anneals (dnnrl train's)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training per method; each run stops before an epoch that would "
                        "overrun it and is then evaluated (sizes a run for a fixed machine time)")
    p.add_argument("--flip", type=_bool, default=None, help="random horizontal flips (not in the paper)")
    p.add_argument("--erase", type=float, default=None, metavar="P",
                   help="random erasing probability per training image (dnnrl train's; not in the paper)")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of every softmax head in training (dnnrl train's; not in the paper)")
    p.add_argument("--tta", default=None, choices=TTA_MODES,
                   help="test-time averaging: flip (image + mirror image) or crops (10 views); not in the paper")
    p.add_argument("--sampler", default=None, choices=CHOICES["sampler"],
                   help="batches: random (the paper's) or class-balanced P x K (dnnrl train's default)")
    p.add_argument("--mining", default=None,
                   choices=CHOICES["mining"],
                   help="triplets of T-DNN and DNNRL (default: dnnrl train's)")
    p.add_argument("--gamma", type=float, default=None, help="DNNRL's gamma (default: dnnrl train's)")
    p.add_argument("--alpha", type=float, default=None, help="DNNRL's alpha (default: dnnrl train's)")
    p.add_argument("--reduction", default=None, choices=CHOICES["reduction"],
                   help="triplet loss reduction of T-DNN and DNNRL (default: dnnrl train's)")
    p.add_argument("--softmax-weight", type=float, default=None,
                   help="T-DNN and DNNRL: add W x softmax cross-entropy (joint training, docs/app.md); "
                        "default 0 = the paper's pure triplet losses")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default=None, choices=CHOICES["backend"], help="dnnrl_ext backend")
    p.add_argument("--amp", default=None, choices=CHOICES["amp"], help="autocast on CUDA")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network")
    p.add_argument("--cudnn-benchmark", default=None, choices=CHOICES["cudnn_benchmark"],
                   help="cuDNN times its convolution algorithms (auto: on CUDA; dnnrl train's)")
    p.add_argument("--cuda-graph", default=None, choices=CHOICES["cuda_graph"],
                   help="the network's training forward and backward as CUDA graphs (dnnrl train's)")
    p.add_argument("--skip-bad", action="store_true", default=None, help="skip corrupt images / CSV rows")
    p.add_argument("--cache-dir", default=None, help="decoded-data cache")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars")
    p.add_argument("--jobs", type=int, default=1,
                   help="train up to this many methods at once, each in its own process (one GPU is "
                        "mostly idle with one Table 1 network at batch 128; no progress bars then)")
    return p


def _variant(method: str, cfg: dict) -> str:
    """What a run used beyond the paper, for the table: a triplet run's mining and any
    softmax term; random erasing and label smoothing of any run."""
    parts = []
    if method != "dnn" and cfg:
        parts.append("%s mining" % cfg.get("mining", "?"))
        if cfg.get("softmax_weight"):
            parts[-1] += ", + %g x softmax (joint)" % cfg["softmax_weight"]
    if cfg.get("erase"):
        parts.append("erase %g" % cfg["erase"])
    if cfg.get("label_smoothing") and (method == "dnn" or cfg.get("softmax_weight")):
        parts.append("label smoothing %g" % cfg["label_smoothing"])
    return " [%s]" % ", ".join(parts) if parts else ""


def _row(method: str, res: dict, wall: Optional[float], cfg: Optional[dict] = None) -> Dict[str, object]:
    training = res.get("training") or {}
    return {"method": method, "name": NAMES[method] + _variant(method, cfg or {}),
            "val_accuracy": res.get("val_accuracy"),
            "test_accuracy": res.get("test_accuracy"), "k": res.get("k"),
            "paper_test_accuracy": PAPER_TEST_ACCURACY[method], "epochs": training.get("epochs"),
            "train_seconds": training.get("seconds"), "images_per_s": training.get("images_per_s"),
            "stopped_by": training.get("stopped_by"), "wall_seconds": wall, "device": training.get("device"),
            "device_name": training.get("device_name"), "phases": training.get("phases")}


def _pct(v) -> str:
    return "-" if v is None else "%.2f %%" % (100 * v)


PHASES = (("setup_s", "setup"), ("train_s", "train"), ("validate_s", "validate"), ("evaluate_s", "evaluate"),
          ("total_s", "total"))


def format_table(rows: List[dict]) -> str:
    """Markdown table: ours (validation, test) beside the paper's test accuracy."""
    lines = ["| method | val accuracy (ours) | test accuracy (ours) | test accuracy (paper) | k | epochs "
             "| stopped by | train s | images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            r["name"], _pct(r["val_accuracy"]), _pct(r["test_accuracy"]), _pct(r["paper_test_accuracy"]),
            r["k"] if r["k"] is not None else "-", r["epochs"] if r["epochs"] is not None else "-",
            r.get("stopped_by") or "-",
            _secs(r["train_seconds"]) if r["train_seconds"] else "-",
            "%.0f" % r["images_per_s"] if r["images_per_s"] else "-"))
    return "\n".join(lines)


def _secs(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    return "%.0f" % v if v >= 100 else "%.1f" % v


def format_phases(rows: List[dict]) -> str:
    """Markdown table: each method's seconds per phase and the device it ran on."""
    lines = ["| method | device | " + " | ".join("%s s" % name for _, name in PHASES) + " |",
             "|---|---|" + "---|" * len(PHASES)]
    for r in rows:
        ph = r.get("phases") or {}
        lines.append("| %s | %s | %s |" % (NAMES[r["method"]].split(" (")[0], r.get("device_name") or
                                             r.get("device") or "-",
                                             " | ".join(_secs(ph.get(key)) for key, _ in PHASES)))
    return "\n".join(lines)


def _train_job(job) -> float:
    """One method's training (a process of its own with --jobs > 1): wall seconds."""
    from .config import Config
    from .train import train
    cfg_dict, resume = job
    t0 = time.time()
    train(Config.from_dict(cfg_dict), resume=resume, overwrite=True)  # (fresh: no checkpoint, or --force)
    return time.time() - t0


def _write_curves(out: str, methods: List[str]) -> Optional[str]:
    """curves.png: the methods' training curves overlaid (dnnrl.curves); None where no
    method has a log or the plot fails (a warning: the table matters more)."""
    from .curves import plot_run_dirs
    runs = [m for m in methods if os.path.exists(os.path.join(out, m, "log.jsonl"))]
    if not runs:
        return None
    try:
        return plot_run_dirs([os.path.join(out, m) for m in runs], os.path.join(out, "curves.png"),
                             labels=[NAMES[m].split(" (")[0] for m in runs], title="Table 2 runs")
    except Exception as exc:  # noqa: BLE001 - the table is written whatever happens to the plot
        print("warning: could not draw %s: %s" % (os.path.join(out, "curves.png"), exc), flush=True)
        return None


def _differences(run_dir: str, overrides: dict) -> str:
    """'; it was trained with lr 0.05 where this command gives 0.5' for the options given now
    (not None) that the finished run's config.json holds otherwise; '' when none differ."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return ""
    saved = json.load(open(path))
    diff = ["%s %r where this command gives %r" % (k, saved[k], v) for k, v in sorted(overrides.items())
            if k not in ("out", "progress") and v is not None and k in saved and saved[k] != v]
    return "; it was trained with " + ", ".join(diff) if diff else ""


def run_reproduce(args) -> int:
    from .config import resolve
    from .train import is_unfinished_run
    methods = [m for m in METHOD_ORDER if m in (args.method or METHOD_ORDER)]
    jobs_wanted = getattr(args, "jobs", 1)
    if jobs_wanted < 1:
        raise ValueError("--jobs must be >= 1, got %d" % jobs_wanted)
    os.makedirs(args.out, exist_ok=True)
    jobs, walls = {}, {}
    for method in methods:
        run_dir = os.path.join(args.out, method)
        overrides = {k: getattr(args, k, None) for k in _PASSTHROUGH}
        overrides.update(method=method, out=run_dir)
        if os.path.exists(os.path.join(run_dir, "results.json")) and not args.force:
            print("%s: results.json exists, not retrained (--force to retrain)%s"
                  % (method, _differences(run_dir, overrides)), flush=True)
            continue
        if getattr(args, "progress", None) is not None:
            overrides["progress"] = args.progress
        if jobs_wanted > 1:
            overrides["progress"] = False  # bars of parallel runs would interleave
        resume = is_unfinished_run(run_dir) and not args.force  # (a finished one was skipped above)
        jobs[method] = (resolve(overrides).to_dict(), resume)
    if jobs_wanted > 1 and len(jobs) > 1:
        import multiprocessing
        # spawn: a fresh interpreter per run (CUDA cannot be forked once initialised)
        with multiprocessing.get_context("spawn").Pool(min(jobs_wanted, len(jobs))) as pool:
            print("training %s in %d processes" % (", ".join(jobs), min(jobs_wanted, len(jobs))), flush=True)
            walls = dict(zip(jobs, pool.map(_train_job, list(jobs.values()), chunksize=1)))
    else:
        walls = {m: _train_job(job) for m, job in jobs.items()}
    rows = []
    for method in methods:
        run_dir = os.path.join(args.out, method)
        results_path = os.path.join(run_dir, "results.json")
        wall = walls.get(method)
        cfg_path = os.path.join(run_dir, "config.json")
        run_cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else None
        with open(results_path) as f:
            rows.append(_row(method, json.load(f), wall, run_cfg))
    table = format_table(rows)
    curves = _write_curves(args.out, methods)
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"rows": rows, "paper": PAPER_TEST_ACCURACY}, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        data = ("data: %s" % args.data if getattr(args, "data", None)
                else "data: the built-in synthetic set, not FER-2013, so the paper's column does not compare")
        f.write("# Table 2, reproduced\n\nFER-2013 test accuracy of the paper (Guo et al., 2016, Table 2) "
                "beside ours (%s). Validation = PublicTest; test = PrivateTest where the data has it.\n\n" % data
                + table + "\n\nSeconds per phase (setup: data and model; validate: the per-epoch "
                "validation; evaluate: the final gallery embedding, k choice and scoring):\n\n"
                + format_phases(rows) + "\n"
                + ("\nTraining curves: ![curves](curves.png)\n" if curves else ""))
    print(table + "\n\n" + format_phases(rows), flush=True)
    return 0
