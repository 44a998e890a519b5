if config["demo"]["enabled"]:

    rule make_demo_data:
        output:
            ims=expand(f"{DATA}/{{split}}_ims.npy", split=["train", "dev", "test", "testall"]),
            caps=expand(f"{DATA}/{{split}}_caps.txt", split=["train", "dev", "test", "testall"]),
            meta=f"{DATA}/demo_meta.json",
        log:
            f"logs/{DATASET}/make_demo_data.log",
        conda:
            "../../envs/aoq.yaml"
        resources:
            **PLAN.job_resources("light"),
        params:
            data=lambda w, output: os.path.dirname(output.meta),
            demo=config["demo"],
            img_dim=config["dataset"]["img_dim"],
            dev_layout=lambda w: ["--dev-rows-per-caption"] if config["demo"]["dev_rows_per_caption"] else [],
            # Only when set: the default data's command (and so every result) is unchanged.
            noise=lambda w: (
                ["--feature-noise", config["demo"]["feature_noise"]]
                if "feature_noise" in config["demo"]
                else []
            ),
        shell:
            "python -m pipeline_steps.make_demo_data --out {params.data:q} --seed {params.demo[seed]:q}"
            " --n-train {params.demo[n_train]:q} --n-dev {params.demo[n_dev]:q} --n-test {params.demo[n_test]:q}"
            " --n-testall-per-fold {params.demo[n_testall_per_fold]:q} --img-dim {params.img_dim:q}"
            " --near-duplicates {params.demo[near_duplicates]:q}"
            " --duplicate-changes {params.demo[duplicate_changes]:q}"
            " --caption-detail {params.demo[caption_detail]:q} {params.dev_layout:q} {params.noise:q}"
            " > {log:q} 2>&1"


if config["download"]["enabled"]:

    rule download_data:
        output:
            ims=expand(f"{DATA}/{{split}}_ims.npy", split=config["dataset"]["splits"]),
            caps=expand(f"{DATA}/{{split}}_caps.txt", split=config["dataset"]["splits"]),
            stamp=f"{DATA}.download.json",
        log:
            f"logs/{DATASET}/download_data.log",
        conda:
            "../../envs/aoq.yaml"
        resources:
            **PLAN.job_resources("data"),
        params:
            source=PLAN.download_source_flags,
            sha=lambda w: ["--sha256", config["download"]["sha256"]] if config["download"]["sha256"] else [],
            dest=lambda w, output: os.path.dirname(output.stamp),
        shell:
            "python -m pipeline_steps.download_data {params.source:q} {params.sha:q} --dest {params.dest:q}"
            " --stamp {output.stamp:q} > {log:q} 2>&1"


rule prepare_data:
    input:
        ims=expand(f"{DATA}/{{split}}_ims.npy", split=config["dataset"]["splits"]),
        caps=expand(f"{DATA}/{{split}}_caps.txt", split=config["dataset"]["splits"]),
    output:
        vocab=f"{PREPARED}/vocab.json",
        manifest=report(
            f"{PREPARED}/manifest.json",
            caption="../report/manifest.rst",
            category="Data",
            labels={"result": "prepared data manifest"},
        ),
        ids=expand(f"{PREPARED}/{{split}}_ids.npz", split=config["dataset"]["splits"]),
    log:
        f"logs/{DATASET}/prepare_data.log",
    conda:
        "../../envs/aoq.yaml"
    resources:
        **PLAN.job_resources("data"),
    params:
        data=lambda w, input: os.path.dirname(input.ims[0]),
        prepared=lambda w, output: os.path.dirname(output.manifest),
        splits=config["dataset"]["splits"],
        img_dim=config["dataset"]["img_dim"],
        vocab=PLAN.vocab_flags,
        threshold=config["dataset"]["vocab_threshold"],
        tokenizer=config["dataset"]["tokenizer"],
        name=DATASET,
    shell:
        "python -m pipeline_steps.prepare_data --data {params.data:q} --out {params.prepared:q}"
        " --img-dim {params.img_dim:q} --splits {params.splits:q} {params.vocab:q}"
        " --vocab-threshold {params.threshold:q} --tokenizer {params.tokenizer:q}"
        " --dataset-name {params.name:q} > {log:q} 2>&1"
