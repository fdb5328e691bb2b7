"""tools/mutation_check.py's table stays in step with the code it mutates: a row whose
text no longer occurs exactly once would stop a mutation run after its ten-minute
baseline, so it is caught here, in a second."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table():
    spec = importlib.util.spec_from_file_location("mutation_check", os.path.join(REPO, "tools", "mutation_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MC = _table()


@pytest.mark.parametrize("row", MC.MUTANTS, ids=[m[0] for m in MC.MUTANTS])
def test_each_mutant_changes_one_place_of_an_existing_file(row):
    ident, path, text, repl, equivalent, *own_tests = row
    src = open(os.path.join(REPO, path)).read()
    assert src.count(text) == 1, "%s: its text occurs %d times in %s" % (ident, src.count(text), path)
    assert repl != text
    if path.endswith(".py"):  # a mutant that does not compile would be "killed" by the import error alone
        compile(src.replace(text, repl), path, "exec")
    for arg in (own_tests[0] if own_tests else MC.TESTS):
        if arg.startswith("tests/"):
            assert os.path.exists(os.path.join(REPO, arg)), "%s: no test file %s" % (ident, arg)


def test_mutant_names_are_unique():
    names = [m[0] for m in MC.MUTANTS]
    assert len(names) == len(set(names))


def test_a_cpp_mutant_is_rebuilt_away_before_the_next_mutant(tmp_path, monkeypatch):
    """After a C++ mutant the restored source is built again, so the next mutant does not
    run against the mutated extension (before, every later mutant did, and a Python mutant
    could be "killed" by the C++ one before it); a Python mutant needs no build."""
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "k.cpp").write_text("return a < b;\n")
    (tmp_path / "m.py").write_text("x = 1\n")
    calls = []

    def fake_run(cmd, cwd, log, env=None, timeout=None):
        calls.append(("build" if cmd == MC.BUILD else "test", (tmp_path / "csrc" / "k.cpp").read_text()))
        return 1 if cmd != MC.BUILD else 0
    monkeypatch.setattr(MC, "_run", fake_run)
    rc = MC.run_mutant(("cpp", "csrc/k.cpp", "a < b", "a <= b", None), str(tmp_path), str(tmp_path), {}, ["pt"], 9)
    assert rc == 1 and calls == [("build", "return a <= b;\n"), ("test", "return a <= b;\n"),
                                 ("build", "return a < b;\n")]
    calls.clear()
    assert MC.run_mutant(("py", "m.py", "x = 1", "x = 2", None), str(tmp_path), str(tmp_path), {}, ["pt"], 9) == 1
    assert [c[0] for c in calls] == ["test"] and (tmp_path / "m.py").read_text() == "x = 1\n"
