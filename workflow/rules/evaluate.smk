rule evaluate:
    input:
        unpack(lambda w: split_inputs(*dict.fromkeys(e["split"] for e in config["evaluation"]))),
        checkpoints=lambda w: [checkpoint_path(m, w.variant, s) for m in ENSEMBLES[w.name] for s in seeds_of(m)],
    output:
        metrics=[f"{R}/eval/{{name}}/{{variant}}/{e['name']}.json" for e in config["evaluation"]],
    params:
        step=step_command("evaluate", "pipeline_steps.evaluate"),
        data=data_dir,
        prepared=prepared_dir,
        evaluations=lambda w, output: evaluation_flags(output.metrics),
        device=config["run"]["device"],
        settings=lambda w: digest(evaluation_settings(w.name, w.variant)),
    threads: 4
    resources:
        **job_resources("evaluate"),
    conda:
        "../../envs/aoq.yaml"
    log:
        f"logs/{DATASET}/evaluate/{{name}}_{{variant}}.log",
    shell:
        "{params.step} --checkpoints {input.checkpoints} --data {params.data}"
        " --prepared {params.prepared} --label {wildcards.name} {params.evaluations} --device {params.device}"
        " --threads {threads} > {log} 2>&1"
