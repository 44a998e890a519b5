"""The workflow's plan (workflow/plan.py) in-process, without Snakemake: which runs exist, which
settings each output depends on (the digests that make Snakemake rerun it), and where every
artifact lies. Each expectation is written out by hand for a small config. The wiring of the plan
into the rules is tested through real Snakemake runs in test_workflow.py and test_config.py."""

import copy
from types import SimpleNamespace

from plan import digest

from tests.helpers import planned, refusal, tiny_config


def one_model(**changes):
    config = tiny_config()
    config["aoq"]["variants"] = ["adapoffquin"]
    config["run"].update(seeds=[0, 1, 2], ensemble_seeds=[0, 1])
    for section, values in changes.items():
        config[section].update(values)
    return config


def run_digests(plan):
    return {run: digest(plan.run_settings(*run)) for run in plan.trained_runs()}


def test_runs_and_evaluated_sets_of_a_small_config():
    plan = planned(one_model())
    assert plan.trained_runs() == [
        ("vsepp", method, seed) for method in ("baseline", "adapoffquin") for seed in (0, 1, 2)
    ]
    assert plan.evaluated_sets("vsepp") == ["seed0", "seed1", "seed2", "ensemble"]
    assert plan.set_seeds("vsepp", "ensemble") == [0, 1]
    assert plan.set_seeds("vsepp", "seed2") == [2]
    assert plan.evaluated_checkpoints("vsepp", "adapoffquin", "ensemble") == [
        "results/demo_precomp/train/vsepp/adapoffquin/seed0/model_best.pt",
        "results/demo_precomp/train/vsepp/adapoffquin/seed1/model_best.pt",
    ]
    # One ensemble seed is no ensemble row.
    assert planned(one_model(run={"ensemble_seeds": [0]})).evaluated_sets("vsepp") == [
        "seed0",
        "seed1",
        "seed2",
    ]


def test_an_ensemble_of_two_models_keeps_their_common_seeds_and_methods():
    config = one_model()
    config["models"]["small"] = {"arch": "vsepp", "embed_size": 8, "word_dim": 8, "seeds": [1, 2]}
    config["models"]["small"]["variants"] = []
    config["ensembles"] = {"both": ["vsepp", "small"]}
    plan = planned(config)
    assert plan.common_seeds("both") == [1, 2]
    assert plan.ensemble_seeds("both") == []  # only seed 1 of run.ensemble_seeds is common
    assert plan.ensemble_variants("both") == ["baseline"]
    assert ("both", "baseline", "seed1") in plan.evaluated_runs()
    assert not [run for run in plan.evaluated_runs() if run[0] == "both" and run[1] != "baseline"]
    assert plan.evaluated_checkpoints("both", "baseline", "seed2") == [
        "results/demo_precomp/train/vsepp/baseline/seed2/model_best.pt",
        "results/demo_precomp/train/small/baseline/seed2/model_best.pt",
    ]


def test_a_setting_enters_the_digest_of_exactly_the_outputs_that_depend_on_it():
    config = one_model()
    plan = planned(config)
    before = run_digests(plan)
    before_mining = digest(plan.mining_settings("vsepp", 0))
    before_report = digest(plan.report_settings())

    config["aoq"]["loss"]["beta"] = 2.0  # an AOQ hyperparameter: AOQ runs only
    after = run_digests(planned(config))
    assert {run for run in before if before[run] != after[run]} == {
        run for run in before if run[1] == "adapoffquin"
    }
    assert digest(planned(config).mining_settings("vsepp", 0)) == before_mining
    assert digest(planned(config).report_settings()) != before_report

    config = one_model()
    config["baseline"]["train"]["learning_rate"] = 1e-3  # the baseline mines: every run
    after = run_digests(planned(config))
    assert all(before[run] != after[run] for run in before)
    assert digest(planned(config).mining_settings("vsepp", 0)) != before_mining

    config = one_model()
    config["mining"]["block_mb"] = 7  # how mining is computed, not what: nothing
    assert run_digests(planned(config)) == before


def test_the_baseline_gets_only_its_own_loss_settings():
    plan = planned(one_model())
    assert plan.loss_section("baseline") == {"variant": "baseline", "margin_online": 0.2}
    assert plan.loss_section("adapoffquin_round2")["variant"] == "adapoffquin"
    assert plan.loss_section("adapoffquin")["beta"] == 1.5


def test_excluding_duplicates_enters_the_settings_only_when_on():
    """Results mined before mining.exclude existed stay current with the default (off)."""
    off = planned(one_model())
    assert "exclude" not in off.mining_settings("vsepp", 0)
    assert not off.exclude_duplicates
    on = planned(one_model(mining={"exclude": "duplicate_captions"}))
    assert on.mining_settings("vsepp", 0)["exclude"] == "duplicate_captions"
    assert digest(on.run_settings("vsepp", "baseline", 0)) == digest(off.run_settings("vsepp", "baseline", 0))
    assert digest(on.run_settings("vsepp", "adapoffquin", 0)) != digest(
        off.run_settings("vsepp", "adapoffquin", 0)
    )


def test_tensorboard_reaches_the_flags_of_the_runs_that_ask_and_no_digest():
    config = one_model()
    config["aoq"]["train"]["tensorboard"] = True
    original = copy.deepcopy(config)
    plan = planned(config)
    assert config == original  # the plan works on its own copy: Snakemake's config is untouched
    assert run_digests(plan) == run_digests(planned(one_model()))
    for model, method, seed in plan.trained_runs():
        assert "tensorboard" not in plan.train_section(model, method)
        flags = plan.tensorboard_flags(SimpleNamespace(model=model, variant=method, seed=seed))
        expected = (
            []
            if method == "baseline"
            else ["--tensorboard-dir", f"logs/demo_precomp/tensorboard/vsepp/{method}/seed{seed}"]
        )
        assert flags == expected


def test_a_later_round_mines_with_the_previous_rounds_adapoffquin_and_may_start_from_it():
    config = one_model(mining={"rounds": 2, "warm_start": True})
    plan = planned(config)
    assert plan.variants_of("vsepp") == ["baseline", "adapoffquin", "adapoffquin_round2"]
    assert plan.candidate_folder(2, 1) == "results/demo_precomp/candidates/vsepp/adapoffquin/seed1"
    job = SimpleNamespace(model="vsepp", variant="adapoffquin_round2", seed="1")
    inputs = plan.train_inputs(job)
    assert inputs["i2t"] == "results/demo_precomp/candidates/vsepp/adapoffquin/seed1/i2t_demo.npy"
    assert inputs["init"] == "results/demo_precomp/train/vsepp/adapoffquin/seed1/model_best.pt"
    round1 = plan.train_inputs(SimpleNamespace(model="vsepp", variant="adapoffquin", seed="1"))
    assert round1["i2t"] == "results/demo_precomp/candidates/vsepp/seed0/i2t_demo.npy"  # mining.seed 0
    assert "init" not in round1
    settings = plan.run_settings("vsepp", "adapoffquin_round2", 1)
    assert settings["warm_start"] == plan.run_settings("vsepp", "adapoffquin", 1)
    assert settings["candidates"]["miner"] == plan.run_settings("vsepp", "adapoffquin", 1)
    assert plan.wildcard_patterns()["miner"] == "|adapoffquin/|adapoffquin_round2/"
    # Every round's candidate set is audited: round 1 once, round 2 per seed.
    audited = {p.rsplit("/", 1)[0] for p in plan.audit_outputs()}
    assert audited == {"results/demo_precomp/candidates/vsepp/seed0"} | {
        f"results/demo_precomp/candidates/vsepp/adapoffquin/seed{s}" for s in (0, 1, 2)
    }


def test_the_default_target_names_every_artifact_once():
    plan = planned(one_model())
    outputs = plan.inspected_outputs()
    assert len(outputs) == len(set(outputs))
    for model, method, seed in plan.trained_runs():
        for name in ("model_best.pt", "model_last.pt", "val_log.csv"):
            assert f"results/demo_precomp/train/{model}/{method}/seed{seed}/{name}" in outputs
    folder = "results/demo_precomp/candidates/vsepp/seed0"
    for path in ("i2t_demo.npy", "t2i_demo.npy", "audit.json", "audit.png"):
        assert f"{folder}/{path}" in outputs
    assert "results/demo_precomp/embeddings/vsepp/seed0/train.h5" in outputs
    n_evaluated = 2 * 4  # (baseline, adapoffquin) x (seed0, seed1, seed2, ensemble)
    assert len([p for p in outputs if "/eval/" in p]) == n_evaluated * 3 * 2  # 3 evaluations, json + ranks
    assert outputs[-6:] == plan.report_outputs()


def test_a_baseline_only_config_mines_nothing():
    config = one_model()
    config["aoq"]["variants"] = []
    plan = planned(config)
    assert plan.audit_outputs() == [] and plan.mining_outputs() == []
    assert plan.largest_offline_size() == 1
    assert {method for _, method, _ in plan.trained_runs()} == {"baseline"}


def test_gpu_jobs_run_in_a_slot_and_several_gpus_train_with_torchrun():
    cpu = planned(one_model())
    assert cpu.step_command("train", "pipeline_steps.train") == ["python", "-m", "pipeline_steps.train"]
    config = one_model()
    config["resources"]["gpus_per_job"] = 1
    config["resources"]["train"]["gpus"] = 2
    gpu = planned(config)
    slot = ["python", "-m", "pipeline_steps.gpu_slot", "--gpus"]
    assert gpu.step_command("evaluate", "m") == [*slot, "1", "--", "python", "-m", "m"]
    assert gpu.step_command("train", "m")[:6] == [*slot, "2", "--"]
    assert gpu.step_command("train", "m")[6:] == [
        "python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "m"
    ]  # fmt: skip
    assert gpu.job_resources("train")["gpu"] == 2 and "gpu" not in gpu.job_resources("light")


def test_aoq_can_start_from_the_baselines_warmup():
    """aoq.start_from: baseline_warmup. Each seed's baseline is also trained up to the end of its
    warm-up (a run of its own); the round-1 AOQ runs of that seed start from its last checkpoint,
    and their settings name it. Runs from scratch keep their digests."""
    config = one_model()
    config["baseline"]["train"]["max_violation_warmup_epochs"] = 2
    scratch = planned(config)
    config["aoq"]["start_from"] = "baseline_warmup"
    plan = planned(config)
    assert "baseline_warmup" in plan.methods and "baseline_warmup" not in scratch.methods
    assert plan.warmup_runs() == [("vsepp", "baseline_warmup", s) for s in (0, 1, 2)]
    assert plan.trained_runs() == scratch.trained_runs()  # evaluated and reported: unchanged
    warmup = plan.train_section("vsepp", "baseline_warmup")
    assert warmup == plan.train_section("vsepp", "baseline") | {"epochs": 2}
    assert plan.loss_section("baseline_warmup") == plan.loss_section("baseline")
    job = SimpleNamespace(model="vsepp", variant="adapoffquin", seed="1")
    inputs = plan.train_inputs(job)
    assert inputs["init"] == "results/demo_precomp/train/vsepp/baseline_warmup/seed1/model_last.pt"
    assert "i2t" in inputs
    warmup_inputs = plan.train_inputs(SimpleNamespace(model="vsepp", variant="baseline_warmup", seed="1"))
    assert set(warmup_inputs) == {"ims", "ids", "manifest"}  # no candidates, no start
    assert plan.run_settings("vsepp", "adapoffquin", 1)["start"] == plan.run_settings(
        "vsepp", "baseline_warmup", 1
    )
    assert "candidates" not in plan.run_settings("vsepp", "baseline_warmup", 1)
    before, after = run_digests(scratch), run_digests(plan)
    assert {run for run in before if before[run] != after[run]} == {
        run for run in before if run[1] != "baseline"
    }
    assert "results/demo_precomp/train/vsepp/baseline_warmup/seed2/model_last.pt" in plan.inspected_outputs()
    # The flags the train rule passes: the candidates, then the checkpoint to start from.
    job_input = SimpleNamespace(keys=lambda: inputs.keys(), **inputs)
    assert plan.candidate_flags(job, job_input)[-2:] == ["--init-from", inputs["init"]]
    assert plan.candidate_flags(SimpleNamespace(variant="baseline_warmup"), SimpleNamespace(keys=dict)) == []


def test_starting_from_the_warmup_needs_a_baseline_that_warms_up():
    config = one_model()
    config["aoq"]["start_from"] = "baseline_warmup"
    assert refusal(config) == (
        "config: aoq.start_from: baseline_warmup, but the baseline of model 'vsepp' has no warm-up "
        "(its max_violation_warmup_epochs is 0)"
    )
