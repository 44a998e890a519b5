"""Every step is a module with main(argv) and --help, runnable without Snakemake."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import pipeline_steps

STEPS = sorted(m.name for m in pkgutil.iter_modules(pipeline_steps.__path__) if not m.ispkg)
RULE_STEPS = {
    "make_demo_data",
    "prepare_data",
    "train",
    "extract_embeddings",
    "mine_candidates",
    "evaluate",
    "report",
}


def test_every_rule_has_its_step_module():
    assert RULE_STEPS <= set(STEPS)


@pytest.mark.parametrize("step", STEPS)
def test_help_exits_cleanly_and_module_has_a_docstring(step, capsys):
    module = importlib.import_module(f"pipeline_steps.{step}")
    assert module.__doc__ and "Example" in module.__doc__
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_python_dash_m_runs_a_step():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline_steps.evaluate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--evaluation" in result.stdout
