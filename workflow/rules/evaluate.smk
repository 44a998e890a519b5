# Every model alone and every configured ensemble, per method and per subset of seeds: each seed
# alone (seed<k>) and the ensemble row of run.ensemble_seeds (ensemble). The authors' released
# checkpoints are the method "released" (subset "ensemble") of their ensembles (`snakemake released`).


rule evaluate:
    input:
        unpack(lambda w: PLAN.evaluated_split_inputs()),
        checkpoints=lambda w: PLAN.evaluated_checkpoints(w.name, w.method, w.subset),
    output:
        metrics=PLAN.evaluation_files(PLAN.eval_dir()),
        ranks=PLAN.evaluation_files(PLAN.eval_dir(), ".ranks.npz"),
    log:
        f"logs/{DATASET}/evaluate/{{name}}_{{method}}_{{subset}}.log",
    benchmark:
        f"logs/{DATASET}/evaluate/{{name}}_{{method}}_{{subset}}.benchmark.tsv"
    wildcard_constraints:
        name="|".join(list(PLAN.ensembles) + list(PLAN.released_ensembles)),
        method="|".join(PLAN.methods + ["released"]),
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["evaluate"]["threads"]
    resources:
        **PLAN.job_resources("evaluate"),
    params:
        step=PLAN.step_command("evaluate", "pipeline_steps.evaluate"),
        data=PLAN.data_dir,
        prepared=PLAN.prepared_dir,
        evaluations=lambda w, output: PLAN.evaluation_flags(output.metrics),
        label=lambda w: f"released:{w.name}" if w.method == "released" else w.name,
        device=config["run"]["device"],
        settings=lambda w: digest(PLAN.evaluation_settings(w.name, w.method, w.subset)),
    shell:
        "{params.step:q} --checkpoints {input.checkpoints:q} --data {params.data:q}"
        " --prepared {params.prepared:q} --label {params.label:q} {params.evaluations:q}"
        " --device {params.device:q} --threads {threads:q} --settings {params.settings:q} > {log:q} 2>&1"
