"""The workflow through a real one-node SLURM cluster and the SLURM profile (marker `slurm`).

scripts/slurm_local.sh brings the cluster up (munge, slurmctld, slurmd; needs root and apt-get, and
the tests are skipped, saying why, where it cannot) and stops it by PID files at the end. The tiny
demo DAG of test_workflow.py runs through workflow/profiles/slurm and locally: every job must have
been a SLURM job with the CPUs, memory and time limit its rule declares, and the results must equal
the local run's. A failing rule must fail the run, promptly.

    .venv/bin/python -m pytest -q -m slurm -rs tests/test_slurm.py
"""

import collections
import json
import os
import re
import subprocess
import time

import numpy as np
import pytest
import torch

from tests.helpers import ENV, REPO, SNAKEFILE, SNAKEMAKE, snakemake, tiny_config, write_config

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "scripts" / "slurm_local.sh"
PROFILE = REPO / "workflow" / "profiles" / "slurm"
# Test-only settings on top of the profile: this cluster has no job accounting, so job states come
# from squeue (slurm_local.sh keeps finished jobs visible for 10 minutes); a first status check
# after 1 s instead of 40 keeps the DAG quick; no account to guess; SLURM logs kept to inspect.
TEST_FLAGS = [
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--slurm-no-account",
    "--slurm-keep-successful-logs",
]
# Both runs give each job the same threads (the node has 2 CPUs), hence the same numbers.
THREADS = ["--max-threads", "2"]
RULE_CLASS = {
    "make_demo_data": "light",
    "prepare_data": "data",
    "train": "train",
    "extract_embeddings": "extract",
    "mine_candidates": "mine",
    "audit_mining": "mine",  # CPU only, sized like the mining it audits
    "evaluate": "evaluate",
    "report": "light",
}


def run(*args, timeout):
    """Snakemake under `timeout`: (result, seconds)."""
    cmd = ["timeout", "-k", "30", str(timeout)] + SNAKEMAKE + [str(a) for a in args]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, env=ENV)
    return result, time.monotonic() - start


def slurm_jobs(result):
    """{job id: fields} of the SLURM jobs this Snakemake run submitted (named by its run ID)."""
    run_id = re.search(r"SLURM run ID: (\S+)", result.stdout + result.stderr).group(1)
    listing = subprocess.run(
        ["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True
    ).stdout
    jobs = {}
    for line in listing.splitlines():
        fields = dict(
            re.findall(
                r"(?:^| )(JobId|JobName|JobState|ExitCode|NumCPUs|MinMemoryNode|"
                r"TimeLimit|Comment)=(\S*)",
                line,
            )
        )
        if fields.get("JobName") == run_id:
            fields["rule"] = fields["Comment"].removeprefix("rule_").split("_wildcards_")[0]
            jobs[fields["JobId"]] = fields
    return jobs


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("SLURM test skipped: root is needed to install and start munge and SLURM")
    try:
        start = time.monotonic()
        up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=900)
        if up.returncode != 0:
            pytest.skip(
                "SLURM test skipped: the local cluster could not be started: "
                + (up.stdout + up.stderr).strip()[-1500:]
            )
        print(f"\n{up.stdout.strip()} ({time.monotonic() - start:.0f} s)")
        yield
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The tiny DAG locally and through SLURM: (local workdir, SLURM workdir, SLURM result)."""
    config = tiny_config()
    local, remote = tmp_path_factory.mktemp("local"), tmp_path_factory.mktemp("slurm")
    done, local_s = run(
        "-s",
        SNAKEFILE,
        "--directory",
        local,
        "--configfile",
        write_config(local, config),
        "--cores",
        "2",
        *THREADS,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    done, slurm_s = run(
        "-s",
        SNAKEFILE,
        "--directory",
        remote,
        "--configfile",
        write_config(remote, config),
        "--profile",
        PROFILE,
        *THREADS,
        *TEST_FLAGS,
        timeout=900,
    )
    print(f"\nlocal run {local_s:.0f} s, SLURM run {slurm_s:.0f} s")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return local, remote, done


def test_every_job_ran_as_a_slurm_job_with_its_declared_resources(runs, tmp_path):
    _, remote, done = runs
    jobs = slurm_jobs(done)
    # What Snakemake plans for the same config: one SLURM job per job, with its threads as CPUs.
    plan = snakemake(tmp_path, tiny_config(), "-n", *THREADS).stdout
    planned = collections.Counter()
    for block in re.split(r"^rule ", plan, flags=re.M)[1:]:
        threads = re.search(r"^\s+threads: (\d+)$", block, re.M)
        planned[block.split(":", 1)[0], threads.group(1) if threads else "1"] += 1
    del planned["all", "1"]  # the target: no job to run
    assert collections.Counter((j["rule"], j["NumCPUs"]) for j in jobs.values()) == planned
    config = tiny_config()["resources"]
    for job in jobs.values():
        wanted = config[RULE_CLASS[job["rule"]]]
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job
        assert job["MinMemoryNode"] == f"{wanted['mem_mb']}M", job
        assert job["TimeLimit"] == f"00:{wanted['runtime']:02d}:00", job
    # The plugin's own record: one SLURM log per job, named by the job id.
    logs = {p.stem for p in (remote / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert logs == set(jobs)


def test_results_equal_the_local_run(runs):
    local, remote, _ = runs
    files = sorted(p.relative_to(local) for p in (local / "results").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(remote) for p in (remote / "results").rglob("*") if p.is_file())
    assert any(f.suffix == ".json" for f in files) and any(f.suffix == ".pt" for f in files)
    for name in files:
        a, b = local / name, remote / name
        if name.suffix == ".pt":  # zip archives name their temporary file: compare the contents
            a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            weights_a, weights_b = a.pop("state_dict"), b.pop("state_dict")
            assert a == b, name
            assert weights_a.keys() == weights_b.keys(), name
            assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a), name
        elif name.suffix == ".h5":  # HDF5 stamps creation times: compare datasets and attributes
            import h5py

            with h5py.File(a) as fa, h5py.File(b) as fb:
                assert dict(fa.attrs) == dict(fb.attrs), name
                assert fa.keys() == fb.keys(), name
                # Once (of several runs) a caption embedding differed by one float32 ulp; what
                # depends on it (candidates, AOQ checkpoints, metrics) was identical.
                assert all(np.allclose(fa[k][()], fb[k][()], rtol=0, atol=1e-6) for k in fa), name
        elif name.suffix == ".json":
            assert json.loads(a.read_text()) == json.loads(b.read_text()), name
        else:  # report.csv, report.md, curves.png, val_log.csv, npy, npz, the demo data
            assert a.read_bytes() == b.read_bytes(), name


FAILING_WORKFLOW = """
rule all:
    input:
        "second.txt",


rule first:
    output:
        "first.txt",
    log:
        "first.log",
    resources:
        mem_mb=200,
        runtime=2,
    shell:
        "echo fine > {output} 2> {log}"


rule second:
    input:
        "first.txt",
    output:
        "second.txt",
    log:
        "second.log",
    resources:
        mem_mb=200,
        runtime=2,
    shell:
        "echo failing on purpose > {log}; exit 1"
"""


def test_a_failing_rule_fails_the_run_without_hanging(cluster, tmp_path):
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(FAILING_WORKFLOW)
    done, seconds = run(
        "-s", snakefile, "--directory", tmp_path, "--profile", PROFILE, *TEST_FLAGS, timeout=300
    )
    print(f"\nfailing run ended after {seconds:.0f} s")
    assert done.returncode not in (0, 124, 137), (done.stdout + done.stderr)[-3000:]  # not timed out
    assert seconds < 180
    assert "SLURM status is: 'FAILED'" in done.stdout + done.stderr
    assert (tmp_path / "first.txt").exists() and not (tmp_path / "second.txt").exists()
    states = {j["rule"]: j["JobState"] for j in slurm_jobs(done).values()}
    assert states == {"first": "COMPLETED", "second": "FAILED"}
