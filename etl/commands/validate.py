"""``lamost-vac validate``: how a model behaves on real LAMOST spectra.

Estimates every spectrum file of the real spectra in ``../shared/data/lamost-real`` (one
folder per data set), with the side tables found there (``repeat_groups.csv``: GroupID
per ``combined_file``; ``dr1_afgk_catalog_rows.csv``: LASP labels per ``filename``), and
writes the report folder that :mod:`models.validation_report` builds: the outcome of
every file, the repeatability of stars observed several times, the agreement with LASP
and the Kiel diagram. One command regenerates everything.
"""
import csv
import os
import sys

import numpy as np

from models.artifact import load_model
from models.labels import LABELS
from models.report import LABEL_HEADINGS, fmt
from models.validation_report import (DEFAULT_MIN_SNRG, OUTCOMES, estimate_files, spectrum_key,
                                      write_validation_report)

DEFAULT_REAL_DIR = os.path.join("..", "shared", "data", "lamost-real")
SPECTRUM_SUFFIXES = (".fits", ".fits.gz", ".fit", ".fit.gz", ".fts", ".fts.gz")
REPEAT_TABLE = "repeat_groups.csv"
LASP_TABLE = "dr1_afgk_catalog_rows.csv"


def register(subparsers):
    parser = subparsers.add_parser(
        "validate", help="check a model on real LAMOST spectra: robustness, repeatability, LASP",
        description="Estimate every spectrum file under --real-dir (one folder per data set) and "
                    "write a report (report.md, report.json, estimates.csv, PNG figures): outcome "
                    "of every file, scatter and z-scores of repeat observations (repeat_groups.csv), "
                    "agreement with LASP (dr1_afgk_catalog_rows.csv) and the Kiel diagram.")
    parser.add_argument("--model", required=True, help="model artifact from train-files or train")
    parser.add_argument("--real-dir", default=os.environ.get("LAMOST_VAC_REAL_DIR", DEFAULT_REAL_DIR),
                        help="folder of real-spectrum folders (default $LAMOST_VAC_REAL_DIR or "
                             f"{DEFAULT_REAL_DIR})")
    parser.add_argument("--out", required=True, help="report folder (created; files are overwritten)")
    parser.add_argument("--jobs", type=int, default=-1, help="worker processes (-1 = all cores)")
    parser.add_argument("--limit-per-folder", type=int, default=None, metavar="N",
                        help="only the first N files of each folder (files in a repeat group or "
                             "the LASP table first, repeat groups kept together): a quick subset")
    parser.add_argument("--min-snrg", type=float, default=DEFAULT_MIN_SNRG,
                        help=f"spectra with SNRg at or below this are not estimated (default "
                             f"{DEFAULT_MIN_SNRG:g}; 2 < SNRg <= 5 is estimated but flagged)")
    parser.set_defaults(func=run_validate)


# -- side tables ------------------------------------------------------------------------
def _float(text):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return np.nan
    return value if np.isfinite(value) and value > -9000 else np.nan   # -9999: missing


def read_repeat_groups(path):
    """{spectrum key: group id} from a repeat_groups.csv (combined_file, GroupID)."""
    groups = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            name, group = row.get("combined_file"), _float(row.get("GroupID"))
            if name and np.isfinite(group):
                groups[spectrum_key(name)] = int(group)
    return groups


def read_lasp(path):
    """{spectrum key: {teff, logg, feh, snrg, obsid}} from LAMOST catalogue rows (filename column)."""
    rows = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("filename"):
                rows[spectrum_key(row["filename"])] = {
                    **{label: _float(row.get(label)) for label in LABELS},
                    **{label + "_err": _float(row.get(label + "_err")) for label in LABELS},
                    "snrg": _float(row.get("snrg")), "obsid": row.get("obsid")}
    return rows


# -- files --------------------------------------------------------------------------------
def is_spectrum_file(name):
    return name.lower().endswith(SPECTRUM_SUFFIXES)


def collect_files(real_dir, limit=None):
    """[(folder name, [paths])] of every sub-folder holding spectrum files, plus the side
    tables found: (folders, repeat_groups {key: group}, lasp {key: row})."""
    if not os.path.isdir(real_dir):
        raise ValueError(f"--real-dir {real_dir}: no such folder")
    repeats, lasp, folders = {}, {}, []
    subdirs = sorted(entry.path for entry in os.scandir(real_dir) if entry.is_dir())
    for folder in subdirs:
        names = sorted(os.listdir(folder))
        if REPEAT_TABLE in names:
            repeats.update(read_repeat_groups(os.path.join(folder, REPEAT_TABLE)))
        if LASP_TABLE in names:
            lasp.update(read_lasp(os.path.join(folder, LASP_TABLE)))
    for folder in subdirs:
        names = sorted(n for n in os.listdir(folder) if is_spectrum_file(n)
                       and os.path.isfile(os.path.join(folder, n)))
        if not names:
            continue
        if limit is not None:
            # side-table spectra first, a repeat group's members next to each other
            def order(name):
                key = spectrum_key(name)
                return (key not in repeats and key not in lasp, repeats.get(key, 0), name)
            names = sorted(names, key=order)[:max(limit, 0)]
        folders.append((os.path.basename(folder), [os.path.join(folder, n) for n in names]))
    if not folders:
        raise ValueError(f"--real-dir {real_dir}: no folder with spectrum files (*.fits, *.fits.gz)")
    return folders, repeats, lasp


# -- the command -------------------------------------------------------------------------------
def _command_line(args):
    line = f"lamost-vac validate --model {args.model} --real-dir {args.real_dir} --out {args.out}"
    if args.limit_per_folder is not None:
        line += f" --limit-per-folder {args.limit_per_folder}"
    if args.min_snrg != DEFAULT_MIN_SNRG:
        line += f" --min-snrg {args.min_snrg:g}"
    return line


def run_validate(args):
    if args.limit_per_folder is not None and args.limit_per_folder < 1:
        raise ValueError("--limit-per-folder must be at least 1")
    artifact = load_model(args.model)
    folders, repeats, lasp_rows = collect_files(args.real_dir, args.limit_per_folder)
    n_files = sum(len(paths) for _, paths in folders)
    print(f"{n_files} spectrum files in {len(folders)} folders under {args.real_dir}", file=sys.stderr)
    rows = estimate_files(artifact, folders, n_jobs=args.jobs, min_snrg=args.min_snrg)
    inputs = {"real_dir": os.path.abspath(args.real_dir), "limit_per_folder": args.limit_per_folder,
              "min_snrg": args.min_snrg, "command": _command_line(args)}
    report = write_validation_report(args.out, artifact, args.model, rows, repeats, lasp_rows, inputs)

    print(f"model {artifact['version']}: {n_files} files")
    for folder, per in report["counts"].items():
        print(f"  {folder}: " + ", ".join(f"{o} {per[o]}" for o in OUTCOMES if per[o]) + f" (total {per['total']})")
    rep = report["repeatability"]
    print(f"repeats: {rep['n_stars']} stars with >= 2 estimated spectra")
    for label in LABELS:
        r = rep["labels"][label]
        name, unit, spec = LABEL_HEADINGS[label]
        print(f"  {name:7s} median scatter {fmt(r['median_scatter'], spec)} {unit}  z std model "
              f"{fmt(r['z_model']['std'], '.2f')} calibrated {fmt(r['z_calibrated']['std'], '.2f')} "
              f"(pairs {r['z_model']['n']})")
    lasp = report["lasp"]
    print(f"LASP: {lasp['n_estimated']} of {lasp['n_with_lasp_row']} DR1 spectra with LASP rows estimated")
    for label in LABELS:
        s = lasp["all"][label]["all"]
        name, unit, spec = LABEL_HEADINGS[label]
        if s["n"]:
            print(f"  {name:7s} MAE {s['mae']:{spec}} {unit}  mu {s['mu']:+{spec}}  sigma {s['sigma']:{spec}}  (n={s['n']})")
    print(f"report -> {os.path.join(os.path.abspath(args.out), 'report.md')}")
    return 0
