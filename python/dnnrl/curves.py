"""Training curves: a run's log.jsonl (one JSON record per epoch) drawn as a PNG, one run
or several overlaid (`dnnrl plot`, and `curves.png` in every run and reproduce folder).

Four panels against the epoch: training loss, validation loss, validation accuracy and
learning rate. The accuracy is the softmax head's where the run logs one (DNN) and the
per-epoch k-NN monitor's otherwise; each run's best epoch (the protocol's choice) is a
dot, and the plateau protocol's lr drops are crosses on the validation loss.
"""
import json
import math
import os
from typing import List, Optional, Sequence, Tuple

# (log key, panel title); the accuracy panel is chosen per run by accuracy_series
LOSS_PANELS = (("train_loss", "training loss"), ("val_loss", "validation loss"))
ACCURACY_KEYS = (("val_accuracy", "softmax head"), ("val_knn_accuracy", "k-NN monitor"))


def log_path(path: str) -> str:
    """The log.jsonl of a run directory, or ``path`` itself when it is a file."""
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError("no training log at %s (expected a run directory holding log.jsonl, "
                                "or a .jsonl file)" % path)
    return path


def run_label(path: str) -> str:
    """A short name for a run: its directory name, or the log file's name without
    .jsonl / .log.jsonl."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return os.path.basename(path)
    name = os.path.basename(path)
    if name == "log.jsonl":
        return os.path.basename(os.path.dirname(path))
    for suffix in (".log.jsonl", ".jsonl"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def read_history(path: str) -> List[dict]:
    """Epoch records of a run (a run directory or its log.jsonl), in epoch order.

    Raises FileNotFoundError without a log, ValueError on a line that is not a JSON
    object with an "epoch" (a last line without its newline is a record still being
    written by a running training, and is left out)."""
    path = log_path(path)
    history = []
    with open(path) as fh:
        lines = fh.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            if n == len(lines) and not line.endswith("\n"):
                break  # the record a running training is writing right now: not there yet
            raise ValueError("%s line %d is not JSON (%s)" % (path, n, e)) from None
        if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int):
            raise ValueError("%s line %d is not an epoch record (a JSON object with an integer "
                             "\"epoch\")" % (path, n))
        history.append(rec)
    # a resumed run rewrites its log from the checkpoint, but a log pieced together by
    # hand may repeat an epoch: the last record of an epoch wins
    by_epoch = {rec["epoch"]: rec for rec in history}
    return [by_epoch[e] for e in sorted(by_epoch)]


def series(history: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    """(epochs, values) of the records that hold a finite number under ``key``."""
    xs, ys = [], []
    for rec in history:
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(rec["epoch"])
            ys.append(float(v))
    return xs, ys


def accuracy_series(history: Sequence[dict]) -> Tuple[Optional[str], List[int], List[float]]:
    """(what, epochs, accuracies): the softmax head's validation accuracy where logged
    (DNN), else the k-NN monitor's; (None, [], []) when the run logs neither."""
    for key, what in ACCURACY_KEYS:
        xs, ys = series(history, key)
        if xs:
            return what, xs, ys
    return None, [], []


def best_epoch(history: Sequence[dict]) -> Optional[int]:
    """The epoch whose weights the protocol kept (the last record's best_epoch)."""
    if not history:
        return None
    e = history[-1].get("best_epoch")
    return e if isinstance(e, int) and e >= 1 else None


def draw_curves(runs: Sequence[Tuple[str, Sequence[dict]]], title: Optional[str] = None):
    """The 2 x 2 matplotlib figure of ``runs`` ((label, history) pairs, one colour each).

    Axes in order: training loss, validation loss, validation accuracy (%), lr; in each,
    one line per run (runs without that series draw an empty line), then the markers.
    Raises ValueError when there is no run or no run has an epoch."""
    runs = [(label, list(h)) for label, h in runs]
    if not runs or not any(h for _, h in runs):
        raise ValueError("runs: nothing to plot (no run with a logged epoch)")
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    ax_tl, ax_vl, ax_acc, ax_lr = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    acc_kinds = set()
    for i, (label, hist) in enumerate(runs):
        colour = "C%d" % (i % 10)
        best = best_epoch(hist)
        for ax, (key, _) in zip((ax_tl, ax_vl), LOSS_PANELS):
            xs, ys = series(hist, key)
            ax.plot(xs, ys, color=colour, label=label, lw=1.4)
        xs, ys = series(hist, "val_loss")
        if best in xs:
            ax_vl.plot([best], [ys[xs.index(best)]], "o", color=colour, ms=6)
        drops = [r["epoch"] for r in hist if str(r.get("event") or "").startswith("lr_drop")]
        ax_vl.plot([e for e in drops if e in xs], [ys[xs.index(e)] for e in drops if e in xs], "x",
                   color=colour, ms=8, mew=2)
        what, xs, ys = accuracy_series(hist)
        if what:
            acc_kinds.add(what)
            ax_acc.plot(xs, [100 * y for y in ys], color=colour, lw=1.4,
                        label="%s (%s)" % (label, what) if len(runs) > 1 else what)
            if best in xs:
                ax_acc.plot([best], [100 * ys[xs.index(best)]], "o", color=colour, ms=6)
        xs, ys = series(hist, "lr")
        ax_lr.plot(xs, ys, color=colour, lw=1.4)
    ax_tl.set_title("training loss (each method's own loss)")
    ax_vl.set_title("validation loss (o: best epoch, x: lr drop)")
    ax_acc.set_title("validation accuracy, %% (%s; o: best epoch)" % (" / ".join(sorted(acc_kinds)) or "none logged"))
    ax_lr.set_title("learning rate")
    if any(series(h, "lr")[1] and min(series(h, "lr")[1]) > 0 for _, h in runs):
        ax_lr.set_yscale("log")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole (ticks at 1.25 before)
    ax_tl.legend(fontsize=8)
    if acc_kinds:
        ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(runs: Sequence[Tuple[str, Sequence[dict]]], out_path: str, title: Optional[str] = None) -> str:
    """Draw ``runs`` (see draw_curves) into ``out_path`` (PNG); returns ``out_path``."""
    import matplotlib.pyplot as plt
    fig = draw_curves(runs, title=title)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        fig.savefig(out_path, dpi=100)
    finally:
        plt.close(fig)
    return out_path


def plot_run_dirs(paths: Sequence[str], out_path: str, labels: Optional[Sequence[str]] = None,
                  title: Optional[str] = None) -> str:
    """Read each run (directory or log.jsonl) and draw them overlaid into ``out_path``."""
    if labels is not None and len(labels) != len(paths):
        raise ValueError("labels: %d given for %d runs" % (len(labels), len(paths)))
    runs = [(labels[i] if labels else run_label(p), read_history(p)) for i, p in enumerate(paths)]
    return plot_curves(runs, out_path, title=title)
