"""The conda environment and the pip requirements pin the same packages at the same versions."""

import re
from pathlib import Path

import yaml

ENVS = Path(__file__).resolve().parents[1] / "envs"


def pins(lines):
    found = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)==([^\s#]+)\s*", line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def test_conda_env_pins_equal_pip_requirements():
    pip = pins((ENVS / "requirements.txt").read_text().splitlines())
    conda = yaml.safe_load((ENVS / "aoq.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pins(pip_section) == pip
    assert pip["torch"] == "2.13.0"  # the CPU wheel this project is developed against
