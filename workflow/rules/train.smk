# One training run: a model, a method (the baseline or an AOQ variant of a mining round), a seed.
rule train:
    input:
        unpack(PLAN.train_inputs),
    output:
        best=f"{PLAN.train_dir()}/model_best.pt",
        last=f"{PLAN.train_dir()}/model_last.pt",
        val_log=report(
            f"{PLAN.train_dir()}/val_log.csv",
            caption="../report/val_log.rst",
            category="Training",
            subcategory="Validation logs",
            # A function: Snakemake fills wildcards into a label given as a string, not into a dict.
            labels=lambda w: {"model": w.model, "method": w.variant, "seed": w.seed},
        ),
    log:
        f"logs/{DATASET}/train/{{model}}_{{variant}}_seed{{seed}}.log",
    benchmark:
        f"logs/{DATASET}/train/{{model}}_{{variant}}_seed{{seed}}.benchmark.tsv"
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["train"]["threads"]
    resources:
        **PLAN.job_resources("train"),
    params:
        step=PLAN.step_command("train", "pipeline_steps.train"),
        data=PLAN.data_dir,
        prepared=PLAN.prepared_dir,
        arch=lambda w: PLAN.models[w.model]["arch"],
        model_config=lambda w: as_json(PLAN.model_config(w.model)),
        train_config=lambda w: as_json(PLAN.train_section(w.model, w.variant)),
        loss_config=lambda w: as_json(PLAN.loss_section(w.variant)),
        candidates=PLAN.candidate_flags,
        device=config["run"]["device"],
        # Resume state survives a failed job because it is not a declared output.
        resume=lambda w: f"results/.resume/{DATASET}/{w.model}/{w.variant}/seed{w.seed}",
        settings=lambda w: digest(PLAN.run_settings(w.model, w.variant, w.seed)),
        # TensorBoard watches a run without changing it: toggling it reruns nothing (the key enters
        # no digest, workflow/plan.py). A function of `output` (unused) on purpose: Snakemake
        # leaves params derived from a job's input or output out of its params rerun trigger
        # (tests/test_tensorboard.py checks it).
        tensorboard=lambda w, output: PLAN.tensorboard_flags(w),
    shell:
        "{params.step:q} --data {params.data:q} --prepared {params.prepared:q} --model {params.arch:q}"
        " --model-config {params.model_config:q} --train-config {params.train_config:q}"
        " --loss-config {params.loss_config:q} {params.candidates:q} --seed {wildcards.seed:q}"
        " --device {params.device:q} --threads {threads:q} --resume-dir {params.resume:q}"
        " --out-best {output.best:q} --out-last {output.last:q} --out-log {output.val_log:q}"
        " {params.tensorboard:q} > {log:q} 2>&1"
