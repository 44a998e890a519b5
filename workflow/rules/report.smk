rule report:
    input:
        metrics=expand(f"{R}/eval/{{model}}/{{variant}}/{{evaluation}}.json", model=MODELS,
                       variant=VARIANTS, evaluation=[e["name"] for e in config["evaluation"]]),
        val_logs=expand(f"{R}/train/{{model}}/{{variant}}/seed{{seed}}/val_log.csv", model=MODELS,
                        variant=VARIANTS, seed=SEEDS),
    output:
        md=f"{R}/report/report.md",
        csv=f"{R}/report/report.csv",
        png=f"{R}/report/curves.png",
    params:
        title=config.get("report", {}).get("title", "AOQ reproduction"),
    conda:
        "../../envs/aoq.yaml"
    log:
        f"logs/{DATASET}/report.log",
    shell:
        "python -m pipeline_steps.report --metrics {input.metrics} --val-logs {input.val_logs}"
        " --title {params.title:q} --out-md {output.md} --out-csv {output.csv} --out-png {output.png}"
        " > {log} 2>&1"
