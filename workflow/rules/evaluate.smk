# Every model alone and every configured ensemble, per method and per subset of seeds: each seed
# alone (seed<k>) and the ensemble row of run.ensemble_seeds (ensemble). The authors' released
# checkpoints are the method "released" (subset "ensemble") of their ensembles (`snakemake released`).


rule evaluate:
    input:
        unpack(lambda w: split_inputs(*dict.fromkeys(e["split"] for e in config["evaluation"]))),
        checkpoints=lambda w: evaluated_checkpoints(w.name, w.method, w.subset),
    output:
        metrics=[f"{eval_dir()}/{e['name']}.json" for e in config["evaluation"]],
        ranks=[f"{eval_dir()}/{e['name']}.ranks.npz" for e in config["evaluation"]],
    log:
        f"logs/{DATASET}/evaluate/{{name}}_{{method}}_{{subset}}.log",
    benchmark:
        f"logs/{DATASET}/evaluate/{{name}}_{{method}}_{{subset}}.benchmark.tsv"
    wildcard_constraints:
        name="|".join(list(ENSEMBLES) + list(RELEASED_ENSEMBLES)),
        method="|".join(METHODS + ["released"]),
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        **job_resources("evaluate"),
    params:
        step=step_command("evaluate", "pipeline_steps.evaluate"),
        data=data_dir,
        prepared=prepared_dir,
        evaluations=lambda w, output: evaluation_flags(output.metrics),
        label=lambda w: f"released:{w.name}" if w.method == "released" else w.name,
        device=config["run"]["device"],
        settings=lambda w: digest(evaluation_settings(w.name, w.method, w.subset)),
    shell:
        "{params.step:q} --checkpoints {input.checkpoints:q} --data {params.data:q}"
        " --prepared {params.prepared:q} --label {params.label:q} {params.evaluations:q}"
        " --device {params.device:q} --threads {threads:q} --settings {params.settings:q} > {log:q} 2>&1"
