"""dnnrl.curves and `dnnrl plot`: training curves read from log.jsonl and drawn as PNG;
training and reproduce write them."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from dnnrl.cli import main
from dnnrl.curves import (accuracy_series, best_epoch, draw_curves, plot_curves, plot_run_dirs,
                          read_history, run_label, series)
from dnnrl.train import write_curves


def _rec(epoch, **kw):
    rec = {"epoch": epoch, "lr": 0.05 / epoch, "train_loss": 2.0 / epoch, "val_loss": 1.5 + 0.1 * (epoch == 3),
           "event": None, "best_epoch": 2}
    rec.update(kw)
    return rec


def _write_log(run_dir, records, name="log.jsonl"):
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, name)
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _is_png(path):
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        return im.size


def test_read_history_orders_epochs_and_keeps_the_last_record_of_each(tmp_path):
    _write_log(str(tmp_path), [_rec(2, val_loss=9.0), _rec(1), "", _rec(2, val_loss=1.25), _rec(3)])
    hist = read_history(str(tmp_path))
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[1]["val_loss"] == 1.25


def test_a_record_still_being_written_is_left_out(tmp_path):
    """A plot taken while training appends its next record: a last line without its
    newline is not yet a record; the same text in the middle of the log is an error."""
    path = _write_log(str(tmp_path), [_rec(1), _rec(2)])
    with open(path, "a") as fh:
        fh.write('{"epoch": 3, "lr": 0.0')
    assert [r["epoch"] for r in read_history(path)] == [1, 2]
    with open(path, "a") as fh:
        fh.write("\n")
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        read_history(path)


@pytest.mark.parametrize("line, words", [("{not json", "line 2 is not JSON"),
                                          ('{"lr": 0.1}', "line 2 is not an epoch record"),
                                          ('[1, 2]', "line 2 is not an epoch record"),
                                          ('{"epoch": "3"}', "line 2 is not an epoch record")])
def test_read_history_names_the_bad_line(tmp_path, line, words):
    path = _write_log(str(tmp_path), [_rec(1), line])
    with pytest.raises(ValueError, match=words) as err:
        read_history(path)
    assert path in str(err.value)


def test_missing_log_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training log at .*log.jsonl"):
        read_history(str(tmp_path))


def test_series_skips_missing_and_non_finite_values():
    hist = [_rec(1, val_knn_accuracy=0.4), _rec(2, val_knn_accuracy=float("nan")), _rec(3),
            _rec(4, val_knn_accuracy=True), _rec(5, val_knn_accuracy=0.5)]
    assert series(hist, "val_knn_accuracy") == ([1, 5], [0.4, 0.5])
    assert series(hist, "nothing") == ([], [])


def test_accuracy_prefers_the_softmax_head_then_the_monitor():
    both = [_rec(1, val_accuracy=0.3, val_knn_accuracy=0.6)]
    assert accuracy_series(both) == ("softmax head", [1], [0.3])
    knn = [_rec(1, val_knn_accuracy=0.6), _rec(2, val_knn_accuracy=0.7)]
    assert accuracy_series(knn) == ("k-NN monitor", [1, 2], [0.6, 0.7])
    assert accuracy_series([_rec(1)]) == (None, [], [])


def test_best_epoch_is_the_last_records():
    assert best_epoch([_rec(1, best_epoch=1), _rec(2, best_epoch=1)]) == 1
    assert best_epoch([]) is None and best_epoch([_rec(1, best_epoch=0)]) is None


def test_run_labels(tmp_path):
    run = tmp_path / "dnnrl_wd0.002"
    path = _write_log(str(run), [_rec(1)])
    assert run_label(str(run)) == "dnnrl_wd0.002" and run_label(str(run) + "/") == "dnnrl_wd0.002"
    assert run_label(path) == "dnnrl_wd0.002"
    assert run_label(str(tmp_path / "x.log.jsonl")) == "x" and run_label("y.jsonl") == "y"


def test_figure_holds_each_runs_numbers():
    a = [_rec(e, val_accuracy=0.1 * e, event="lr_drop_reload_best" if e == 3 else None) for e in (1, 2, 3)]
    b = [_rec(e, val_knn_accuracy=0.2 * e, best_epoch=1) for e in (1, 2)]
    fig = draw_curves([("a", a), ("b", b)], title="t")
    try:
        ax_tl, ax_vl, ax_acc, ax_lr = fig.axes
        tl = [ln for ln in ax_tl.lines]
        assert [ln.get_label() for ln in tl] == ["a", "b"]
        np.testing.assert_allclose(tl[0].get_ydata(), [2.0, 1.0, 2.0 / 3])
        np.testing.assert_allclose(tl[1].get_xdata(), [1, 2])
        # validation loss: a's line, its best-epoch dot (epoch 2) and lr-drop cross (epoch 3), then b's
        vl = ax_vl.lines
        np.testing.assert_allclose(vl[0].get_ydata(), [1.5, 1.5, 1.6])
        assert list(vl[1].get_xdata()) == [2] and list(vl[2].get_xdata()) == [3]
        assert list(vl[4].get_xdata()) == [1] and len(vl[5].get_xdata()) == 0  # b: best at 1, no drops
        acc = ax_acc.lines
        np.testing.assert_allclose(acc[0].get_ydata(), [10, 20, 30])
        assert "softmax head" in acc[0].get_label() and "k-NN monitor" in acc[2].get_label()
        np.testing.assert_allclose(acc[2].get_ydata(), [20, 40])
        np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), [0.05, 0.025, 0.05 / 3])
        assert ax_lr.get_yscale() == "log"
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_nothing_to_plot_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves([], str(tmp_path / "c.png"))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_curves([("empty", [])], str(tmp_path / "c.png"))
    with pytest.raises(ValueError, match="labels: 1 given for 2 runs"):
        plot_run_dirs(["a", "b"], str(tmp_path / "c.png"), labels=["x"])


def test_plot_writes_a_png_into_new_folders(tmp_path):
    path = _write_log(str(tmp_path / "r"), [_rec(e, val_knn_accuracy=0.5) for e in (1, 2, 3)])
    out = plot_run_dirs([path], str(tmp_path / "a" / "b" / "c.png"))
    w, h = _is_png(out)
    assert w > 500 and h > 400


def test_cli_plot(tmp_path, capsys):
    r1 = str(tmp_path / "r1")
    r2 = str(tmp_path / "r2")
    _write_log(r1, [_rec(1), _rec(2)])
    _write_log(r2, [_rec(1, val_accuracy=0.3)])
    assert main(["plot", r1]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(r1, "curves.png")
    _is_png(os.path.join(r1, "curves.png"))
    out = str(tmp_path / "both.png")
    assert main(["plot", r1, r2, "--out", out, "--label", "one", "--label", "two", "--title", "x"]) == 0
    _is_png(out)
    assert main(["plot", r1, r2]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert main(["plot", r1, r2, "--out", out, "--label", "one"]) == 2
    assert "labels: 1 given for 2 runs" in capsys.readouterr().err
    for argv in (["plot", str(tmp_path / "nope"), "--out", out], ["plot", str(tmp_path / "nope")]):
        assert main(argv) == 2
        assert "no such run directory or log file: %s" % (tmp_path / "nope") in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty), "--out", out]) == 2
    assert "no training log" in capsys.readouterr().err


def test_a_failed_plot_is_a_warning_not_a_lost_run(tmp_path, monkeypatch):
    from dnnrl import train as train_mod
    warnings = []  # (the dnnrl logger may not propagate to caplog once a run has set it up)
    monkeypatch.setattr(train_mod.log, "warning", lambda fmt, *a: warnings.append(fmt % a))
    _write_log(str(tmp_path), ["{broken"])
    assert write_curves(str(tmp_path)) is None
    assert len(warnings) == 1 and "could not draw" in warnings[0] and "line 1 is not JSON" in warnings[0]
    assert not (tmp_path / "curves.png").exists()


def test_training_and_reproduce_write_curves(tmp_path):
    out = str(tmp_path / "t2")
    assert main(["reproduce", "--out", out, "--method", "dnn", "--method", "tdnn", "--max-epochs", "2",
                 "--epoch-batches", "2", "--train-subset", "140", "--val-subset", "70", "--no-progress",
                 "--device", "cpu"]) == 0
    for run in ("dnn", "tdnn"):
        _is_png(os.path.join(out, run, "curves.png"))
    _is_png(os.path.join(out, "curves.png"))
    assert "![curves](curves.png)" in open(os.path.join(out, "table.md")).read()
    assert not math.isnan(json.load(open(os.path.join(out, "table.json")))["rows"][0]["val_accuracy"])


def test_k_curve_png(tmp_path):
    from dnnrl.evaluate import plot_k_curve
    acc = {1: 0.5, 2: 0.55, 3: 0.6}
    plot_k_curve(acc, 3, "t", str(tmp_path / "k.png"))
    assert _is_png(str(tmp_path / "k.png"))[0] > 300
    plot_k_curve({"1": 0.5, "2": 0.4}, None, "no choice", str(tmp_path / "k2.png"))  # JSON keys are strings
    _is_png(str(tmp_path / "k2.png"))


def test_epoch_ticks_are_whole_numbers():
    """Two or three epochs put matplotlib's ticks at 1.25, 1.5, ... before: epochs are whole."""
    fig = draw_curves([("run", [_rec(1), _rec(2), _rec(3)])])
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
