"""Final evaluation: training set as k-NN gallery, k chosen on validation, accuracy
(overall and per class), confusion matrices (JSON + PNG) and a markdown report."""
import json
import logging
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from dnnrl_ext import KNNClassifier

from .config import SELECT_BY_NAMES
from .runtime import embed as _embed
from .transforms import AugmentConfig

log = logging.getLogger("dnnrl")


def confusion(pred: Tensor, true: Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: rows true class, columns predicted class."""
    idx = (true.long() * num_classes + pred.long()).cpu()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def split_metrics(pred: Tensor, true: Tensor, class_names: List[str]) -> Dict[str, object]:
    C = len(class_names)
    cm = confusion(pred, true, C)
    per = {name: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, name in enumerate(class_names)}
    n = int(cm.sum())
    return {"accuracy": float(np.trace(cm) / n) if n else None, "n": n, "per_class_accuracy": per,
            "confusion_matrix": cm.tolist()}


def plot_confusion(cm: np.ndarray, class_names: List[str], title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, "%d" % cm[i, j], ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_k_curve(acc_per_k: Dict[int, float], chosen_k: Optional[int], title: str, path: str) -> None:
    """Validation accuracy (%) against k, the chosen k marked: how sharp the choice was."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    acc_per_k = {int(k): float(v) for k, v in acc_per_k.items()}  # (JSON turns the keys to strings)
    ks = sorted(acc_per_k)
    acc = [100 * acc_per_k[k] for k in ks]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(ks, acc, "-", marker=".", color="C0")
    if chosen_k in acc_per_k:
        ax.plot([chosen_k], [100 * acc_per_k[chosen_k]], "o", color="C3", ms=8,
                label="chosen k = %d (%.2f %%)" % (chosen_k, 100 * acc_per_k[chosen_k]))
        ax.legend(fontsize=8)
    ax.set_xlabel("k (neighbours voting)")
    ax.set_ylabel("validation accuracy, %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_model(model, data: Dict[str, tuple], class_names: List[str], aug: AugmentConfig,
                   device: torch.device, method: str, backend: str, out_dir: str,
                   k_max: int = 50, amp: str = "auto", channels_last: bool = False,
                   batch_size: int = 512, extra: Optional[dict] = None, dist=None) -> Dict[str, object]:
    """Evaluate and write results.json, confusion_*.json/png and report.md into out_dir.

    Args:
        data: {split: (images uint8 (N, S, S), labels int64 (N,))}; needs "train".
        method: "dnnrl" / "tdnn" (k-NN on embeddings) or "dnn" (the softmax head;
            the k-NN accuracy of its features is reported alongside).
        dist: a :class:`dnnrl.distributed.DistContext` of a torchrun run: every rank
            embeds its shard, the gallery stays sharded (per-rank top-k merged), all
            ranks return the results and rank 0 alone writes files.
    """
    sharded = dist is not None and dist.enabled
    write = not sharded or dist.is_main
    os.makedirs(out_dir, exist_ok=True)
    C = len(class_names)
    kw = dict(aug=aug, device=device, amp=amp, channels_last=channels_last, batch_size=batch_size)
    if sharded:
        from .distributed import ShardedKNNClassifier, embed_sharded

        def embed(m, x, **a):  # the gallery (training split) stays in shards; queries are gathered
            return embed_sharded(m, x, dist, gather=x is not data["train"][0], **a)
        clf = ShardedKNNClassifier(dist, num_classes=C, backend=backend)
    else:
        embed, clf = _embed, KNNClassifier(num_classes=C, backend=backend)
    emb = {s: embed(model, x, **kw) for s, (x, _) in data.items()}
    labels = {s: y.to(device) for s, (_, y) in data.items()}
    has_val = "val" in data
    clf.fit(emb["train"], labels["train"],
            val=(emb["val"], labels["val"]) if has_val else None, k_max=k_max)
    results: Dict[str, object] = {"method": method, "class_names": list(class_names),
                                  "sizes": {s: int(y.shape[0]) for s, (_, y) in data.items()}}
    preds = {}
    if method == "dnn":
        for s in ("val", "test"):
            if s in data:
                preds[s] = embed(model, data[s][0], head=True, **kw).argmax(1)
        results["k"] = None
        results["knn_k"] = clf.k
        for s in ("val", "test"):
            if s in data:
                results["knn_%s_accuracy" % s] = clf.score(emb[s], labels[s])
    else:
        for s in ("val", "test"):
            if s in data:
                preds[s] = clf.predict(emb[s])
        results["k"] = clf.k
    if clf.val_accuracy_per_k:
        results["val_accuracy_per_k"] = clf.val_accuracy_per_k
        if write:
            try:
                plot_k_curve(clf.val_accuracy_per_k, clf.k, "%s: k-NN validation accuracy against k%s" % (
                    method, " (softmax features)" if method == "dnn" else ""), os.path.join(out_dir, "k_curve.png"))
            except Exception as exc:  # noqa: BLE001 - a plotting problem must not cost the evaluation
                log.warning("could not draw %s: %s", os.path.join(out_dir, "k_curve.png"), exc)
    return _finish(results, preds, labels, class_names, method, out_dir, extra, write)


def _finish(results: Dict[str, object], preds: Dict[str, Tensor], labels: Dict[str, Tensor],
            class_names: List[str], method: str, out_dir: str, extra: Optional[dict],
            write: bool = True) -> Dict[str, object]:
    """Accuracy, per-class accuracy and confusion matrix (JSON + PNG) of every split in
    ``preds`` ((N,) predicted labels against ``labels``), then results.json + report.md."""
    for s in ["val", "test"] + [s for s in preds if s not in ("val", "test")]:
        results["%s_accuracy" % s] = None
        if s in preds:
            m = split_metrics(preds[s], labels[s], class_names)
            results["%s_accuracy" % s] = m["accuracy"]
            results["%s_per_class_accuracy" % s] = m["per_class_accuracy"]
            if not write:
                continue
            with open(os.path.join(out_dir, "confusion_%s.json" % s), "w") as fh:
                json.dump({"class_names": list(class_names), "rows": "true", "columns": "predicted",
                           "matrix": m["confusion_matrix"]}, fh, indent=1)
            acc = m["accuracy"]
            plot_confusion(np.array(m["confusion_matrix"]), class_names,
                           "%s, %s split: accuracy %.2f %%" % (method, s, 100 * (acc or 0)),
                           os.path.join(out_dir, "confusion_%s.png" % s))
    if extra:
        results.update(extra)
    if write:
        write_results(results, out_dir)
    log.info("val accuracy %s, test accuracy %s, k %s", _pct(results["val_accuracy"]),
             _pct(results["test_accuracy"]), results["k"])
    return results


def evaluate_bundle(model, classifier, data: Dict[str, tuple], class_names: List[str], aug: AugmentConfig,
                    device: torch.device, method: str, out_dir: str, amp: str = "auto",
                    channels_last: bool = False, batch_size: int = 512,
                    extra: Optional[dict] = None) -> Dict[str, object]:
    """Evaluate a shipped model (:func:`dnnrl.bundle.load_bundle`) as it is: its own
    k-NN gallery and k, nothing refitted. Writes the files of :func:`evaluate_model`.

    Args:
        model: the bundle's network (eval mode) on ``device``.
        classifier: the bundle's fitted :class:`dnnrl.bundle.ProjectedKNNClassifier`.
        data: {split: (images uint8 (N, S, S), labels int64 (N,))}; the "val" and "test"
            splits are evaluated, or every split when the data has neither.
        method: the bundle's method. Every bundle is scored by its k-NN vote, which is
            what ``dnnrl predict`` answers with; for "dnn" the softmax head's accuracy is
            reported alongside (``head_<split>_accuracy``).
    """
    os.makedirs(out_dir, exist_ok=True)
    splits = [s for s in ("val", "test") if s in data] or list(data)
    kw = dict(aug=aug, device=device, amp=amp, channels_last=channels_last, batch_size=batch_size)
    labels = {s: data[s][1].to(device) for s in splits}
    results: Dict[str, object] = {"method": method, "class_names": list(class_names),
                                  "sizes": {s: int(data[s][1].shape[0]) for s in splits},
                                  "k": classifier.k}
    preds = {}
    for s in splits:
        emb = _embed(model, data[s][0], **kw)
        preds[s] = classifier.predict(emb) if emb.shape[0] else labels[s][:0]
        if method == "dnn":
            head = _embed(model, data[s][0], head=True, **kw).argmax(1)
            results["head_%s_accuracy" % s] = (float((head == labels[s]).float().mean())
                                               if emb.shape[0] else None)
    return _finish(results, preds, labels, class_names, method, out_dir, extra)


def _pct(v) -> str:
    return "-" if v is None else "%.2f %%" % (100 * v)


def write_results(results: Dict[str, object], out_dir: str) -> None:
    """results.json and report.md of ``out_dir`` from ``results``."""
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    write_report(results, os.path.join(out_dir, "report.md"))


def write_report(results: Dict[str, object], path: str) -> None:
    names = results["class_names"]
    lines = ["# dnnrl run report", "",
             "method: **%s**; k-NN k: %s; sizes: %s" % (results["method"], results.get("k"), results["sizes"]),
             "", "| split | accuracy |", "|---|---|"]
    others = [s for s in results.get("sizes", {}) if s not in ("val", "test")
              and results.get("%s_accuracy" % s) is not None]
    for s in ["val", "test"] + others:
        lines.append("| %s | %s |" % (s, _pct(results.get("%s_accuracy" % s))))
    if any(results.get("head_%s_accuracy" % s) is not None for s in ("val", "test")):
        lines += ["", "The bundle's k-NN vote above (what `dnnrl predict` answers with); the dnn network's "
                  "softmax head: val %s, test %s" % (_pct(results.get("head_val_accuracy")),
                                                     _pct(results.get("head_test_accuracy")))]
    if results["method"] == "dnn" and results.get("knn_k") is not None:
        lines += ["", "k-NN on the softmax network's features (k=%s): val %s, test %s"
                  % (results["knn_k"], _pct(results.get("knn_val_accuracy")),
                     _pct(results.get("knn_test_accuracy")))]
    lines += ["", "Per-class accuracy:", "", "| class | val | test |", "|---|---|---|"]
    for n in names:
        v = (results.get("val_per_class_accuracy") or {}).get(n)
        t = (results.get("test_per_class_accuracy") or {}).get(n)
        lines.append("| %s | %s | %s |" % (n, _pct(v), _pct(t)))
    for s in ("test", "val"):
        if results.get("%s_accuracy" % s) is not None:
            lines += ["", "Confusion matrix (%s): ![confusion](confusion_%s.png) (counts in confusion_%s.json)"
                      % (s, s, s)]
            break
    if results.get("val_accuracy_per_k"):
        lines += ["", "Validation accuracy against k: ![k curve](k_curve.png)"]
    if results.get("training"):
        tr = results["training"]
        lines += ["", "Training: %s epochs, best epoch %s (%s %.4g), %.0f s, %.0f images/s"
                  % (tr.get("epochs"), tr.get("best_epoch"),
                     SELECT_BY_NAMES.get(tr.get("select_by"), "val loss"),
                     tr.get("best_metric") if tr.get("best_metric") is not None else float("nan"),
                     tr.get("seconds", 0), tr.get("images_per_s", 0))
                  + (" on %s" % tr["device_name"] if tr.get("device_name") else "")]
        ph = tr.get("phases")
        if ph:
            lines += ["", "Seconds per phase (total = their sum; setup is this process's, training and "
                      "validation cover every epoch, also those before a resume): " + ", ".join(
                "%s %.1f" % (k[:-2], v) for k, v in ph.items() if isinstance(v, (int, float)))]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
