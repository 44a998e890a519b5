"""The layering the README promises: imports go one way, benchmarks -> pipeline_steps -> models ->
accel; steps never import each other; no file names a path of a development machine."""

import ast
import re
import subprocess

import pytest

from tests.helpers import REPO

LAYERS = ["benchmarks", "pipeline_steps", "models", "accel"]  # each may import only those after it


def imported_packages(path):
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_go_one_way(layer):
    allowed = set(LAYERS[LAYERS.index(layer) :])
    for path in (REPO / layer).rglob("*.py"):
        upward = imported_packages(path) & (set(LAYERS) - allowed)
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)}"


def test_steps_never_import_each_other():
    steps = {p.stem for p in (REPO / "pipeline_steps").glob("*.py") if p.stem != "__init__"}
    for path in (REPO / "pipeline_steps").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("pipeline_steps",):
                assert not {a.name for a in node.names} & steps, path
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline_steps."):
                assert node.module.split(".")[1] not in steps, (path, node.module)


def test_no_file_names_a_development_machines_path():
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    # Assembled from parts so that this check's own source holds no such citation (the file is
    # skipped all the same: it names the machine folders it looks for).
    pattern = re.compile(
        "|".join([r"/work/(?:main|shared)", "shared" + "/spec", r"\.\./" + "shared", "/root/", r"/home/\w+/"])
    )
    for name in files:
        path = REPO / name
        if path.is_file() and path.suffix not in (".png", ".npy", ".pt") and name != "tests/test_layout.py":
            hits = pattern.findall(path.read_text(errors="replace"))
            assert not hits, f"{name}: {hits}"
