rule report:
    input:
        metrics=evaluation_outputs(),
        ranks=[p.removesuffix(".json") + ".ranks.npz" for p in evaluation_outputs()],
        val_logs=[f"{train_dir(m, v, s)}/val_log.csv" for m, v, s in trained_runs()],
    output:
        md=f"{R}/report/report.md",
        csv=f"{R}/report/report.csv",
        png=f"{R}/report/curves.png",
        stats_png=f"{R}/report/statistics.png",
        differences=f"{R}/report/differences.csv",
    log:
        f"logs/{DATASET}/report.log",
    conda:
        "../../envs/aoq.yaml"
    resources:
        **job_resources("light"),
    params:
        title=config["report"]["title"],
        bootstrap=config["report"]["bootstrap"],
        settings=digest(report_settings()),
    shell:
        "python -m pipeline_steps.report --metrics {input.metrics} --val-logs {input.val_logs}"
        " --title {params.title:q} --bootstrap-resamples {params.bootstrap[resamples]}"
        " --bootstrap-level {params.bootstrap[level]} --bootstrap-seed {params.bootstrap[seed]}"
        " --out-md {output.md} --out-csv {output.csv} --out-png {output.png} --out-stats-png {output.stats_png}"
        " --out-differences {output.differences}"
        " > {log} 2>&1"
