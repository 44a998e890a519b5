"""Adding an architecture is its file plus one line of models/registry.py: a copy of the
repository that gains only those plans, trains, mines with, evaluates and reports it, and refuses
an unknown key or a value of the wrong type of its config in one line (workflow/config_checks.py
checks an architecture the schema does not describe against its config dataclass)."""

import subprocess
import sys

import pytest

from tests.helpers import ENV, copy_of_the_repository, snakemake, tiny_config

pytestmark = pytest.mark.workflow

# The throwaway architecture: VSE++ with a gain on the image features, a config field of its own.
TOY = '''"""A throwaway architecture (tests/test_new_architecture.py)."""

from dataclasses import dataclass

from models.vsepp import VSEPP, VSEPPConfig


@dataclass
class ToyConfig(VSEPPConfig):
    image_gain: float = 1.0


class Toy(VSEPP):
    name = "toy"
    config_class = ToyConfig

    def encode_images(self, images):
        return super().encode_images(images * self.config.image_gain)
'''
REGISTRY_LINE = '    "toy": Architecture("models.toy:Toy", single_vector=True),\n'


def toy_config(**model):
    config = tiny_config()
    config["models"] = {"toy": {"arch": "toy", "embed_size": 16, "word_dim": 8, "image_gain": 2.0, **model}}
    config["mining"]["model"] = "toy"
    config["aoq"]["variants"] = ["adapoffquin"]
    return config


def test_an_architecture_added_as_a_file_and_a_registry_line_runs_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    copy_of_the_repository(repo)
    (repo / "models" / "toy.py").write_text(TOY)
    registry = repo / "models" / "registry.py"
    text = registry.read_text()
    anchor = '    "scan": Architecture('
    assert anchor in text
    registry.write_text(text.replace(anchor, REGISTRY_LINE + anchor))  # the one line

    work = tmp_path / "work"
    work.mkdir()
    for change, line in (
        ({"image_gian": 2.0}, "config: models.toy: unknown key 'image_gian'"),
        ({"image_gain": "high"}, "config: models.toy.image_gain: 'high' is not a float"),
        ({"image_gain": True}, "config: models.toy.image_gain: True is not a float"),
    ):
        refused = snakemake(work, toy_config(**change), "-n", repo=repo)
        output = (refused.stdout + refused.stderr).strip()
        assert refused.returncode != 0 and output.splitlines()[-1].startswith(line), output[-2000:]
        assert "Traceback" not in output

    result = snakemake(work, toy_config(), repo=repo)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = work / "results" / "demo_precomp"
    report = (results / "report" / "report.md").read_text()
    assert "| toy | baseline |" in report and "| toy | +AdapOffQuin |" in report
    assert (results / "candidates" / "toy" / "seed0" / "i2t_demo.npy").is_file()  # it mined
    log = (work / "logs" / "demo_precomp" / "train" / "toy_baseline_seed0.log").read_text()
    assert "model=toy variant=baseline" in log
    # Its own field reached the model: the checkpoint records the config it was built with.
    check = (
        "import torch; c = torch.load('results/demo_precomp/train/toy/baseline/seed0/model_best.pt', "
        "weights_only=True); print(c['model_config']['image_gain'], c['model_name'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=work, capture_output=True, text=True, env=ENV, check=True
    ).stdout.split()
    assert out == ["2.0", "toy"]
