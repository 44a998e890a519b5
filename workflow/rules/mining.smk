# {miner} is empty for the round-1 miner (the baseline) and "<method>/" for a later mining
# round's (mining.rounds), so round 1 keeps its paths whatever the number of rounds.
rule extract_embeddings:
    input:
        unpack(lambda w: PLAN.split_inputs("train")),
        checkpoint=lambda w: PLAN.checkpoint_path(w.model, PLAN.miner_method(w), w.seed),
    output:
        f"{RESULTS}/embeddings/{{model}}/{{miner}}seed{{seed}}/train.h5",
    log:
        f"logs/{DATASET}/extract_embeddings/{{model}}_{{miner}}seed{{seed}}.log",
    benchmark:
        f"logs/{DATASET}/extract_embeddings/{{model}}_{{miner}}seed{{seed}}.benchmark.tsv"
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["extract"]["threads"]
    resources:
        **PLAN.job_resources("extract"),
    params:
        step=PLAN.step_command("extract", "pipeline_steps.extract_embeddings"),
        data=PLAN.data_dir,
        prepared=PLAN.prepared_dir,
        device=config["run"]["device"],
        settings=lambda w: digest(PLAN.run_settings(w.model, PLAN.miner_method(w), w.seed)),
    shell:
        "{params.step:q} --checkpoint {input.checkpoint:q} --data {params.data:q}"
        " --prepared {params.prepared:q} --split train --out {output:q} --device {params.device:q}"
        " --threads {threads:q} > {log:q} 2>&1"


rule mine_candidates:
    input:
        f"{RESULTS}/embeddings/{{model}}/{{miner}}seed{{seed}}/train.h5",
    output:
        i2t=f"{RESULTS}/candidates/{{model}}/{{miner}}seed{{seed}}/i2t_{DS_PREFIX}.npy",
        t2i=f"{RESULTS}/candidates/{{model}}/{{miner}}seed{{seed}}/t2i_{DS_PREFIX}.npy",
    log:
        f"logs/{DATASET}/mine_candidates/{{model}}_{{miner}}seed{{seed}}.log",
    benchmark:
        f"logs/{DATASET}/mine_candidates/{{model}}_{{miner}}seed{{seed}}.benchmark.tsv"
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["mine"]["threads"]
    resources:
        **PLAN.job_resources("mine"),
    params:
        # mining.exclude: duplicate_captions compares the tokenized training captions (made
        # before the embeddings). Part of the command, so that with the default (off) the rule's
        # code and params are those of before the setting existed: nothing mined reruns.
        step=lambda w: PLAN.step_command("mine", "pipeline_steps.mine_candidates")
        + (["--exclude-duplicates", f"{PREPARED}/train_ids.npz"] if PLAN.exclude_duplicates else []),
        k_i2t=config["mining"]["k_i2t"],
        k_t2i=config["mining"]["k_t2i"],
        dtype=config["mining"]["dtype"],
        block_mb=config["mining"]["block_mb"],
        device=config["run"]["device"],
        settings=lambda w: digest(PLAN.mining_settings(w.model, w.seed, PLAN.miner_method(w))),
    shell:
        "{params.step:q} --embeddings {input:q} --out-i2t {output.i2t:q} --out-t2i {output.t2i:q}"
        " --k-i2t {params.k_i2t:q} --k-t2i {params.k_t2i:q} --dtype {params.dtype:q}"
        " --block-mb {params.block_mb:q} --device {params.device:q} --threads {threads:q} > {log:q} 2>&1"


# The mining audit (docs/mining_audit.md): how hard the candidates are against the online hardest
# negative of the AOQ runs' batches, how many duplicate a positive's caption or score above the
# positive, on demo data how much of each scene's near-duplicate family they find; a later
# round's set is also compared with round 1's (overlap).
rule audit_mining:
    input:
        embeddings=f"{RESULTS}/embeddings/{{model}}/{{miner}}seed{{seed}}/train.h5",
        i2t=f"{RESULTS}/candidates/{{model}}/{{miner}}seed{{seed}}/i2t_{DS_PREFIX}.npy",
        t2i=f"{RESULTS}/candidates/{{model}}/{{miner}}seed{{seed}}/t2i_{DS_PREFIX}.npy",
        ids=f"{PREPARED}/train_ids.npz",
        meta=[f"{DATA}/demo_meta.json"] if config["demo"]["enabled"] else [],
        round1=lambda w: list(PLAN.miner_candidates().values()) if w.miner else [],
    output:
        json=report(
            f"{RESULTS}/candidates/{{model}}/{{miner}}seed{{seed}}/audit.json",
            caption="../report/mining_audit_json.rst",
            category="Mining",
            subcategory="Audit",
            labels=lambda w: {
                "miner": f"{w.model} {PLAN.miner_method(w)}",
                "seed": w.seed,
                "result": "numbers",
            },
        ),
        png=report(
            f"{RESULTS}/candidates/{{model}}/{{miner}}seed{{seed}}/audit.png",
            caption="../report/mining_audit.rst",
            category="Mining",
            subcategory="Audit",
            labels=lambda w: {
                "miner": f"{w.model} {PLAN.miner_method(w)}",
                "seed": w.seed,
                "result": "figure",
            },
        ),
    log:
        f"logs/{DATASET}/audit_mining/{{model}}_{{miner}}seed{{seed}}.log",
    benchmark:
        f"logs/{DATASET}/audit_mining/{{model}}_{{miner}}seed{{seed}}.benchmark.tsv"
    conda:
        "../../envs/aoq.yaml"
    threads: config["resources"]["mine"]["threads"]
    resources:
        # CPU only; it holds the embeddings in memory, as mining does.
        mem_mb=config["resources"]["mine"]["mem_mb"],
        runtime=config["resources"]["mine"]["runtime"],
    params:
        # The online batches AOQ trains with, and the top of each row it draws from.
        batch_size=lambda w: PLAN.train_section(w.model, "aoq")["batch_size"],
        offline_size=lambda w: PLAN.train_section(w.model, "aoq")["offline_size"],
        optional=lambda w, input: (
            (["--demo-meta", input.meta[0]] if input.meta else [])
            + (["--compare-i2t", input.round1[0], "--compare-t2i", input.round1[1]] if input.round1 else [])
        ),
    shell:
        "python -m pipeline_steps.audit_mining --embeddings {input.embeddings:q} --i2t {input.i2t:q}"
        " --t2i {input.t2i:q} --caption-ids {input.ids:q} {params.optional:q} --compare-label 'round 1'"
        " --seed {wildcards.seed:q} --batch-size {params.batch_size:q} --offline-size {params.offline_size:q}"
        " --threads {threads:q} --out-json {output.json:q} --out-png {output.png:q} > {log:q} 2>&1"


if config["mining"]["candidate_files"]:

    rule adopt_candidates:
        input:
            i2t=config["mining"]["candidate_files"]["i2t"],
            t2i=config["mining"]["candidate_files"]["t2i"],
            manifest=f"{PREPARED}/manifest.json",
        output:
            i2t=f"{RESULTS}/candidates/authors/i2t_{DS_PREFIX}.npy",
            t2i=f"{RESULTS}/candidates/authors/t2i_{DS_PREFIX}.npy",
        log:
            f"logs/{DATASET}/adopt_candidates.log",
        conda:
            "../../envs/aoq.yaml"
        resources:
            **PLAN.job_resources("light"),
        params:
            prepared=PLAN.prepared_dir,
            # the largest any AOQ run draws from (1 when no run does: the files are only checked)
            offline_size=PLAN.largest_offline_size(),
        shell:
            "python -m pipeline_steps.adopt_candidates --i2t {input.i2t:q} --t2i {input.t2i:q}"
            " --prepared {params.prepared:q} --offline-size {params.offline_size:q}"
            " --out-i2t {output.i2t:q} --out-t2i {output.t2i:q} > {log:q} 2>&1"
