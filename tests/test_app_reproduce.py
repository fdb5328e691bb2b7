"""`dnnrl reproduce`: three methods, one table; a rerun does not retrain."""
import json
import os

import pytest

from dnnrl.cli import main

TINY = ["--max-epochs", "1", "--epoch-batches", "2", "--train-subset", "280", "--val-subset", "70",
        "--no-progress", "--device", "cpu"]


def test_reproduce_writes_table_and_skips_finished_methods(tmp_path, capsys):
    out = str(tmp_path / "t2")
    assert main(["reproduce", "--out", out, "--method", "dnn", "--method", "dnnrl"] + TINY) == 0
    table = json.load(open(os.path.join(out, "table.json")))
    assert [r["method"] for r in table["rows"]] == ["dnn", "dnnrl"]  # paper order, not argument order
    for r in table["rows"]:
        assert 0.0 <= r["val_accuracy"] <= 1.0
        assert r["paper_test_accuracy"] == {"dnn": 0.6922, "dnnrl": 0.7060}[r["method"]]
    md = open(os.path.join(out, "table.md")).read()
    assert "DNNRL" in md and "70.60 %" in md
    stamp = os.path.getmtime(os.path.join(out, "dnn", "results.json"))
    capsys.readouterr()
    assert main(["reproduce", "--out", out, "--method", "dnn"] + TINY) == 0
    assert "not retrained" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "dnn", "results.json")) == stamp


def test_reproduce_help_lists_methods(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "--method" in capsys.readouterr().out


def test_reproduce_passes_the_triplet_options_through(tmp_path):
    """--mining / --softmax-weight reach the triplet methods and show in the table."""
    out = str(tmp_path / "joint")
    assert main(["reproduce", "--out", out, "--method", "dnnrl", "--mining", "easy_positive",
                 "--softmax-weight", "1", "--reduction", "mean", "--lr", "0.005"] + TINY) == 0
    cfg = json.load(open(os.path.join(out, "dnnrl", "config.json")))
    assert (cfg["mining"], cfg["softmax_weight"], cfg["reduction"], cfg["lr"]) == ("easy_positive", 1.0, "mean", 0.005)
    assert "easy_positive mining, + 1 x softmax (joint)" in open(os.path.join(out, "table.md")).read()


def test_reproduce_trains_methods_in_parallel_processes(tmp_path, capsys):
    out = str(tmp_path / "par")
    assert main(["reproduce", "--out", out, "--method", "dnn", "--method", "tdnn", "--jobs", "2"] + TINY) == 0
    assert "in 2 processes" in capsys.readouterr().out
    table = json.load(open(os.path.join(out, "table.json")))
    assert [r["method"] for r in table["rows"]] == ["dnn", "tdnn"]
    for r in table["rows"]:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and r["wall_seconds"] > 0
    capsys.readouterr()
    assert main(["reproduce", "--out", out, "--jobs", "0"] + TINY) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
