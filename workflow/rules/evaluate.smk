rule evaluate:
    input:
        checkpoints=lambda w: [checkpoint_path(w.model, w.variant, s) for s in SEEDS],
        manifest=f"{PREPARED}/manifest.json",
    output:
        f"{R}/eval/{{model}}/{{variant}}/{{evaluation}}.json",
    params:
        split=lambda w: evaluation_by_name(w.evaluation)["split"],
        protocol=lambda w: evaluation_by_name(w.evaluation)["protocol"],
        device=config["run"].get("device", "auto"),
    threads: 4
    log:
        f"logs/{DATASET}/evaluate/{{model}}_{{variant}}_{{evaluation}}.log",
    shell:
        "python -m pipeline_steps.evaluate --checkpoints {input.checkpoints} --data {DATA}"
        " --prepared {PREPARED} --split {params.split} --protocol {params.protocol}"
        " --name {wildcards.evaluation} --out {output} --device {params.device}"
        " --threads {threads} > {log} 2>&1"
