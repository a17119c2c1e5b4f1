"""Every virface-train, virface-search, virface-eval and run_search.py command in README.md parses with the real
parsers and makes a valid configuration, as pasted (continuation lines and all)."""
import os
import shlex

import pytest

from virface import evaluate
from virface.search import cli as search_cli
from virface.search.space import load_search_space, resolve_space
from virface.export import build_parser as export_parser
from virface.train import build_parser as train_parser
from virface.train import config_from_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("virface-train", "virface-search", "virface-eval", "virface-export")
# What else a README command line may start with (a line starting with an option is a broken paste).
OTHER_PROGRAMS = {"make", "pip", "python", "python3", "bash", "ray", "tensorboard", "optuna-dashboard", "git",
                  "cd", "export", "ls", "cat", "mkdir", "rsync", "scp", "curl", "kill", "while"}


def shell_commands(markdown: str) -> list[tuple[int, list[str]]]:
    """(line number, words) of every command in the ```bash blocks, continuations joined."""
    commands, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell") if not in_block else False
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]                       # VAR=value prefixes
        if words:
            commands.append((start, words))
    return commands


def virface_invocation(words: list[str]):
    """(parser name, argv) when ``words`` runs one of ours, else None."""
    if "--" in words and words[0] == "ray":
        words = words[words.index("--") + 1:]
    if words[0] in ("python", "python3") and len(words) > 1:
        if words[1].endswith("run_search.py"):
            return "search", words[2:]
        if words[1:3] == ["-m", "virface.train"]:
            return "train", words[3:]
        if words[1:3] == ["-m", "virface.evaluate"]:
            return "eval", words[3:]
    if words[0] in ENTRY_POINTS:
        return words[0].split("-")[1], words[1:]
    return None


COMMANDS = shell_commands(open(os.path.join(REPO, "README.md"), encoding="utf-8").read())


def test_the_readme_has_commands_of_every_entry_point():
    kinds = {virface_invocation(words)[0] for _, words in COMMANDS if virface_invocation(words)}
    assert kinds == {"train", "search", "eval", "export"}
    assert any(words[0] == "virface-search" for _, words in COMMANDS)
    assert any(words[:3] == ["ray", "job", "submit"] for _, words in COMMANDS)


@pytest.mark.parametrize("line,words", COMMANDS, ids=[f"README.md:{n}" for n, _ in COMMANDS])
def test_readme_command_parses(line, words, monkeypatch, tmp_path):
    assert words[0] in OTHER_PROGRAMS | set(ENTRY_POINTS), \
        f"README.md:{line}: {words[0]!r} is not a command (a broken line continuation?)"
    invocation = virface_invocation(words)
    if invocation is None:
        return
    kind, argv = invocation
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    # As a user of the installed package pastes it: from a folder that is not the checkout.
    monkeypatch.chdir(tmp_path)
    if kind == "train":
        config_from_args(train_parser().parse_args(argv))
    elif kind == "export":
        export_parser().parse_args(argv)
    elif kind == "eval":
        evaluate.config_from_args(evaluate.build_parser().parse_args(argv))
    else:
        args = search_cli.build_parser().parse_args(argv)
        options = search_cli.options_from_args(args)
        if options.space:
            # The space it names is found there too (a shipped space by name, not a checkout path).
            load_search_space(resolve_space(options.space), options.stage)
