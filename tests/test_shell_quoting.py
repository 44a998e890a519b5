"""No string from the config or a path reaches a rule's shell as code: every field of every shell
command is quoted (`{x:q}`; a list becomes one shell word per element), so paths with spaces,
quotes or `$(...)` work and `;` or a newline runs nothing."""

import re
import string

import pytest

from tests.helpers import REPO, snakemake, tiny_config

RULES = sorted((REPO / "workflow" / "rules").glob("*.smk"))


def shell_commands(path):
    """(rule line, command text) of every `shell:` directive: the string literals that follow it."""
    lines = path.read_text().splitlines()
    commands = []
    for i, line in enumerate(lines):
        if line.strip() != "shell:":
            continue
        parts = []
        for follow in lines[i + 1 :]:
            literal = re.fullmatch(r'\s*"((?:[^"\\]|\\.)*)"\s*', follow)
            if not literal:
                break
            parts.append(literal.group(1))
        commands.append((i + 1, "".join(parts)))
    return commands


def test_every_rule_file_has_its_shell_commands_found():
    """The parser below sees every shell directive (a rule file without one would hide a miss)."""
    found = {path.name: len(shell_commands(path)) for path in RULES}
    assert found == {
        "data.smk": 3,
        "evaluate.smk": 1,
        "mining.smk": 4,
        "released.smk": 1,
        "report.smk": 1,
        "train.smk": 1,
        "common.smk": 0,
        "validate.smk": 0,
    }
    assert all(command for path in RULES for _, command in shell_commands(path))


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_every_field_of_every_shell_command_is_quoted(path):
    unquoted = [
        f"{path.name}:{line}: {{{field}}}"
        for line, command in shell_commands(path)
        for _, field, spec, _ in string.Formatter().parse(command)
        if field is not None and not (spec or "").endswith("q")
    ]
    assert not unquoted, "unquoted shell fields: " + ", ".join(unquoted)


HOSTILE_FOLDERS = {
    "space and quotes": 'demo data/it\'s "quoted"',
    "command substitution": "x$(touch PWNED_SUBST)y",
    "backticks": "x`touch PWNED_TICK`y",
}


@pytest.mark.workflow
def test_hostile_config_paths_work_and_run_nothing(tmp_path):
    """The audit's repro: dataset.path and vocab_json holding spaces, quotes, $(...) and backticks.
    The data are generated, prepared with the given vocabulary and a model trained at those
    paths; no command hidden in them runs."""
    from pipeline_steps.data.text import build_vocab, vocab_json_text

    config = tiny_config()
    folder = tmp_path.joinpath(*HOSTILE_FOLDERS.values())
    vocab = folder.parent / "vocab; touch PWNED_SEMI.json"
    vocab.parent.mkdir(parents=True)
    words = ["a", "the", "on", "of", "in", "with", "and", "dog", "cat", "red", "blue", "big", "small"]
    vocab.write_text(vocab_json_text(build_vocab([words], 1)))
    config["dataset"].update(path=str(folder / "demo_precomp"), vocab_json=str(vocab))
    checkpoint = "results/demo_precomp/train/vsepp/baseline/seed0/model_best.pt"
    result = snakemake(tmp_path, config, checkpoint)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (folder / "demo_precomp" / "train_ims.npy").is_file() and (tmp_path / checkpoint).is_file()
    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.glob("PWNED*"))


@pytest.mark.workflow
@pytest.mark.parametrize(
    "name", ["a;touch PWNED_SEMI;b", "a\ntouch PWNED_NEWLINE\nb"], ids=["semicolon", "newline"]
)
def test_separators_in_a_path_run_nothing(tmp_path, name):
    """`;` and a newline in a path are characters of a file name, never command separators: the
    data step runs at that path (or Snakemake refuses the name), and no command runs."""
    config = tiny_config()
    config["dataset"].update(path=str(tmp_path / name / "demo_precomp"))
    snakemake(tmp_path, config, "--until", "make_demo_data")
    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.glob("PWNED*"))
    made = tmp_path / name / "demo_precomp" / "train_ims.npy"
    assert made.is_file() or not (tmp_path / name).exists()
