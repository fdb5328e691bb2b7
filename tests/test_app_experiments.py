"""dnnrl.experiments: the reduced-scale comparison driver (a tiny grid end to end, bad input)."""
import json

import pytest

from dnnrl.experiments import main, parse_setting, parse_variant

TINY = {"preset": "cpu", "image_size": 32, "width": 0.125, "batch_size": 28, "synthetic_train_per_class": 12,
        "synthetic_val_per_class": 4, "synthetic_test_per_class": 4, "monitor_gallery": 40, "k_max": 5,
        "eval_batch_size": 64, "device": "cpu"}


def test_two_ad_hoc_variants_run_and_are_summarised(tmp_path):
    sets = ["--set=%s=%s" % (k, json.dumps(v)) for k, v in TINY.items()]
    results = main(["--out", str(tmp_path), "--epochs", "2", "--grid", "none", *sets,
                    "--variant", 'semi={"mining": "semi_hard"}', "--variant", 'soft={"method": "dnn"}'])
    summary = json.load(open(tmp_path / "summary.json"))
    assert set(summary) == set(results) == {"semi", "soft"}
    for name, rec in summary.items():
        assert [e["epoch"] for e in rec["epochs"]] == [1, 2], name  # --epochs, no early stop
        assert 0 <= rec["val_accuracy"] <= 1
    assert summary["semi"]["config"] == {"mining": "semi_hard"}
    assert summary["semi"]["k"] is not None and summary["soft"]["k"] is None
    cfg = json.load(open(tmp_path / "semi" / "config.json"))
    assert cfg["mining"] == "semi_hard" and cfg["width"] == 0.125 and cfg["max_epochs"] == 2


def test_an_interrupted_variant_continues_where_it_stopped(tmp_path, monkeypatch):
    """Rerunning a grid after an interruption resumes the variant that was cut short (a
    fresh start would stop: its directory holds an unfinished run)."""
    import dnnrl.train
    real = dnnrl.train.train
    argv = ["--out", str(tmp_path), "--epochs", "2", "--grid", "none",
            *["--set=%s=%s" % (k, json.dumps(v)) for k, v in TINY.items()], "--variant", 'semi={"gamma": 0}']

    def interrupted(cfg, resume=False):  # Ctrl-C after the first epoch's checkpoint
        real(cfg, stop_after=1)
        raise KeyboardInterrupt
    monkeypatch.setattr(dnnrl.train, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(dnnrl.train, "train", real)
    results = main(argv)
    assert [e["epoch"] for e in results["semi"]["epochs"]] == [1, 2]
    assert "resumed" in open(tmp_path / "semi" / "run.log").read()


def test_variants_filter_selects_by_substring(tmp_path, monkeypatch):
    """--variants picks from the built-in grid by substring (training faked: only the
    selection and the configs it builds are under test here)."""
    import os
    import dnnrl.train
    ran = []

    def fake_train(cfg, resume=False):
        ran.append(cfg)
        os.makedirs(cfg.out, exist_ok=True)
        open(os.path.join(cfg.out, "log.jsonl"), "w").write('{"epoch": 1}\n')
        return {"val_accuracy": 0.5, "k": 3}

    monkeypatch.setattr(dnnrl.train, "train", fake_train)
    results = main(["--out", str(tmp_path), "--grid", "synthetic", "--variants", "gamma -2|random, semi"])
    assert set(results) == {"pk, batch_hard, gamma -2", "random, semi_hard, gamma 0"}
    by_gamma = {cfg.gamma: cfg for cfg in ran}
    assert by_gamma[-2.0].sampler == "pk" and by_gamma[0.0].mining == "semi_hard"


def test_parsers():
    assert parse_setting("lr=0.1") == ("lr", 0.1)
    assert parse_setting("data=some/dir") == ("data", "some/dir")
    assert parse_variant(' a b ={"gamma": -1}') == ("a b", {"gamma": -1})


@pytest.mark.parametrize("args,needle", [
    (["--set", "lr"], "--set: expected KEY=VALUE"),
    (["--set", "=3"], "--set: expected KEY=VALUE"),
    (["--variant", "x"], "--variant: expected NAME="),
    (["--variant", "x={bad json"], "--variant: expected NAME="),
    (["--variant", "x=[1, 2]"], "--variant: expected NAME="),
    (["--grid", "none"], "no variant to run"),
    (["--variants", "no such variant"], "no variant to run"),
])
def test_bad_arguments_name_the_option(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path)] + args)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
