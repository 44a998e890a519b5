# What the configuration runs: workflow/plan.py, in plain Python. The rules read every path,
# input, flag and settings digest from PLAN.
import os
import sys

from plan import Plan, as_json, digest

# Steps run as `python -m pipeline_steps.<step>`: make the repository importable whatever the
# working directory (snakemake --directory, cluster jobs), and let `python` be the interpreter
# that runs Snakemake (e.g. .venv/bin/snakemake without an activated venv). A rule's conda
# environment (--sdm conda) still comes first, since activating it prepends its own bin folder.
REPO = os.path.abspath(os.path.join(workflow.basedir, ".."))
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.getenv("PYTHONPATH")])),
    PATH=os.pathsep.join([os.path.dirname(sys.executable), os.getenv("PATH", "")]),
)

PLAN = Plan(config, LOSS_VARIANTS)
# The folders every rule's paths start from.
DATASET, DATA, RESULTS, PREPARED = PLAN.dataset, PLAN.data, PLAN.results, PLAN.prepared
DS_PREFIX = PLAN.ds_prefix  # offline candidate files: i2t_<prefix>.npy, as the authors'


wildcard_constraints:
    **PLAN.wildcard_patterns(),


# A local run hands each GPU job its own devices through a GPU slot (pipeline_steps/gpu_slot.py),
# among resources.local_gpus devices (counted with nvidia-smi when null). SLURM assigns its own.
if config["resources"]["local_gpus"] is not None:
    os.environ.update(AOQ_LOCAL_GPUS=str(config["resources"]["local_gpus"]))
