# The authors' released checkpoints, imported, then evaluated as ensembles (rule evaluate, method
# "released"): `snakemake released`.


rule import_released:
    input:
        reference=lambda w: PLAN.released[w.ckpt]["path"],
        manifest=f"{PREPARED}/manifest.json",
    output:
        f"{RESULTS}/released/{{ckpt}}/model_best.pt",
    log:
        f"logs/{DATASET}/import_released/{{ckpt}}.log",
    conda:
        "../../envs/aoq.yaml"
    resources:
        **PLAN.job_resources("light"),
    params:
        arch=lambda w: PLAN.released[w.ckpt]["arch"],
        prepared=PLAN.prepared_dir,
    shell:
        "python -m pipeline_steps.import_checkpoint --reference {input.reference:q} --arch {params.arch:q}"
        " --prepared {params.prepared:q} --out {output:q} > {log:q} 2>&1"


rule released:
    input:
        [
            path
            for ensemble in PLAN.released_ensembles
            for path in PLAN.evaluation_files(PLAN.eval_dir(ensemble, "released", "ensemble"))
        ],
