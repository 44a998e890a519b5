# The authors' released checkpoints, imported and evaluated as ensembles: `snakemake released`.


rule import_released:
    input:
        reference=lambda w: RELEASED[w.ckpt]["path"],
        manifest=f"{PREPARED}/manifest.json",
    output:
        f"{R}/released/{{ckpt}}/model_best.pt",
    params:
        arch=lambda w: RELEASED[w.ckpt]["arch"],
        prepared=prepared_dir,
    resources:
        **job_resources("light"),
    conda:
        "../../envs/aoq.yaml"
    log:
        f"logs/{DATASET}/import_released/{{ckpt}}.log",
    shell:
        "python -m pipeline_steps.import_checkpoint --reference {input.reference} --arch {params.arch}"
        " --prepared {params.prepared} --out {output} > {log} 2>&1"


rule evaluate_released:
    input:
        unpack(lambda w: split_inputs(*dict.fromkeys(e["split"] for e in config["evaluation"]))),
        checkpoints=lambda w: [f"{R}/released/{c}/model_best.pt" for c in RELEASED_ENSEMBLES[w.ens]],
    output:
        metrics=[f"{R}/eval/released/{{ens}}/{e['name']}.json" for e in config["evaluation"]],
    params:
        step=step_command("evaluate", "pipeline_steps.evaluate"),
        data=data_dir,
        prepared=prepared_dir,
        evaluations=lambda w, output: evaluation_flags(output.metrics),
        device=config["run"]["device"],
    threads: 4
    resources:
        **job_resources("evaluate"),
    conda:
        "../../envs/aoq.yaml"
    log:
        f"logs/{DATASET}/evaluate_released/{{ens}}.log",
    shell:
        "{params.step} --checkpoints {input.checkpoints} --data {params.data}"
        " --prepared {params.prepared} --label released:{wildcards.ens} {params.evaluations}"
        " --device {params.device} --threads {threads} > {log} 2>&1"


rule released:
    input:
        [f"{R}/eval/released/{ens}/{e['name']}.json" for ens in RELEASED_ENSEMBLES
         for e in config["evaluation"]],
