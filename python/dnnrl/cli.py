"""Command line: ``dnnrl train``, ``dnnrl eval``, ``dnnrl embed`` (also ``python -m dnnrl``)."""
import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import List, Optional

from . import argtypes as A
from .config import CHOICES, COMPILE_MODES, METHODS, PRESETS, SCHEDULES, SELECT_BY, TTA_MODES, Config

log = logging.getLogger("dnnrl")


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("expected on/off, got %r" % s)


def _add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", default=None, required=required,
                   help="FER-2013 challenge CSV, a Kaggle-layout folder (train/<class>/, test/<class>/), "
                        "a .zip/.tar(.gz/.xz) of one, or any folder of class sub-folders"
                        + ("" if required else "; default: the built-in synthetic data set"))
    p.add_argument("--skip-bad", action="store_true", default=None,
                   help="skip (and count in the run log) corrupt images / malformed CSV rows instead of failing")
    p.add_argument("--cache-dir", default=None,
                   help="decoded-data cache (default $DNNRL_CACHE or ~/.cache/dnnrl)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--backend", default=None, choices=CHOICES["backend"],
                   help="dnnrl_ext ops: compiled kernels (auto falls back to the reference with a warning)")
    p.add_argument("--amp", default=None, choices=CHOICES["amp"],
                   help="autocast (default auto: bf16 on CUDA)")
    p.add_argument("--eval-batch-size", type=A.int_at_least(1), default=None, help="batch size for embedding (512)")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show real defaults; None means "from the preset / config", already said in the help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def version_text() -> str:
    """One line for ``dnnrl --version``: this package, torch, and what the compiled
    extension can run here (what a bug report needs first)."""
    import torch
    import dnnrl_ext
    from . import __version__
    if not dnnrl_ext.extension_available():
        kernels = "compiled kernels not loaded (reference ops only): %s" % dnnrl_ext._extension._LOAD_ERROR
    elif not dnnrl_ext.has_cuda_kernels():
        kernels = "CPU kernels (built without CUDA kernels)"
    elif torch.cuda.is_available():
        usable = dnnrl_ext.kernels_available("cuda")
        kernels = "CPU and CUDA kernels; %s: %s" % (
            torch.cuda.get_device_name(), "usable" if usable else "too old for the CUDA kernels")
    else:
        kernels = "CPU and CUDA kernels (no CUDA device visible)"
    return "dnnrl %s, dnnrl_ext %s, torch %s; %s" % (__version__, dnnrl_ext.__version__, torch.__version__, kernels)


class _VersionAction(argparse.Action):
    """--version, computed when asked: importing torch for every parser would slow --help."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    ap = argparse.ArgumentParser(
        prog="dnnrl", description=("DNNRL facial expression recognition: train, evaluate, embed, plot, "
                                  "reproduce Table 2, export a model and predict on photos and videos."),
        formatter_class=_Formatter)
    ap.add_argument("--version", action=_VersionAction,
                    help="print the versions of dnnrl and torch and which compiled kernels load, then exit")
    sub = ap.add_subparsers(dest="command", metavar="{train,eval,embed,plot,predict,export,reproduce}")
    sub.required = True
    fmt = _Formatter

    t = sub.add_parser("train", help="train a model and evaluate it (results.json in --out)",
                       formatter_class=fmt, description=(
                           "Train DNNRL / T-DNN / DNN with the paper's protocol, then embed the training set "
                           "as the k-NN gallery, choose k on validation and write results.json, report.md and "
                           "confusion matrices into --out. Without --data: the synthetic demo (CPU preset). "
                           "Defaults marked 'preset' come from --preset (paper for real data, cpu for synthetic)."))
    t.add_argument("--out", default="runs/demo", help="run directory")
    t.add_argument("--method", default=None, choices=METHODS,
                   help="dnnrl: exp triplet + k-NN; tdnn: hinge triplet + k-NN; dnn: softmax (default dnnrl)")
    _add_data_args(t)
    t.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="paper: Table 1 network at 108 px; cpu: %d px, width %g, %d epochs "
                        "(default: cpu without --data, paper with it)"
                        % (PRESETS["cpu"]["image_size"], PRESETS["cpu"]["width"], PRESETS["cpu"]["max_epochs"]))
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from checkpoint.pt with its own config.json (the run's length "
                        "and the machine options may change; others given anew are named in a warning)")
    t.add_argument("--overwrite", action="store_true",
                   help="start a fresh run even where --out holds an unfinished one (its checkpoint is replaced)")
    g = t.add_argument_group("network / input")
    g.add_argument("--image-size", type=int, default=None, help="network input side (preset; paper 108)")
    g.add_argument("--width", type=float, default=None, help="channel multiplier (preset; paper 1.0)")
    g.add_argument("--embed-dim", type=int, default=None, help="embedding size (%d)" % d.embed_dim)
    g.add_argument("--dropout", type=float, default=None, help="dropout before the linear layer (%g)" % d.dropout)
    g.add_argument("--flip", type=_bool, default=None, help="random horizontal flips (off; not in the paper)")
    g.add_argument("--erase", type=float, default=None, metavar="P",
                   help="random erasing: with probability P one random rectangle (2-25 percent of the image) "
                        "of a training image is set to the mean grey (%g; not in the paper)" % d.erase)
    g.add_argument("--tta", default=None, choices=TTA_MODES,
                   help="test-time averaging for validation / evaluation: none, flip (each image "
                        "and its mirror image) or crops (also 4 diagonal shifts of 4 px: 10 views); "
                        "default none, as in the paper")
    g.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from the weights of another run (its directory, best.pt or checkpoint.pt; "
                        "same network size), e.g. a --method dnn run, to fine-tune it with a triplet loss")
    g = t.add_argument_group("loss / batches")
    g.add_argument("--batch-size", type=int, default=None, help="batch size (%d)" % d.batch_size)
    g.add_argument("--sampler", default=None, choices=CHOICES["sampler"],
                   help="random batches (the paper's literal setting) or class-balanced P x K "
                        "(default %s; chosen on the synthetic set, docs/app.md)" % d.sampler)
    g.add_argument("--mining", default=None,
                   choices=CHOICES["mining"],
                   help="triplets per batch: batch_hard / semi_hard in-batch mining (farthest positive), "
                        "random_triplets (one random positive and negative per anchor: the paper's literal "
                        "sampling) or easy_positive (nearest positive, nearest negative) "
                        "(default %s; chosen on the synthetic set, docs/app.md)" % d.mining)
    g.add_argument("--alpha", type=float, default=None, help="exp loss slope, > 0 (default %g = the paper's)" % d.alpha)
    g.add_argument("--gamma", type=float, default=None,
                   help="exp loss margin (default %g = the paper's; with batch_hard mining 0 learns "
                        "nothing; negative values learn from violating triplets)" % d.gamma)
    g.add_argument("--margin", type=float, default=None, help="hinge margin for tdnn (%g)" % d.margin)
    g.add_argument("--reduction", default=None, choices=CHOICES["reduction"],
                   help="triplet loss over a batch (%s: the paper's Eq. 1)" % d.reduction)
    g.add_argument("--softmax-weight", type=float, default=None,
                   help="dnnrl / tdnn: add W x the softmax head's cross-entropy to the triplet loss "
                        "(joint training; default %g = the paper's pure triplet loss)" % d.softmax_weight)
    g.add_argument("--label-smoothing", type=float, default=None,
                   help="label smoothing of the softmax head's cross-entropy in training (dnn, and "
                        "joint dnnrl / tdnn) (%g; not in the paper)" % d.label_smoothing)
    g.add_argument("--mining-scope", default=None, choices=CHOICES["mining_scope"],
                   help="under torchrun: mine triplets in the global batch gathered from all ranks, or "
                        "in each rank's shard (%s)" % d.mining_scope)
    g = t.add_argument_group("optimisation / protocol")
    g.add_argument("--lr", type=float, default=None, help="initial SGD lr (%g)" % d.lr)
    g.add_argument("--lr-min", type=float, default=None, help="lr floor (%g)" % d.lr_min)
    g.add_argument("--momentum", type=float, default=None, help="(%g)" % d.momentum)
    g.add_argument("--weight-decay", type=float, default=None, help="(%g)" % d.weight_decay)
    g.add_argument("--select-by", default=None, choices=SELECT_BY,
                   help="metric of the protocol (best weights, lr drops, stopping): the validation loss "
                        "(the paper), the val k-NN error of the monitor, or val_accuracy: the error of "
                        "the accuracy the method is scored by (softmax head for dnn, k-NN monitor "
                        "else) (preset: cpu uses val_knn)")
    g.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="lr schedule: plateau (the paper: lr / 10 and back to the best weights when the "
                        "val loss rises more than 10 percent above its best), cosine (lr to --lr-min over "
                        "--max-epochs or the time budget) or late_cosine (plateau, then a cosine to "
                        "--lr-min over the last --anneal-fraction of the run) (%s)" % d.schedule)
    g.add_argument("--anneal-fraction", type=float, default=None,
                   help="late_cosine: final fraction of the run that anneals (%g)" % d.anneal_fraction)
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many epochs without a new best of the --select-by metric (preset; paper 20, "
                        "on the val loss)")
    g.add_argument("--max-epochs", type=int, default=None, help="epoch cap (preset; paper %d)" % d.max_epochs)
    g.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training: stop before an epoch that would end past it (estimated "
                        "from the epochs so far), then evaluate as usual (default: none)")
    g.add_argument("--epoch-batches", type=int, default=None, help="cap batches per epoch (reduced runs)")
    g.add_argument("--train-subset", type=int, default=None, help="train on a stratified subset of N images")
    g.add_argument("--val-subset", type=int, default=None, help="validate on a stratified subset")
    g.add_argument("--k-max", type=int, default=None, help="largest k tried on validation (%d)" % d.k_max)
    g.add_argument("--monitor-gallery", type=int, default=None,
                   help="training images in the per-epoch val k-NN monitor (0 = off)")
    g = t.add_argument_group("machinery")
    g.add_argument("--seed", type=int, default=None, help="(%d)" % d.seed)
    _add_runtime_args(g)
    g.add_argument("--channels-last", default=None, choices=CHOICES["channels_last"],
                   help="(auto: on CUDA and the CPU)")
    g.add_argument("--cudnn-benchmark", default=None, choices=CHOICES["cudnn_benchmark"],
                   help="let cuDNN time its convolution algorithms on the first batches and keep the "
                        "fastest (auto: on CUDA; off: its heuristic choice, fewer surprises in run-to-run "
                        "reproducibility)")
    g.add_argument("--cuda-graph", default=None, choices=CHOICES["cuda_graph"],
                   help="replay the network's training forward and backward as CUDA graphs, recorded "
                        "on the first batch (CUDA only, one process; fewer host launches per step; "
                        "off by default until measured)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    g.add_argument("--compile-mode", default=None,
                   choices=COMPILE_MODES,
                   help="torch.compile mode with --compile (reduce-overhead: CUDA graphs, fewer launches at "
                        "batch 128)")
    g.add_argument("--log-every", type=int, default=None, help="steps between host syncs (%d)" % d.log_every)
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no tqdm progress bars")

    e = sub.add_parser("eval", help="evaluate a trained model on data (results.json + confusion matrix)",
                       formatter_class=fmt, description=(
                           "A training run (a checkpoint): embed the data's training split as the k-NN "
                           "gallery, choose k on its validation split, report val/test accuracy (the softmax "
                           "head for dnn models). A bundle (--bundle, a bundle file, or nothing: the packaged "
                           "model): its own gallery and k, evaluated on the val/test splits of --data "
                           "(its k-NN vote, as dnnrl predict answers; a dnn bundle's softmax head alongside)."))
    e.add_argument("checkpoint", nargs="?", default=None,
                   help="a run directory or a best.pt / checkpoint.pt file, or a bundle file; "
                        "none: the packaged model ($DNNRL_BUNDLE overrides it)")
    e.add_argument("--bundle", default=None, help="a model bundle from `dnnrl export` (instead of a checkpoint)")
    _add_data_args(e)
    e.add_argument("--out", default=None,
                   help="output directory (default: <run dir>/eval; for a bundle runs/eval-<bundle name>)")
    e.add_argument("--k-max", type=A.int_at_least(1), default=50, help="largest k tried on validation (checkpoints)")
    e.add_argument("--tta", default=None, choices=TTA_MODES,
                   help="test-time averaging of the queries (default: the run's / bundle's setting)")
    _add_runtime_args(e)

    m = sub.add_parser("embed", help="write embeddings of a data set to .npz or .pt",
                       formatter_class=fmt,
                       description="Embeddings (N, 512), labels and split names of every split of --data.")
    m.add_argument("checkpoint", help="a run directory or a best.pt / checkpoint.pt file")
    _add_data_args(m)
    m.add_argument("--out", type=A.path_with_suffix((".npz", ".pt")), default="embeddings.npz",
                   help="output file: .npz (numpy) or .pt (torch)")
    _add_runtime_args(m)
    c = sub.add_parser("plot", help="training curves of runs (loss, validation accuracy, lr) as a PNG",
                       formatter_class=fmt, description=(
                           "Draws the training curves of one run or several overlaid (run directories or "
                           "their log.jsonl files): training and validation loss, validation accuracy "
                           "(softmax head or k-NN monitor), learning rate, each run's best epoch marked. "
                           "Training writes the same plot as curves.png in its run directory."))
    c.add_argument("runs", nargs="+", help="run directories or log.jsonl files")
    c.add_argument("--out", default=None,
                   help="PNG to write (default: curves.png in the run directory when one run directory "
                        "is given; required otherwise)")
    c.add_argument("--label", action="append", default=None,
                   help="legend name of each run, in order (repeat once per run; default: directory names)")
    c.add_argument("--title", default=None, help="figure title")
    from .predict import add_export_parser, add_predict_parser
    add_predict_parser(sub)
    add_export_parser(sub)
    from .reproduce import add_reproduce_parser
    add_reproduce_parser(sub)
    return ap


def _train(args) -> int:
    from .config import ignored_options, resolve
    from .train import train
    # every Config field the parser has an option for (a hand-kept list once dropped new options)
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    over["out"] = args.out
    cfg = resolve(over)
    given = [k for k, v in over.items() if v is not None]
    if not args.resume:  # (a resumed run names what it ignores itself)
        for name, why in ignored_options(cfg, given):
            print("dnnrl train: warning: --%s has no effect here: %s" % (name.replace("_", "-"), why),
                  file=sys.stderr)
    # on --resume only the options given here may change the saved run (its length, the machine it runs on)
    results = train(cfg, resume=args.resume, resume_given=given, overwrite=args.overwrite)
    if results is not None and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 prints
        print(json.dumps({k: results.get(k) for k in ("val_accuracy", "test_accuracy", "k")}))
    return 0


def _load_checkpoint(path: str):
    """(file, Config, class_names, weights) of a run directory or a best.pt / checkpoint.pt
    (the best weights where the file has them); FileNotFoundError / ValueError naming the path."""
    from .train import load_run_file
    if os.path.isdir(path):
        for name in ("best.pt", "checkpoint.pt"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError("no best.pt or checkpoint.pt in %s" % path)
    st = load_run_file(path)
    model_state = st.get("best_state") or st["model"]
    return path, Config.from_dict(st["config"]), st["class_names"], model_state


def _restore(args, for_eval: bool):
    """(cfg, model, data placed on device, class_names, device, backend) for eval / embed.

    ``for_eval``: carve a validation split as training did when the data has none, and
    refuse data of other classes for a softmax (dnn) model, whose head scores only its own
    (a k-NN model takes its gallery from the data, so other classes are a warning). The
    model's batch norms are folded into its convolutions (inference only)."""
    from .model import fold_batch_norm
    from .runtime import load_data, pick_device, place_data, resolve_backend
    from .train import build
    path, cfg, class_names, state = _load_checkpoint(args.checkpoint)
    for k in ("device", "backend", "amp", "eval_batch_size", "cache_dir", "tta"):
        if getattr(args, k, None) is not None:
            setattr(cfg, k, getattr(args, k))
    cfg.skip_bad = bool(args.skip_bad)
    if args.data is not None:
        cfg.data = args.data
    cfg.train_subset = cfg.val_subset = None
    device = pick_device(cfg.device)
    backend = resolve_backend(cfg.backend, device)
    ds = load_data(cfg, need_val=for_eval)
    if ds.class_names != list(class_names):
        if for_eval and cfg.method == "dnn":
            raise ValueError("the data's classes %s differ from the model's %s: a dnn (softmax) model can only "
                             "be scored on data of its own classes" % (ds.class_names, list(class_names)))
        log.warning("data classes %s differ from the model's %s", ds.class_names, class_names)
    data, _ = place_data(ds, device)
    model = build(cfg, len(class_names), device)
    model.load_state_dict(state)
    return path, cfg, fold_batch_norm(model), data, ds.class_names, device, backend


def _eval(args) -> int:
    from .bundle import is_bundle_file
    from .evaluate import evaluate_model
    from .runtime import use_channels_last
    from .train import augment_config, setup_logging
    setup_logging(None)
    if args.bundle is not None and args.checkpoint is not None:
        raise ValueError("give a checkpoint or --bundle, not both")
    if args.bundle is not None or args.checkpoint is None or is_bundle_file(args.checkpoint):
        return _eval_bundle(args, args.bundle or args.checkpoint)
    path, cfg, model, data, names, device, backend = _restore(args, for_eval=True)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(path)), "eval")
    setup_logging(out)
    if "train" not in data:
        raise SystemExit("dnnrl eval: the data has no training split to use as the k-NN gallery")
    res = evaluate_model(model, data, names, augment_config(cfg), device, cfg.method, backend, out,
                         k_max=args.k_max, amp=cfg.amp, channels_last=use_channels_last(cfg.channels_last, device),
                         batch_size=cfg.eval_batch_size,
                         # what was evaluated and how, so that results.json says it (the options may override the run's)
                         extra={"checkpoint": path, "data": cfg.data, "tta": cfg.tta, "backend": backend,
                                "device": str(device), "amp": cfg.amp})
    print(json.dumps({k: res.get(k) for k in ("val_accuracy", "test_accuracy", "k")}))
    return 0


def _eval_bundle(args, path: Optional[str]) -> int:
    """``dnnrl eval`` of a bundle (None: the packaged model) on the splits of --data."""
    from .bundle import default_bundle_path, load_bundle
    from .evaluate import evaluate_bundle
    from .runtime import load_data, pick_device, place_data, use_channels_last
    from .train import augment_config, setup_logging
    path = path or default_bundle_path()
    if args.data is None:
        raise ValueError("evaluating the model bundle %s needs --data: labelled images to score it on "
                         "(for the packaged model, FER-2013, e.g. --data fer2013.tar.xz)" % path)
    device = pick_device(args.device or "auto")
    model, clf, names, cfg, meta = load_bundle(path, device, args.backend or "auto")
    for k in ("amp", "eval_batch_size", "tta"):
        if getattr(args, k, None) is not None:
            setattr(cfg, k, getattr(args, k))
    cfg.data, cfg.cache_dir, cfg.skip_bad = args.data, args.cache_dir or cfg.cache_dir, bool(args.skip_bad)
    cfg.train_subset = cfg.val_subset = None
    out = args.out or os.path.join("runs", "eval-" + os.path.splitext(os.path.basename(path))[0])
    setup_logging(out)
    ds = load_data(cfg)
    if ds.class_names != list(names):
        raise ValueError("the data's classes %s differ from the bundle's %s" % (ds.class_names, names))
    scored = [s for s in ("val", "test") if s in ds.splits] or list(ds.splits)
    ds.splits = {s: ds.splits[s] for s in scored}  # the bundle brings its own gallery: no training split
    data, _ = place_data(ds, device)
    res = evaluate_bundle(model, clf, data, names, augment_config(cfg), device, cfg.method, out, amp=cfg.amp,
                          channels_last=use_channels_last(cfg.channels_last, device),
                          batch_size=cfg.eval_batch_size,
                          extra={"bundle": os.path.abspath(path), "data": args.data, "tta": cfg.tta,
                                 "bundle_meta": meta})
    print(json.dumps({k: res.get(k) for k in ("val_accuracy", "test_accuracy", "k")}))
    return 0


def _embed(args) -> int:
    import numpy as np
    import torch
    from .runtime import embed, use_channels_last
    from .train import augment_config, setup_logging
    setup_logging(None)
    path, cfg, model, data, names, device, _ = _restore(args, for_eval=False)
    cl = use_channels_last(cfg.channels_last, device)
    out = {"class_names": np.array(names)}
    for s, (x, y) in data.items():
        out["%s_embeddings" % s] = embed(model, x, augment_config(cfg), device, cfg.amp, cl,
                                         cfg.eval_batch_size).cpu().numpy()
        out["%s_labels" % s] = y.cpu().numpy()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.out.endswith(".pt"):
        torch.save({k: (torch.from_numpy(v) if v.dtype != object and v.dtype.kind != "U" else v.tolist())
                    for k, v in out.items()}, args.out)
    else:
        np.savez(args.out, **out)
    log.info("wrote %s (%s)", args.out, {k: v.shape for k, v in out.items()})
    return 0


def _plot(args) -> int:
    from .curves import plot_run_dirs
    out = args.out
    missing = [r for r in args.runs if not os.path.exists(r)]
    if missing:
        raise FileNotFoundError("no such run directory or log file: %s" % ", ".join(missing))
    if out is None:
        if len(args.runs) != 1 or not os.path.isdir(args.runs[0]):
            raise ValueError("--out is required unless a single run directory is given")
        out = os.path.join(args.runs[0], "curves.png")
    print(plot_run_dirs(args.runs, out, labels=args.label, title=args.title))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:  # bad options or paths: one line, not a traceback
        if os.environ.get("DNNRL_DEBUG"):
            raise
        print("dnnrl %s: error: %s (DNNRL_DEBUG=1 shows the traceback)" % (args.command, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line on what is kept and how to go on, not a traceback
        if os.environ.get("DNNRL_DEBUG"):
            raise
        print("dnnrl %s: interrupted%s" % (args.command, _interrupted_hint(args)), file=sys.stderr)
        return 130


def _interrupted_hint(args) -> str:
    if args.command == "train":
        ckpt = os.path.join(args.out, "checkpoint.pt")
        if os.path.exists(ckpt):
            return ("; %s holds the last finished epoch: `dnnrl train --out %s --resume` continues from it"
                    % (ckpt, args.out))
        return "; no epoch had finished, so there is no checkpoint to resume from"
    if args.command == "reproduce":
        return ("; rerun the same command: finished methods are kept and unfinished ones resume from their "
                "checkpoints")
    return ""


def _run(args) -> int:
    if args.command == "reproduce":
        from .reproduce import run_reproduce
        return run_reproduce(args)
    if args.command in ("predict", "export"):
        from .predict import run_export, run_predict
        return run_predict(args) if args.command == "predict" else run_export(args)
    return {"train": _train, "eval": _eval, "embed": _embed, "plot": _plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
