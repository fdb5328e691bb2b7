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
    from dnnrl.reproduce import _secs
    for r in table["rows"]:  # the seconds per phase and the device, as the run recorded them
        res = json.load(open(os.path.join(out, r["method"], "results.json")))
        assert r["phases"] == res["training"]["phases"] and r["device_name"] == res["training"]["device_name"]
        ph = r["phases"]
        row = "| %s | %s | %s |" % ({"dnn": "DNN", "dnnrl": "DNNRL"}[r["method"]], r["device_name"], " | ".join(
            _secs(ph[k]) for k in ("setup_s", "train_s", "validate_s", "evaluate_s", "total_s")))
        assert row in md
    stamp = os.path.getmtime(os.path.join(out, "dnn", "results.json"))
    capsys.readouterr()
    assert main(["reproduce", "--out", out, "--method", "dnn"] + TINY) == 0
    said = capsys.readouterr().out
    assert "not retrained" in said and "it was trained with" not in said
    assert os.path.getmtime(os.path.join(out, "dnn", "results.json")) == stamp
    # other options than the finished run's: still not retrained, but it says which differ
    assert main(["reproduce", "--out", out, "--method", "dnn", "--lr", "0.5"] + TINY) == 0
    assert "dnn: results.json exists, not retrained (--force to retrain); it was trained with lr 0.001 " \
           "where this command gives 0.5" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "dnn", "results.json")) == stamp
    # the table says which data it is: the synthetic set here, whose numbers the paper's do not compare with
    assert "data: the built-in synthetic set, not FER-2013" in md


def test_reproduce_help_lists_methods(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    assert "--method" in capsys.readouterr().out


def test_reproduce_passes_the_triplet_options_through(tmp_path):
    """--mining / --softmax-weight / --erase / --label-smoothing reach the triplet methods and
    show in the table."""
    out = str(tmp_path / "joint")
    assert main(["reproduce", "--out", out, "--method", "dnnrl", "--mining", "easy_positive",
                 "--softmax-weight", "1", "--reduction", "mean", "--lr", "0.005", "--erase", "0.25",
                 "--label-smoothing", "0.1"] + TINY) == 0
    cfg = json.load(open(os.path.join(out, "dnnrl", "config.json")))
    assert (cfg["mining"], cfg["softmax_weight"], cfg["reduction"], cfg["lr"]) == ("easy_positive", 1.0, "mean", 0.005)
    assert (cfg["erase"], cfg["label_smoothing"]) == (0.25, 0.1)
    assert ("easy_positive mining, + 1 x softmax (joint), erase 0.25, label smoothing 0.1"
            in open(os.path.join(out, "table.md")).read())


def test_table_names_say_what_a_run_used_beyond_the_paper():
    from dnnrl.reproduce import _variant
    assert _variant("dnn", {}) == "" and _variant("dnn", {"mining": "semi_hard"}) == ""
    assert _variant("dnn", {"erase": 0.5, "label_smoothing": 0.1}) == " [erase 0.5, label smoothing 0.1]"
    # a pure triplet run has no softmax head for label smoothing to act on
    assert _variant("tdnn", {"mining": "batch_hard", "label_smoothing": 0.1}) == " [batch_hard mining]"


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


def test_every_passthrough_option_is_a_config_field_and_a_flag():
    import argparse
    import dataclasses
    from dnnrl.config import Config
    from dnnrl.reproduce import _PASSTHROUGH, add_reproduce_parser
    sub = argparse.ArgumentParser().add_subparsers()
    dests = {a.dest for a in add_reproduce_parser(sub)._actions}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(_PASSTHROUGH) <= fields and set(_PASSTHROUGH) <= dests


def test_reproduce_passes_schedule_budget_and_augmentation(tmp_path):
    out = str(tmp_path / "sched")
    assert main(["reproduce", "--out", out, "--method", "dnn", "--schedule", "cosine", "--time-budget", "600",
                 "--flip", "on", "--tta", "flip", "--lr-min", "0.001", "--weight-decay", "0.0001"] + TINY) == 0
    cfg = json.load(open(os.path.join(out, "dnn", "config.json")))
    assert (cfg["schedule"], cfg["time_budget"], cfg["flip"], cfg["tta"], cfg["lr_min"], cfg["weight_decay"]) == \
        ("cosine", 600.0, True, "flip", 0.001, 0.0001)


def test_table_says_why_each_run_stopped(tmp_path):
    out = str(tmp_path / "why")
    assert main(["reproduce", "--out", out, "--method", "dnn"] + TINY) == 0
    table = json.load(open(os.path.join(out, "table.json")))
    assert table["rows"][0]["stopped_by"] == "max_epochs"
    assert "| max_epochs |" in open(os.path.join(out, "table.md")).read()


def test_table_columns_are_val_ours_test_ours_test_paper():
    from dnnrl.reproduce import format_table
    row = {"method": "dnnrl", "name": "DNNRL", "val_accuracy": 0.61, "test_accuracy": 0.62,
           "paper_test_accuracy": 0.706, "k": 7, "epochs": 3, "stopped_by": "patience", "train_seconds": 12.5,
           "images_per_s": 999.0}
    header, _, line = format_table([row]).splitlines()
    assert header.split(" | ")[1:4] == ["val accuracy (ours)", "test accuracy (ours)", "test accuracy (paper)"]
    assert line == "| DNNRL | 61.00 % | 62.00 % | 70.60 % | 7 | 3 | patience | 12.5 | 999 |"


def test_reproduce_resumes_an_interrupted_method_and_starts_a_new_one(tmp_path, monkeypatch):
    """Rerunning the command after an interruption continues the interrupted method from its
    checkpoint (its finished epoch is kept, not trained again); a method with no run yet
    starts fresh."""
    from dnnrl import train as train_mod
    out = str(tmp_path / "t2")
    real_train, calls = train_mod.train, []

    def interrupted(cfg, resume=False, **kw):
        calls.append((cfg.method, resume))
        return real_train(cfg, resume=resume, stop_after=1, **kw)
    monkeypatch.setattr(train_mod, "train", interrupted)
    # "killed" after epoch 1 of 2: no results.json to tabulate, which the command says
    assert main(["reproduce", "--out", out, "--method", "dnn"] + TINY[:1] + ["2"] + TINY[2:]) != 0
    first = json.loads(open(os.path.join(out, "dnn", "log.jsonl")).readline())

    def recording(cfg, resume=False, **kw):
        calls.append((cfg.method, resume))
        return real_train(cfg, resume=resume, **kw)
    monkeypatch.setattr(train_mod, "train", recording)
    assert main(["reproduce", "--out", out, "--method", "dnn", "--method", "dnnrl"] + TINY[:1] + ["2"] + TINY[2:]) == 0
    assert calls == [("dnn", False), ("dnn", True), ("dnnrl", False)]
    log = [json.loads(x) for x in open(os.path.join(out, "dnn", "log.jsonl"))]
    assert [r["epoch"] for r in log] == [1, 2] and log[0] == first  # epoch 1 kept as it was
