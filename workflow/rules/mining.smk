rule extract_embeddings:
    input:
        unpack(lambda w: split_inputs("train")),
        checkpoint=checkpoint_path("{model}", "baseline", "{seed}"),
    output:
        f"{R}/embeddings/{{model}}/seed{{seed}}/train.h5",
    log:
        f"logs/{DATASET}/extract_embeddings/{{model}}_seed{{seed}}.log",
    benchmark:
        f"logs/{DATASET}/extract_embeddings/{{model}}_seed{{seed}}.benchmark.tsv"
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["extract"]["threads"]
    resources:
        **job_resources("extract"),
    params:
        step=step_command("extract", "pipeline_steps.extract_embeddings"),
        data=data_dir,
        prepared=prepared_dir,
        device=config["run"]["device"],
        settings=lambda w: digest(run_settings(w.model, "baseline", w.seed)),
    shell:
        "{params.step} --checkpoint {input.checkpoint} --data {params.data}"
        " --prepared {params.prepared} --split train --out {output} --device {params.device}"
        " --threads {threads} > {log} 2>&1"


rule mine_candidates:
    input:
        f"{R}/embeddings/{{model}}/seed{{seed}}/train.h5",
    output:
        i2t=f"{R}/candidates/{{model}}/seed{{seed}}/i2t_{DS_PREFIX}.npy",
        t2i=f"{R}/candidates/{{model}}/seed{{seed}}/t2i_{DS_PREFIX}.npy",
    log:
        f"logs/{DATASET}/mine_candidates/{{model}}_seed{{seed}}.log",
    benchmark:
        f"logs/{DATASET}/mine_candidates/{{model}}_seed{{seed}}.benchmark.tsv"
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["mine"]["threads"]
    resources:
        **job_resources("mine"),
    params:
        step=step_command("mine", "pipeline_steps.mine_candidates"),
        k_i2t=config["mining"]["k_i2t"],
        k_t2i=config["mining"]["k_t2i"],
        dtype=config["mining"]["dtype"],
        block_mb=config["mining"]["block_mb"],
        device=config["run"]["device"],
        settings=lambda w: digest(run_settings(w.model, "baseline", w.seed)),
    shell:
        "{params.step} --embeddings {input} --out-i2t {output.i2t}"
        " --out-t2i {output.t2i} --k-i2t {params.k_i2t} --k-t2i {params.k_t2i} --dtype {params.dtype}"
        " --block-mb {params.block_mb} --device {params.device} --threads {threads} > {log} 2>&1"


if config["mining"]["candidate_files"]:

    rule adopt_candidates:
        input:
            i2t=config["mining"]["candidate_files"]["i2t"],
            t2i=config["mining"]["candidate_files"]["t2i"],
            manifest=f"{PREPARED}/manifest.json",
        output:
            i2t=f"{R}/candidates/authors/i2t_{DS_PREFIX}.npy",
            t2i=f"{R}/candidates/authors/t2i_{DS_PREFIX}.npy",
        log:
            f"logs/{DATASET}/adopt_candidates.log",
        conda:
            "../../envs/aoq.yaml"
        resources:
            **job_resources("light"),
        params:
            prepared=prepared_dir,
            # the largest any AOQ run draws from (1 when no run does: the files are only checked)
            offline_size=max(
                (
                    train_section(m, v)["offline_size"]
                    for m in MODELS
                    for v in variants_of(m)
                    if v != "baseline"
                ),
                default=1,
            ),
        shell:
            "python -m pipeline_steps.adopt_candidates --i2t {input.i2t} --t2i {input.t2i}"
            " --prepared {params.prepared} --offline-size {params.offline_size}"
            " --out-i2t {output.i2t} --out-t2i {output.t2i} > {log} 2>&1"
