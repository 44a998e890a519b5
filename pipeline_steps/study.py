"""Run a study preset: the whole workflow once per row (an ordinary cached Snakemake run on its own
results folder, results/<dataset of the row>/), then AOQ's rsum gain over the baseline per row:
study.md, study.csv and study.png under results/study/<name>/.

The preset is a config overlay with a `study:` section (docs/data.md, "Studies"). Its rows are
either the levels of one config key (`knob`, dotted: `demo.near_duplicates`,
`aoq.train.offline_size`; a bare name is a key of `demo:`) or named `factors`, each a config
overlay or a config file beside the preset (one factor changed from the preset's base). Every
row is checked by a Snakemake dry run before the first one runs. A row that changes `demo:`
generates its own data; the others share the base's data. Arguments after `--` go to every
Snakemake run.

Example:
    python -m pipeline_steps.study presets/demo_study.yaml --cores 2
"""

import argparse
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline_steps.common.atomic import remove_stale_temporaries, write_text_atomic
from pipeline_steps.common.errors import InputError, one_line_errors
from pipeline_steps.reporting.study import markdown, plot_gain, study_table

SNAKEFILE = Path(__file__).resolve().parents[1] / "workflow" / "Snakefile"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DRY_RUN = {"-n", "--dry-run", "--dryrun"}
PREFIX = re.compile(r"[A-Za-z0-9.-]+")  # no underscore: the dataset name's first one ends its file prefix


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("preset", help="a config overlay with a study: section")
    p.add_argument("--cores", default="2")
    p.add_argument("--directory", default=".", help="Snakemake's working directory")
    p.add_argument(
        "--base-config", nargs="*", default=[], help="config files applied before the preset (tests)"
    )
    p.add_argument(
        "--aggregate-only",
        action="store_true",
        help="only redraw from finished rows (refused for a row whose settings changed since it ran)",
    )
    p.add_argument("--rows", nargs="*", help="run and tabulate only these rows (labels)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = p.parse_args(argv[:split])
    args.snakemake_args = argv[split + 1 :]  # after --: passed to every Snakemake run
    return args


def level_label(level):
    """A level as it names its row and dataset: unique and reversible (0.5000001 stays itself)."""
    return str(level) if isinstance(level, int) else repr(float(level))


def nested(dotted, value):
    """{'a': {'b': value}} from 'a.b'."""
    for key in reversed(dotted.split(".")):
        value = {key: value}
    return value


def _problem(preset, text):
    raise InputError(f"{preset}: study: {text}")


def _read_yaml(preset):
    try:
        text = Path(preset).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{preset}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{preset}: cannot be read ({err.strerror})") from None
    try:
        overlay = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InputError(f"{preset}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(overlay, dict):
        raise InputError(f"{preset}: a study preset is a mapping with a study: section")
    return overlay


def _knob_rows(preset, study):
    knob, levels = study["knob"], study["levels"]
    if not isinstance(knob, str) or not all(NAME.fullmatch(part) for part in knob.split(".")):
        _problem(preset, f"knob: {knob!r} is not a config key (e.g. demo.near_duplicates)")
    knob = knob if "." in knob else f"demo.{knob}"
    if not isinstance(levels, list) or not levels:
        _problem(preset, f"levels: a non-empty list of numbers is needed, not {levels!r}")
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not math.isfinite(level):
            _problem(preset, f"levels: {level!r} is not a finite number")
    return knob, [(level_label(level), nested(knob, level)) for level in levels]


def _factor_rows(preset, factors):
    """Named rows; a row is a config overlay, or the name of a config file beside the preset."""
    if not isinstance(factors, dict) or not factors:
        _problem(preset, "factors: a non-empty mapping of row name -> config overlay is needed")
    rows = []
    for name, overlay in factors.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            _problem(preset, f"factors: {name!r} is not a row name (letters, digits, _ . -)")
        if overlay is None:
            overlay = {}
        if isinstance(overlay, str):  # a config file, beside the preset (e.g. clean.yaml)
            overlay = _read_yaml(Path(preset).parent / overlay)
        if not isinstance(overlay, dict):
            _problem(preset, f"factors: {name}: a config overlay (a mapping) is needed, not {overlay!r}")
        rows.append((name, overlay))
    return "factor", rows


def read_study(preset):
    """The study's settings: name, dataset_prefix, axis (the knob, or 'factor') and rows
    [(label, config overlay)], and the report title."""
    overlay = _read_yaml(preset)
    study = overlay.get("study")
    if not isinstance(study, dict):
        raise InputError(f"{preset}: study: missing (a mapping with name, dataset_prefix and rows)")
    missing = {"name", "dataset_prefix"} - set(study)
    if not ({"knob", "levels"} <= set(study) or "factors" in study):
        missing |= {"knob and levels, or factors"}
    if missing:
        _problem(preset, f"missing {', '.join(sorted(missing))}")
    if "factors" in study and ({"knob", "levels"} & set(study)):
        _problem(preset, "give either knob and levels or factors, not both")
    if not isinstance(study["name"], str) or not NAME.fullmatch(study["name"]):
        _problem(preset, f"name: {study['name']!r} is not a name (letters, digits, _ . -)")
    if not isinstance(study["dataset_prefix"], str) or not PREFIX.fullmatch(study["dataset_prefix"]):
        _problem(
            preset, f"dataset_prefix: {study['dataset_prefix']!r} is not a prefix (letters, digits, . -)"
        )
    if "factors" in study:
        axis, rows = _factor_rows(preset, study["factors"])
    else:
        axis, rows = _knob_rows(preset, study)
    labels = [label for label, _ in rows]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        _problem(preset, f"rows named twice: {', '.join(repeated)}")
    settings = {"name": study["name"], "dataset_prefix": study["dataset_prefix"], "axis": axis, "rows": rows}
    title = (overlay.get("report") or {}).get("title", study["name"])
    return settings, title


def row_dataset(study, label):
    return f"{study['dataset_prefix']}{label}_precomp"


def row_overlay(study, label, overlay):
    """The config a row adds on top of the preset: its own dataset name (results folder), its own
    generated data where it changes `demo:`, and its overlay."""
    name = row_dataset(study, label)
    dataset = {"name": name} | ({"path": f"results/demo_data/{name}"} if "demo" in overlay else {})
    return merged({"dataset": dataset}, overlay)


def merged(base, extra):
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def study_folder(workdir, study):
    return workdir / "results" / "study" / study["name"]


class Row:
    """One row's config file, Snakemake command and stamp (what it ran with)."""

    def __init__(self, args, study, workdir, label, overlay):
        self.label, self.study, self.args, self.workdir = label, study, args, workdir
        self.config = study_folder(workdir, study) / "levels" / f"{label}.yaml"
        self.stamp = self.config.with_suffix(".done.json")
        self.overlay = row_overlay(study, label, overlay)

    def command(self, *extra):
        command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(self.workdir)]
        configs = [*self.args.base_config, self.args.preset, str(self.config)]
        return command + ["--cores", self.args.cores, "--configfile", *configs, *extra]

    def settings_digest(self):
        """A digest of every setting this row's run reads: the working directory's config.yaml,
        the base configs, the preset without its `study:` section (adding a row to a study, or
        editing another row, leaves this row current) and the row's overlay."""
        files = [self.workdir / "config.yaml", *map(Path, self.args.base_config)]
        h = hashlib.sha256()
        for path in files:
            h.update(path.read_bytes() if path.is_file() else b"-")
        preset = {k: v for k, v in _read_yaml(self.args.preset).items() if k != "study"}
        h.update(json.dumps([preset, self.overlay], sort_keys=True).encode())
        return h.hexdigest()[:16]

    def write_config(self):
        write_text_atomic(self.config, yaml.safe_dump(self.overlay))

    def check(self):
        """A dry run: the config of this row is refused here, before any row runs."""
        done = subprocess.run(self.command("--dry-run", "--quiet"), capture_output=True, text=True)
        if done.returncode:
            lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
            raise InputError(
                f"study {self.study['name']}: row {self.label}: {lines[-1] if lines else 'dry run failed'}"
            )

    def run(self):
        print(f"study {self.study['name']}: row {self.label}: {' '.join(self.command()[2:])}", flush=True)
        if subprocess.run(self.command(*self.args.snakemake_args)).returncode:
            raise InputError(f"study {self.study['name']}: the Snakemake run of row {self.label} failed")
        if not DRY_RUN & set(self.args.snakemake_args):
            write_text_atomic(self.stamp, json.dumps({"settings": self.settings_digest()}) + "\n")

    def check_current(self):
        recorded = json.loads(self.stamp.read_text()) if self.stamp.is_file() else {}
        if recorded.get("settings") != self.settings_digest():
            why = "has not run" if not recorded else "ran with other settings (a config changed since)"
            raise InputError(
                f"study {self.study['name']}: row {self.label} {why}: run the study without --aggregate-only"
            )


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    study, title = read_study(args.preset)
    workdir = Path(args.directory).resolve()
    rows = [Row(args, study, workdir, label, overlay) for label, overlay in study["rows"]]
    chosen = rows if args.rows is None else [r for r in rows if r.label in args.rows]
    unknown = sorted(set(args.rows or []) - {r.label for r in rows})
    if unknown:
        raise InputError(f"study {study['name']}: --rows: no such row: {', '.join(unknown)}")
    if not args.aggregate_only:
        for row in chosen:  # every row's config is checked before the first one runs
            row.write_config()
            row.check()
        for row in chosen:
            row.run()
        if DRY_RUN & set(args.snakemake_args):
            print(f"study {study['name']}: a dry run, so nothing to tabulate")
            return 0
    for row in chosen:  # the table holds the chosen rows (all, without --rows)
        row.check_current()
    out = study_folder(workdir, study)
    targets = [out / "study.csv", out / "study.md", out / "study.png"]
    remove_stale_temporaries(*targets)
    table = study_table([(row.label, workdir / "results" / row_dataset(study, row.label)) for row in chosen])
    write_text_atomic(targets[0], table.to_csv(index=False, float_format="%.4f"))
    figure = f"![Δ rsum against {study['axis']}](study.png)\n"
    write_text_atomic(targets[1], markdown(table, study["axis"], title) + "\n" + figure)
    plot_gain(table, study["axis"], targets[2])
    print(f"study {study['name']}: wrote {', '.join(str(t) for t in targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
