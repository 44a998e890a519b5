# Outputs marked with report() also go into Snakemake's self-contained HTML report
# (`snakemake --report results/demo_precomp/report.html`), each with its caption from
# workflow/report/, grouped by category: Data, Training, Mining, Evaluation. The marks change no
# output and plan no job: Snakemake reads them only when it writes the HTML report.
rule report:
    input:
        metrics=PLAN.evaluation_outputs(),
        ranks=PLAN.rank_outputs(),
        val_logs=PLAN.val_logs(),
        audits=[p for p in PLAN.audit_outputs() if p.endswith(".json")],
    output:
        md=report(
            f"{RESULTS}/report/report.md",
            caption="../report/report_md.rst",
            category="Evaluation",
            subcategory="Results",
            labels={"result": "report (Markdown)"},
        ),
        csv=report(
            f"{RESULTS}/report/report.csv",
            caption="../report/report_csv.rst",
            category="Evaluation",
            subcategory="Results",
            labels={"result": "metrics of every evaluated run"},
        ),
        png=report(
            f"{RESULTS}/report/curves.png",
            caption="../report/curves.rst",
            category="Training",
            subcategory="Curves",
            labels={"result": "training curves"},
        ),
        stats_png=report(
            f"{RESULTS}/report/statistics.png",
            caption="../report/statistics.rst",
            category="Evaluation",
            subcategory="Statistics",
            labels={"result": "rsum intervals"},
        ),
        differences=report(
            f"{RESULTS}/report/differences.csv",
            caption="../report/differences.rst",
            category="Evaluation",
            subcategory="Statistics",
            labels={"result": "paired differences"},
        ),
        # report.md's tables as HTML: the HTML report displays an HTML result in place (a
        # Markdown or CSV result there is only a download link).
        table=report(
            f"{RESULTS}/report/results_table.html",
            caption="../report/results_table.rst",
            category="Evaluation",
            subcategory="Results",
            labels={"result": "results table"},
        ),
    log:
        f"logs/{DATASET}/report.log",
    conda:
        "../../envs/aoq.yaml"
    resources:
        **PLAN.job_resources("light"),
    params:
        title=config["report"]["title"],
        bootstrap=config["report"]["bootstrap"],
        settings=digest(PLAN.report_settings()),
        exclude=config["mining"]["exclude"],
    shell:
        "python -m pipeline_steps.report --metrics {input.metrics:q} --val-logs {input.val_logs:q}"
        " --title {params.title:q} --bootstrap-resamples {params.bootstrap[resamples]:q}"
        " --bootstrap-level {params.bootstrap[level]:q} --bootstrap-seed {params.bootstrap[seed]:q}"
        " --out-md {output.md:q} --out-csv {output.csv:q} --out-png {output.png:q}"
        " --out-stats-png {output.stats_png:q} --out-differences {output.differences:q}"
        " --out-html {output.table:q} --audits {input.audits:q} --mining-exclude {params.exclude:q}"
        " > {log:q} 2>&1"
