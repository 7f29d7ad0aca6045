"""``lamost-vac validate``: how a model behaves on real LAMOST spectra.

Estimates every spectrum file of the folders given, joins them to an optional table of
reference labels (LASP, APOGEE, GALAH, ...) and to repeat groups (a table, or spectra
within a radius of each other), and writes the report folder that
:mod:`models.validation_report` builds: the outcome of every file, the repeatability of
stars observed several times, the agreement with the reference labels and the Kiel
diagram. One command regenerates everything.
"""
import argparse
import os
import shlex
import sys
import textwrap

import numpy as np
from astropy import units as u

from etl.commands import (add_activate_argument, add_jobs_argument, add_url_argument,
                          database_url, display_url, non_negative_float, positive_int,
                          registered_message)
from etl.filesets import read_reference_labels, read_repeat_groups, spectrum_folders
from etl.settings import settings
from models.artifact import load_model
from models.labels import LABELS
from models.report import LABEL_HEADINGS, fmt
from models.validation_report import (DEFAULT_MIN_SNRG, OUTCOMES, validate_files,
                                      write_validation_report)

DEFAULT_REFERENCE_RADIUS = "3arcsec"
# the report of the README, on the real spectra of ../shared/data (run from the repository)
SHARED_DATA_COMMAND = (
    "lamost-vac validate --model MODEL --spectra ../shared/data/lamost-real/*/ \\\n"
    "    --reference ../shared/data/lamost-real/dr1-plate-B6212/dr1_afgk_catalog_rows.csv "
    "--reference-name LASP \\\n"
    "    --reference-notes docs/lasp-dr1-offsets.md \\\n"
    "    --repeat-groups ../shared/data/lamost-real/dr8-repeats/repeat_groups.csv --out report/")


def register(subparsers):
    parser = subparsers.add_parser(
        "validate", help="check a model on real LAMOST spectra: robustness, repeatability, "
                         "agreement with reference labels",
        description=textwrap.fill(
            "Estimate every spectrum file (spec-*.fits[.gz], at any depth) of the --spectra folders "
            "and write a report (report.md, report.json, estimates.csv, PNG figures): the outcome of "
            "every file, the scatter and z-scores of repeat observations (--repeat-groups or "
            "--repeat-radius), the agreement with reference labels (--reference) and the Kiel diagram.",
            88),
        epilog="The report on the shared real spectra (LASP labels of the DR1 plate, the DR8 "
               "repeat groups):\n\n  " + SHARED_DATA_COMMAND.replace("\n", "\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model artifact from train-files or train")
    parser.add_argument("--spectra", required=True, nargs="+", metavar="FOLDER",
                        help="folders of spectrum files; the report counts outcomes per folder")
    parser.add_argument("--out", required=True, help="report folder (created; files are overwritten)")
    reference = parser.add_argument_group("reference labels")
    reference.add_argument("--reference", metavar="TABLE",
                           help="CSV or FITS table of reference labels (teff, logg, feh) to compare with; "
                                "a spectrum finds its row by file name (a filename column), else obsid, "
                                "else position (ra, dec)")
    reference.add_argument("--reference-columns", metavar="NAME=COLUMN,...",
                           help="column mapping as for 'ingest labels --columns', names teff, logg, feh "
                                "and one of filename, obsid or ra and dec (which also picks the join), "
                                "e.g. 'teff=TEFF,logg=LOGG,feh=FE_H,ra=RA,dec=DEC'")
    reference.add_argument("--reference-name", default="reference", metavar="NAME",
                           help="what the report calls the labels, e.g. LASP, APOGEE, GALAH "
                                "(default %(default)s)")
    reference.add_argument("--reference-radius", default=DEFAULT_REFERENCE_RADIUS, metavar="ANGLE",
                           help="match radius when joining by position (default %(default)s; "
                                "a bare number is arcsec)")
    reference.add_argument("--reference-notes", metavar="FILE",
                           help="markdown printed after the comparison (why the labels may disagree)")
    add_repeat_arguments(parser)
    add_jobs_argument(parser)
    parser.add_argument("--limit-per-folder", type=positive_int, default=None, metavar="N",
                        help="only the first N files of each folder (files in a repeat group or "
                             "the reference table first, repeat groups kept together): a quick subset")
    parser.add_argument("--min-snrg", type=non_negative_float, default=DEFAULT_MIN_SNRG,
                        help=f"spectra with SNRg at or below this are not estimated (default "
                             f"{DEFAULT_MIN_SNRG:g}; 2 < SNRg <= 5 is estimated but flagged)")
    parser.set_defaults(func=run_validate)
    register_calibrate_repeats(subparsers)


def add_repeat_arguments(parser, required=False):
    repeat_options = parser.add_argument_group("repeat observations")
    repeats = repeat_options.add_mutually_exclusive_group(required=required)
    repeats.add_argument("--repeat-groups", metavar="TABLE",
                         help="CSV or FITS table of repeat observations: a file-name column "
                              "(combined_file, filename, file) and a group column (GroupID, group)")
    repeats.add_argument("--repeat-radius", metavar="ANGLE",
                         help="instead of a table: spectra within this angle of each other are one "
                              "star (header RA, Dec; e.g. 3arcsec, a bare number is arcsec)")
    repeat_options.add_argument("--repeat-columns", metavar="NAME=COLUMN,...",
                                help="column mapping of --repeat-groups, names file and group, "
                                     "e.g. 'file=combined_file,group=GroupID'")


def repeat_inputs(args):
    """(repeat-groups table {spectrum key: group} or None, radius in arcsec or None)."""
    if args.repeat_columns and not args.repeat_groups:
        raise ValueError("--repeat-columns maps the columns of --repeat-groups: give the table too")
    radius = parse_angle_arcsec(args.repeat_radius, "--repeat-radius") if args.repeat_radius else None
    groups = read_repeat_groups(args.repeat_groups, args.repeat_columns) if args.repeat_groups else None
    return groups, radius


def parse_angle_arcsec(text, option):
    """``"3arcsec"``, ``"0.05 arcmin"``, ``"3"`` (arcsec) -> arcsec, > 0."""
    try:
        angle = u.Quantity(text)
        if angle.unit == u.dimensionless_unscaled:
            angle = angle.value * u.arcsec
        arcsec = float(angle.to_value(u.arcsec))
    except (TypeError, ValueError, u.UnitsError):
        raise ValueError(f"{option}: expected an angle such as 3arcsec, got {text!r}") from None
    if not arcsec > 0:
        raise ValueError(f"{option}: the angle must be positive, got {text!r}")
    return arcsec


def _command_line(args):
    """The command that regenerates the report, as given."""
    words = ["lamost-vac", "validate", "--model", args.model, "--spectra", *args.spectra]
    for option in ("reference", "reference_columns", "reference_name", "reference_notes",
                   "repeat_groups", "repeat_columns", "repeat_radius"):
        value = getattr(args, option)
        if value is not None and (option != "reference_name" or args.reference):
            words += ["--" + option.replace("_", "-"), value]
    if args.reference and args.reference_radius != DEFAULT_REFERENCE_RADIUS:
        words += ["--reference-radius", args.reference_radius]
    words += ["--out", args.out]
    if args.limit_per_folder is not None:
        words += ["--limit-per-folder", str(args.limit_per_folder)]
    if args.min_snrg != DEFAULT_MIN_SNRG:
        words += ["--min-snrg", f"{args.min_snrg:g}"]
    return " ".join(shlex.quote(str(word)) for word in words)


def run_validate(args):
    repeat_groups, repeat_radius = repeat_inputs(args)
    artifact = load_model(args.model)
    folders = spectrum_folders(args.spectra)
    reference = notes = None
    if args.reference:
        reference = read_reference_labels(
            args.reference, args.reference_columns, name=args.reference_name,
            radius_arcsec=parse_angle_arcsec(args.reference_radius, "--reference-radius"))
        if args.reference_notes:
            with open(args.reference_notes) as handle:
                notes = handle.read()
    n_files = sum(len(files) for _, files in folders)
    print(f"{n_files} spectrum files in {len(folders)} folders", file=sys.stderr)
    rows = validate_files(artifact, folders, reference, repeat_groups, repeat_radius,
                          limit_per_folder=args.limit_per_folder, min_snrg=args.min_snrg, n_jobs=args.jobs)
    inputs = {"spectra": [os.path.abspath(folder) for folder in args.spectra],
              "repeat_groups": ({"table": os.path.abspath(args.repeat_groups)} if args.repeat_groups else
                                {"radius_arcsec": repeat_radius} if repeat_radius else None),
              "limit_per_folder": args.limit_per_folder, "min_snrg": args.min_snrg,
              "command": _command_line(args)}
    report = write_validation_report(args.out, artifact, args.model, rows, inputs, reference, notes)

    print(f"model {artifact['version']}: {len(rows)} files")
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
    agreement = report["reference"]
    if agreement is not None:
        print(f"{agreement['name']}: {agreement['n_estimated']} of {agreement['n_with_row']} spectra with "
              f"{agreement['name']} rows estimated")
        for label in LABELS:
            s = agreement["all"][label]["all"]
            name, unit, spec = LABEL_HEADINGS[label]
            if s["n"]:
                print(f"  {name:7s} MAE {s['mae']:{spec}} {unit}  mu {s['mu']:+{spec}}  sigma {s['sigma']:{spec}}  "
                      f"(n={s['n']})")
    print(f"report -> {os.path.join(os.path.abspath(args.out), 'report.md')}")
    return 0


# ---------------------------------------------------------------------------------------
def register_calibrate_repeats(subparsers):
    parser = subparsers.add_parser(
        "calibrate-repeats", help="scale a model's _err_model to real repeat observations "
                                  "(writes a new model version)",
        description=textwrap.fill(
            "The model uncertainty _err_model is the ensemble spread scaled on cross-fitted "
            "repeats of the simulated or reference training spectra; real repeat observations "
            "also differ by what the training spectra do not show (visit-to-visit flux "
            "calibration, sky residuals). This estimates the --spectra, fits per label the one "
            "factor c that makes the pairs of spectra of one star honest (c = the rms of the pair "
            "z-scores (x_i - x_j) / sqrt(err_i^2 + err_j^2), the statistic validate reports), checks it on "
            "stars not used for the fit (2-fold star-grouped cross-validation: rms z ~ 1 when "
            "the factor carries over), and writes the model with _err_model multiplied by c as a "
            "new artifact and version (sidecar included). The calibrated _err is not changed.", 88),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model artifact from train-files or train")
    parser.add_argument("--spectra", required=True, nargs="+", metavar="FOLDER",
                        help="folders of real spectrum files (searched at any depth)")
    parser.add_argument("--out", required=True, help="the new artifact to write (e.g. model-repeats.joblib)")
    add_repeat_arguments(parser, required=True)
    parser.add_argument("--min-stars", type=positive_int, default=20,
                        help="refuse with fewer stars having two or more estimated spectra "
                             "(default 20)")
    parser.add_argument("--register", action="store_true",
                        help="also register the new version in the catalogue database (--url), "
                             "so that 'infer --stale' or the beat re-estimates with it (see "
                             "--activate); --out must then lie under --model-dir")
    add_activate_argument(parser, default=None)
    parser.add_argument("--model-dir", default=settings.model_dir,
                        help="with --register: the workers' model directory (default: "
                             "LAMOST_VAC_MODEL_DIR, now %(default)s)")
    add_url_argument(parser)
    add_jobs_argument(parser)
    parser.set_defaults(func=run_calibrate_repeats)


def run_calibrate_repeats(args):
    from collections import Counter

    from models.artifact import artifact_under, save_model
    from models.calibration import repeat_level, repeat_level_cross_validated
    from models.validation_report import repeat_members

    repeat_groups, repeat_radius = repeat_inputs(args)
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise ValueError("--out must differ from --model: the calibrated model is a new version")
    if os.path.lexists(args.out):
        # it may be a registered version's artifact: overwritten, that version could no
        # longer be loaded (its recorded hash) nor its estimates reproduced
        raise ValueError(f"--out {args.out} exists; a model artifact is never overwritten: "
                         f"choose a new file name")
    if args.activate and not args.register:
        raise ValueError("--activate applies to the registration: give --register too")
    if args.register:
        artifact_under(args.model_dir, args.out)      # where the workers will load it from
    artifact = load_model(args.model)
    rows = validate_files(artifact, spectrum_folders(args.spectra), None, repeat_groups, repeat_radius,
                          n_jobs=args.jobs)
    used = repeat_members(rows)                       # what validate's repeatability uses
    groups = [row["repeat_group"] for row in used]
    n_stars = sum(1 for n in Counter(map(str, groups)).values() if n >= 2)
    if n_stars < max(args.min_stars, 2):
        raise ValueError(f"only {n_stars} stars with two or more estimated spectra in the repeat "
                         f"groups (--min-stars {args.min_stars}): no factor fitted")
    model = artifact["model"]
    levels, summary = {}, {}
    for label in LABELS:
        values = [row[label] for row in used]
        errors = [row[label + "_err_model"] for row in used]
        level, n_pairs = repeat_level(values, errors, groups)
        if not (np.isfinite(level) and level > 0):
            raise ValueError(f"{label}: the repeats give no usable factor ({level!r} from {n_pairs} pairs)")
        cross_validated, n_scored = repeat_level_cross_validated(values, errors, groups)
        levels[label] = level
        summary[label] = {"factor": getattr(model, "repeat_levels_", {}).get(label, 1.0) * level,
                          "fitted_now": level, "n_pairs": n_pairs,
                          "z_rms_cross_validated": cross_validated, "n_pairs_cross_validated": n_scored}
    model.set_repeat_levels(levels)
    extra = dict(artifact.get("extra") or {})
    extra["repeat_levels"] = {"from_version": artifact["version"], "labels": summary,
                              "spectra": [os.path.abspath(f) for f in args.spectra],
                              "repeat_groups": (os.path.abspath(args.repeat_groups) if args.repeat_groups
                                                else f"within {repeat_radius:g} arcsec"),
                              "n_spectra": len(used), "n_stars": n_stars}
    version, sha256 = save_model(args.out, model, artifact["preprocess"], artifact["training"],
                                 artifact.get("metrics"), extra=extra)
    print(f"{len(used)} estimates of {extra['repeat_levels']['n_stars']} stars in repeat groups",
          file=sys.stderr)
    for label in LABELS:
        r = summary[label]
        print(f"  {LABEL_HEADINGS[label][0]:7s} factor {r['fitted_now']:.3f} on _err_model ({r['n_pairs']} pairs); "
              f"rms z on stars left out of the fit {r['z_rms_cross_validated']:.2f} "
              f"({r['n_pairs_cross_validated']} pairs)", file=sys.stderr)
    print(f"model {version} (from {artifact['version']}) -> {os.path.abspath(args.out)}", file=sys.stderr)
    if args.register:
        from etl import db
        from etl.registry import register_model
        from etl.training import json_safe

        engine = db.make_engine(database_url(args))
        try:
            status = register_model(
                engine, version, args.out, sha256, json_safe(artifact["training"]),
                json_safe({**(artifact.get("metrics") or {}), "repeat_levels": extra["repeat_levels"]}),
                notes=f"calibrate-repeats of {artifact['version']}",
                activate=args.activate or "when-estimated")
        finally:
            engine.dispose()
        print(registered_message(version, status, f" in {display_url(database_url(args))}"),
              file=sys.stderr)
    print(version)
    return 0
