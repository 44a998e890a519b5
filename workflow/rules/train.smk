# TensorBoard (`tensorboard: true` in a training section) watches a run without changing it, so
# toggling it must rerun nothing. The runs that log are read here; then the key leaves every
# training section (the rounds', each model's and its rounds') before any rule reads one (rules
# read the config when the DAG is built): it enters no --train-config and no settings digest.
TENSORBOARD_RUNS = {
    (model, variant): train_section(model, variant).get("tensorboard", False)
    for model in config["models"]
    for variant in LOSS_VARIANTS + variants_of(model)
}
for owner in [config, *config["models"].values()]:
    for holder in (owner, owner.get("baseline", {}), owner.get("aoq", {})):
        holder.get("train", {}).pop("tensorboard", None)


rule train:
    input:
        unpack(train_inputs),
    output:
        best=f"{train_dir()}/model_best.pt",
        last=f"{train_dir()}/model_last.pt",
        val_log=report(
            f"{train_dir()}/val_log.csv",
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
        **job_resources("train"),
    params:
        step=step_command("train", "pipeline_steps.train"),
        data=data_dir,
        prepared=prepared_dir,
        arch=lambda w: MODELS[w.model]["arch"],
        model_config=lambda w: as_json(model_config(w.model)),
        train_config=lambda w: as_json(train_section(w.model, w.variant)),
        loss_config=lambda w: as_json(loss_section(w.variant)),
        candidates=candidate_flags,
        device=config["run"]["device"],
        # Resume state survives a failed job because it is not a declared output.
        resume=lambda w: f"results/.resume/{DATASET}/{w.model}/{w.variant}/seed{w.seed}",
        settings=lambda w: digest(run_settings(w.model, w.variant, w.seed)),
        # A function of `output` (unused) on purpose: Snakemake leaves params derived from a job's
        # input or output out of its params rerun trigger (tests/test_tensorboard.py checks it).
        tensorboard=lambda w, output: (
            ["--tensorboard-dir", f"logs/{DATASET}/tensorboard/{w.model}/{w.variant}/seed{w.seed}"]
            if TENSORBOARD_RUNS[w.model, w.variant]
            else []
        ),
    shell:
        "{params.step:q} --data {params.data:q} --prepared {params.prepared:q} --model {params.arch:q}"
        " --model-config {params.model_config:q} --train-config {params.train_config:q}"
        " --loss-config {params.loss_config:q} {params.candidates:q} --seed {wildcards.seed:q}"
        " --device {params.device:q} --threads {threads:q} --resume-dir {params.resume:q}"
        " --out-best {output.best:q} --out-last {output.last:q} --out-log {output.val_log:q}"
        " {params.tensorboard:q} > {log:q} 2>&1"
