"""Pipeline steps: one module per Snakemake rule, each runnable as `python -m pipeline_steps.<step>`."""
