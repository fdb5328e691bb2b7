"""Reduced-scale comparison runs for what the paper leaves open (mining mode, gamma,
batch composition): ``python -m dnnrl.experiments --data ... --epochs 3``.

Each variant trains from the same seed for a fixed number of epochs (no early
stopping) and reports per epoch the training/validation loss, the fraction of mined
triplets with a non-zero gradient, and the validation k-NN accuracy against a fixed
training-image gallery. Results go to a JSON file; docs/app.md quotes them.
"""
import argparse
import json
import os
import time

from .config import resolve

# the synthetic-set comparison (docs/app.md, first table)
VARIANTS = {
    "paper: random, batch_hard, gamma 0": dict(sampler="random", mining="batch_hard", gamma=0.0),
    "random, semi_hard, gamma 0": dict(sampler="random", mining="semi_hard", gamma=0.0),
    "random, batch_hard, gamma -0.5": dict(sampler="random", mining="batch_hard", gamma=-0.5),
    "pk, batch_hard, gamma 0": dict(sampler="pk", mining="batch_hard", gamma=0.0),
    "pk, semi_hard, gamma 0": dict(sampler="pk", mining="semi_hard", gamma=0.0),
    "pk, batch_hard, gamma -0.5": dict(sampler="pk", mining="batch_hard", gamma=-0.5),
    "pk, semi_hard, gamma -0.5": dict(sampler="pk", mining="semi_hard", gamma=-0.5),
    "pk, batch_hard, gamma -2": dict(sampler="pk", mining="batch_hard", gamma=-2.0),
}


# FER-2013 at reduced scale (docs/app.md, "Defaults chosen by measurement"): the
# triplet-forming choices that could make the exp loss learn on real data, plus the
# softmax (dnn) and hinge (tdnn) baselines at the same scale.
FER_VARIANTS = {
    "dnn softmax": dict(method="dnn"),
    "tdnn hinge, pk, semi_hard, m 0.2": dict(method="tdnn", sampler="pk", mining="semi_hard"),
    "tdnn hinge, pk, batch_hard, m 0.2": dict(method="tdnn", sampler="pk", mining="batch_hard"),
    "old default: pk, semi_hard, g 0, a 0.2, sum": dict(sampler="pk", mining="semi_hard", gamma=0.0,
                                                        alpha=0.2, reduction="sum"),
    "paper literal: random, random_triplets, g 0, a 0.2, sum": dict(
        sampler="random", mining="random_triplets", gamma=0.0, alpha=0.2, reduction="sum"),
}


def parse_variant(text: str):
    """"name=JSON" -> (name, dict): an ad-hoc variant from the command line.

    Raises ValueError naming --variant when the text is not NAME={JSON object}."""
    name, sep, js = text.partition("=")
    try:
        over = json.loads(js) if sep and name.strip() else None
    except ValueError:
        over = None
    if not isinstance(over, dict):
        raise ValueError('--variant: expected NAME={"key": value, ...}, got %r' % text)
    return name.strip(), over


def parse_setting(text: str):
    """"key=value" -> (key, value), the value read as JSON where it parses (else a string).

    Raises ValueError naming --set when the text has no "=" or no key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError("--set: expected KEY=VALUE (VALUE as JSON where it parses), got %r" % text)
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def main(argv=None):
    from .train import is_unfinished_run, train
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="runs/experiments")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--grid", default="synthetic", choices=["synthetic", "fer", "none"],
                    help="the variant set: VARIANTS (synthetic), FER_VARIANTS, or only --variant")
    ap.add_argument("--variants", default=None, help="|-separated substrings of variant names")
    ap.add_argument("--variant", action="append", default=[],
                    help='ad-hoc variant NAME={"key": value, ...} (repeatable)')
    ap.add_argument("--summary", default="summary.json", help="summary file name inside --out")
    ap.add_argument("--set", action="append", default=[], help="extra config key=value (JSON value)")
    args = ap.parse_args(argv)
    try:
        base = dict(parse_setting(kv) for kv in args.set)
        variants = dict({"synthetic": VARIANTS, "fer": FER_VARIANTS, "none": {}}[args.grid])
        variants.update(parse_variant(t) for t in args.variant)
    except ValueError as exc:
        ap.error(str(exc))
    if args.variants:
        wanted = [s.strip() for s in args.variants.split("|")]
        variants = {n: v for n, v in variants.items() if any(w in n for w in wanted)}
    if not variants:
        ap.error("no variant to run: --grid %s%s%s" % (
            args.grid, " with --variants %r" % args.variants if args.variants else "",
            " and no --variant" if not args.variant else ""))
    results = {}
    for name, v in variants.items():
        over = dict(base, data=args.data, max_epochs=args.epochs, patience=args.epochs + 1,
                    progress=False, out=os.path.join(args.out, name.replace(", ", "_").replace(" ", "")
                                                     .replace(":", "")))
        over.update(v)
        cfg = resolve(over)
        t0 = time.time()
        # a variant cut short by an interruption continues where it stopped; a finished one reruns
        res = train(cfg, resume=is_unfinished_run(cfg.out))
        hist = [json.loads(line) for line in open(os.path.join(cfg.out, "log.jsonl"))]
        results[name] = {"config": v, "seconds": time.time() - t0,
                         "epochs": [{k: r.get(k) for k in ("epoch", "train_loss", "val_loss",
                                                           "train_active_fraction", "val_knn_accuracy", "val_accuracy",
                                                           "images_per_s")} for r in hist],
                         "val_accuracy": res["val_accuracy"], "k": res["k"],
                         "knn_val_accuracy": res.get("knn_val_accuracy")}
        print(json.dumps({name: results[name]}), flush=True)
        with open(os.path.join(args.out, args.summary), "w") as fh:
            json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
