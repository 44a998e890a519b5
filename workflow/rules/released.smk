# The authors' released checkpoints, imported, then evaluated as ensembles (rule evaluate, method
# "released"): `snakemake released`.


rule import_released:
    input:
        reference=lambda w: RELEASED[w.ckpt]["path"],
        manifest=f"{PREPARED}/manifest.json",
    output:
        f"{RESULTS}/released/{{ckpt}}/model_best.pt",
    log:
        f"logs/{DATASET}/import_released/{{ckpt}}.log",
    conda:
        "../../envs/aoq.yaml"
    resources:
        **job_resources("light"),
    params:
        arch=lambda w: RELEASED[w.ckpt]["arch"],
        prepared=prepared_dir,
    shell:
        "python -m pipeline_steps.import_checkpoint --reference {input.reference:q} --arch {params.arch:q}"
        " --prepared {params.prepared:q} --out {output:q} > {log:q} 2>&1"


rule released:
    input:
        [
            f"{eval_dir(ens, 'released', 'ensemble')}/{e['name']}.json"
            for ens in RELEASED_ENSEMBLES
            for e in config["evaluation"]
        ],
