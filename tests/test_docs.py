"""The commands the README and docs/ show still parse, and the scripts they name exist.

A user copies these lines; an option the CLI renamed would fail for them and for no
test. Each `dnnrl ...` command (in shell blocks and in inline code) goes through the
real parser; each `python3 X.py` / `bash X.sh` names a file of the repository.
Nothing is run.
"""
import glob
import os
import re
import shlex

import pytest

from dnnrl.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "benchmarks/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_INLINE = re.compile(r"`((?:python3 -m )?dnnrl [^`]+)`")
_INLINE_SCRIPT = re.compile(r"`(?:python3|python|bash) ([\w./-]+\.(?:py|sh))\b")
_ASSIGN = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)=(.*)$')


def _shell_commands(text: str):
    """Simple commands of a shell block: continuations joined, VAR="..." lines
    substituted into later lines, split at && ; | outside quotes."""
    variables = {}
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        whole = shlex.split(line, comments=True)
        if len(whole) == 1 and _ASSIGN.match(whole[0]):  # A="..." on a line of its own
            name, value = _ASSIGN.match(whole[0]).groups()
            variables[name] = value
            continue
        for name, value in variables.items():
            line = line.replace("$" + name, value)
        lexer = shlex.shlex(line, posix=True, punctuation_chars="&;|")
        lexer.whitespace_split = True
        tokens = []
        for token in list(lexer) + [";"]:
            if token.strip("&;|"):
                tokens.append(token)
                continue
            while tokens and _ASSIGN.match(tokens[0]):  # FOO=1 cmd
                tokens.pop(0)
            if tokens:
                yield tokens
            tokens = []


def _dnnrl_argv(tokens):
    """The arguments after `dnnrl` / `python3 -m dnnrl` / `torchrun ... -m dnnrl`, else None."""
    if tokens[0] == "dnnrl":
        return tokens[1:]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "dnnrl" and tokens[0] in ("python3", "python", "torchrun"):
            return tokens[i + 2:]
    return None


def _collect():
    """(doc, argv) of whole commands in shell blocks, (doc, argv) of inline mentions
    (often partial: `dnnrl eval --tta MODE`), (doc, path) of scripts run."""
    commands, mentions, scripts = [], [], []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        for lang, block in _FENCE.findall(text):
            if lang not in ("", "bash", "sh", "console"):
                continue
            for tokens in _shell_commands(block):
                argv = _dnnrl_argv(tokens)
                if argv is not None:
                    commands.append((doc, argv))
                elif tokens[0] in ("python3", "python", "bash") and len(tokens) > 1 and tokens[1] != "-m":
                    scripts.append((doc, tokens[1]))
        mentions += [(doc, _dnnrl_argv(inline.split())) for inline in _INLINE.findall(text)]
        scripts += [(doc, path) for path in _INLINE_SCRIPT.findall(text)]
    return commands, mentions, sorted(set(scripts))


COMMANDS, MENTIONS, SCRIPTS = _collect()
_SUBPARSERS = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices
_TOP_OPTIONS = build_parser()._option_string_actions


def test_the_docs_show_commands_at_all():
    # the collector itself: a regex that stopped matching would make the tests below vacuous
    assert len(COMMANDS) >= 10 and len(MENTIONS) >= 30 and len(SCRIPTS) >= 10
    assert {doc for doc, _ in COMMANDS} >= {"README.md", "docs/app.md", "docs/distributed.md"}
    assert any(argv[:1] == ["reproduce"] for _, argv in COMMANDS)


@pytest.mark.parametrize("doc, argv", COMMANDS, ids=["%s: %s" % (d, " ".join(a)[:60]) for d, a in COMMANDS])
def test_documented_dnnrl_command_parses(doc, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail("%s shows `dnnrl %s`, which the CLI rejects (exit %s)" % (doc, " ".join(argv), e.code))


def test_options_mentioned_in_the_text_exist():
    """Inline mentions are often partial (`dnnrl eval --tta MODE`), so only their
    sub-command and option names are checked, exactly (no argparse prefix matching)."""
    unknown = []
    for doc, argv in MENTIONS:
        sub = _SUBPARSERS.get(argv[0])
        if argv[0].startswith("--"):  # an option of `dnnrl` itself (`dnnrl --version`)
            if argv[0] not in _TOP_OPTIONS:
                unknown.append("%s: dnnrl %s" % (doc, argv[0]))
            continue
        if sub is None:  # `dnnrl train / eval / ...`, `dnnrl train: error: ...`
            assert not re.fullmatch(r"[a-z]+", argv[0]), "%s mentions `dnnrl %s`" % (doc, argv[0])
            continue
        for token in argv[1:]:
            option = token.split("=")[0].rstrip(",.;:)")
            if option.startswith("--") and option not in sub._option_string_actions:
                unknown.append("%s: dnnrl %s %s" % (doc, argv[0], option))
    assert not unknown, "options the CLI does not have: %s" % unknown


@pytest.mark.parametrize("doc, path", SCRIPTS, ids=["%s: %s" % s for s in SCRIPTS])
def test_documented_script_exists(doc, path):
    assert os.path.isfile(os.path.join(ROOT, path)), "%s runs %s, which does not exist" % (doc, path)


def test_a_renamed_option_would_be_caught():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--no-such-option", "1"])
    assert list(_shell_commands('A="--lr 0.1 --flip on"\nFOO=1 dnnrl train $A && echo x\n')) == [
        ["dnnrl", "train", "--lr", "0.1", "--flip", "on"], ["echo", "x"]]
