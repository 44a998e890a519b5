"""Run a study preset: the demo data regenerated at each level of one of its knobs, the whole
workflow run once per level (an ordinary cached Snakemake run, results/<dataset of the level>/),
then AOQ's rsum gain over the baseline against the level: study.md, study.csv and study.png under
results/study/<name>/.

The preset is a config overlay with a `study:` section (name, knob, levels, dataset_prefix); see
presets/demo_study.yaml and docs/data.md. Arguments after `--` go to every Snakemake run.

Example:
    python -m pipeline_steps.study presets/demo_study.yaml --cores 2
"""

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline_steps.common.atomic import remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.errors import InputError, one_line_errors
from pipeline_steps.reporting.study import markdown, plot_gain, study_table

SNAKEFILE = Path(__file__).resolve().parents[1] / "workflow" / "Snakefile"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("preset", help="a config overlay with a study: section")
    p.add_argument("--cores", default="2")
    p.add_argument("--directory", default=".", help="Snakemake's working directory")
    p.add_argument(
        "--base-config", nargs="*", default=[], help="config files applied before the preset (tests)"
    )
    p.add_argument("--aggregate-only", action="store_true", help="only redraw from finished levels")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.snakemake_args = argv[split + 1 :]  # after --: passed to every Snakemake run
    return args


def read_study(preset):
    try:
        overlay = yaml.safe_load(Path(preset).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"{preset}: cannot be read as YAML ({err})") from None
    study = overlay.get("study")
    missing = {"name", "knob", "levels", "dataset_prefix"} - set(study or {})
    if missing:
        raise InputError(f"{preset}: study: missing {', '.join(sorted(missing))}")
    return study, overlay.get("report", {}).get("title", study["name"])


def level_dataset(study, level):
    return f"{study['dataset_prefix']}{level:g}_precomp"


def level_overlay(study, level):
    """The config a level adds on top of the preset: its own dataset (name and generated folder)
    and the knob's value."""
    name = level_dataset(study, level)
    return {"dataset": {"name": name, "path": f"results/demo_data/{name}"}, "demo": {study["knob"]: level}}


def run_level(args, study, level, workdir):
    config = workdir / "results" / "study" / study["name"] / "levels" / f"{level:g}.yaml"
    write_text_atomic(config, yaml.safe_dump(level_overlay(study, level)))
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    command += ["--cores", args.cores, "--configfile", *args.base_config, args.preset, str(config)]
    # Snakemake runs under this interpreter, and the workflow puts its folder first on the rules'
    # PATH (workflow/rules/common.smk), so the rules' `python` is this environment's.
    print(f"study {study['name']}: {study['knob']}={level:g}: {' '.join(command[2:])}", flush=True)
    done = subprocess.run(command + args.snakemake_args)
    if done.returncode:
        raise InputError(f"study {study['name']}: the Snakemake run of {study['knob']}={level:g} failed")


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    study, title = read_study(args.preset)
    workdir = Path(args.directory).resolve()
    if not args.aggregate_only:
        for level in study["levels"]:
            run_level(args, study, level, workdir)
    out = workdir / "results" / "study" / study["name"]
    targets = [out / "study.csv", out / "study.md", out / "study.png"]
    remove_stale_temporaries(*targets)
    levels = [
        (level, workdir / "results" / level_dataset(study, level) / "report") for level in study["levels"]
    ]
    table = study_table(levels)
    write_text_atomic(targets[0], table.to_csv(index=False, float_format="%.4f"))
    figure = f"![Δ rsum against demo.{study['knob']}](study.png)\n"
    write_text_atomic(targets[1], markdown(table, study["knob"], title) + "\n" + figure)
    plot_gain(table, study["knob"], targets[2])
    print(f"study {study['name']}: wrote {', '.join(str(t) for t in targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
