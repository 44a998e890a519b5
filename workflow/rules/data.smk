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
            **job_resources("light"),
        params:
            data=lambda w, output: os.path.dirname(output.meta),
            demo=config["demo"],
            img_dim=config["dataset"]["img_dim"],
            dev_layout=lambda w: "--dev-rows-per-caption" if config["demo"]["dev_rows_per_caption"] else "",
        shell:
            "python -m pipeline_steps.make_demo_data --out {params.data} --seed {params.demo[seed]}"
            " --n-train {params.demo[n_train]} --n-dev {params.demo[n_dev]} --n-test {params.demo[n_test]}"
            " --n-testall-per-fold {params.demo[n_testall_per_fold]} --img-dim {params.img_dim}"
            " --near-duplicates {params.demo[near_duplicates]} --duplicate-changes {params.demo[duplicate_changes]}"
            " --caption-detail {params.demo[caption_detail]} {params.dev_layout} > {log} 2>&1"


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
            **job_resources("data"),
        params:
            source=download_source_flags,
            sha=lambda w: f"--sha256 {config['download']['sha256']}" if config["download"]["sha256"] else "",
            dest=lambda w, output: os.path.dirname(output.stamp),
        shell:
            "python -m pipeline_steps.download_data {params.source} {params.sha} --dest {params.dest}"
            " --stamp {output.stamp} > {log} 2>&1"


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
        **job_resources("data"),
    params:
        data=lambda w, input: os.path.dirname(input.ims[0]),
        prepared=lambda w, output: os.path.dirname(output.manifest),
        splits=" ".join(config["dataset"]["splits"]),
        img_dim=config["dataset"]["img_dim"],
        vocab=vocab_flags,
        threshold=config["dataset"]["vocab_threshold"],
        tokenizer=config["dataset"]["tokenizer"],
        name=DATASET,
    shell:
        "python -m pipeline_steps.prepare_data --data {params.data} --out {params.prepared} --img-dim {params.img_dim}"
        " --splits {params.splits} {params.vocab} --vocab-threshold {params.threshold}"
        " --tokenizer {params.tokenizer} --dataset-name {params.name} > {log} 2>&1"
