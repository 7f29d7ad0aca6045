"""``lamost-vac evaluate``: accuracy of a model against reference labels, as in the paper.

Predicts every catalogue spectrum that has a reference (labels cross-matched like
``train-files``, or a truth CSV joined by obsid) and writes the report folder that
:mod:`models.evaluation_report` builds (report.json, report.md, estimates, figures).

Spectra of the model's training stars (the artifact stores their obsids and star ids) are
left out of every statistic, and the command refuses to run when nothing else is left;
``--include-training`` keeps them, marks them (``in_training`` column) and says so at the
top of the report.
"""
import os
import sys

from etl.commands import positive_float
from etl.commands.files import _add_catalogue_arguments, predict_catalogue
from etl.filesets import best_match, join_truth, read_catalogue, read_labels, read_truth
from models.artifact import load_model
from models.evaluation_report import (UNKNOWN_TRAINING_NOTE, evaluate_estimates, training_overlap,
                                      write_evaluation_report)
from models.labels import LABELS
from models.report import LABEL_HEADINGS, fmt


def register(subparsers):
    parser = subparsers.add_parser(
        "evaluate", help="accuracy of a model against reference labels: tables and figures",
        description="Predict the catalogue's spectra, join them to reference labels (cross-match "
                    "like train-files, or a truth CSV by obsid) and write report.json, report.md, "
                    "the estimates and the paper's figures into the report folder. Use spectra of "
                    "stars that were not in the training set.")
    _add_catalogue_arguments(parser)
    parser.add_argument("--model", required=True, help="model artifact from train-files or train")
    reference = parser.add_mutually_exclusive_group(required=True)
    reference.add_argument("--labels", help="label catalogue to cross-match (as in train-files; "
                                            "good_flag == 1 only)")
    reference.add_argument("--truth", help="CSV of obsid, teff, logg, feh (e.g. lamost_sim's truth.csv)")
    parser.add_argument("--label-columns", default=None,
                        help="explicit column mapping for --labels, e.g. 'teff=TEFF,logg=LOGG,feh=PARAM_M_H'")
    parser.add_argument("--radius", type=positive_float, default=3.0, help="cross-match radius for --labels, arcsec")
    parser.add_argument("--out", required=True, help="report folder (created; files are overwritten)")
    parser.add_argument("--include-training", action="store_true",
                        help="keep spectra of the model's training stars in the statistics (marked; "
                             "by default they are left out, and evaluate refuses when nothing else is left)")
    parser.set_defaults(func=run_evaluate)


def run_evaluate(args):
    artifact = load_model(args.model)
    catalogue, missing = read_catalogue(args.catalog, args.spectra_root)
    if args.truth:
        rows = join_truth(catalogue, read_truth(args.truth))
        reference_info = {"kind": "truth", "path": os.path.abspath(args.truth)}
    else:
        labels = read_labels(args.labels, args.label_columns)
        rows = best_match(catalogue, labels, args.radius)
        reference_info = {"kind": "labels", "path": os.path.abspath(args.labels), "radius_arcsec": args.radius}
    if len(rows) == 0:
        raise SystemExit("evaluate: no catalogue spectrum has a reference label "
                         "(check --truth obsids, or --labels positions and --radius)")
    print(f"{len(catalogue)} catalogue spectra with files ({len(missing)} without), "
          f"{len(rows)} with a reference", file=sys.stderr)
    with_reference = len(rows)
    in_training = training_overlap(artifact["model"], rows)
    left_out = 0
    if in_training is None:
        print(f"evaluate: {UNKNOWN_TRAINING_NOTE}", file=sys.stderr)
    elif in_training.any() and not args.include_training:
        left_out = int(in_training.sum())
        if left_out == len(rows):
            raise SystemExit(f"evaluate: all {left_out} spectra with a reference belong to the model's "
                             "training stars; evaluate on held-out stars (or pass --include-training "
                             "for a report that is not a validation)")
        print(f"evaluate: {left_out} spectra of the model's training stars left out", file=sys.stderr)
        rows, in_training = rows[~in_training], in_training[~in_training]
    estimates, features = predict_catalogue(artifact, rows, n_jobs=args.jobs, return_features=True)
    reference, snrg, accuracy, baseline_predictions, comparison = evaluate_estimates(
        artifact, rows, estimates, features)
    counts = {"catalogue_rows": len(catalogue), "without_file": len(missing), "with_reference": with_reference,
              "training_left_out": left_out, "evaluated": len(rows)}
    report = write_evaluation_report(args.out, artifact, args.model, reference_info, counts, estimates,
                                     reference, snrg, accuracy, baseline_predictions, comparison, in_training)
    print(f"model {artifact['version']}: {report['counts']['estimated']} of {len(rows)} spectra with references estimated")
    for label in LABELS:
        name, unit, spec = LABEL_HEADINGS[label]
        s = accuracy[label]["all"]
        if s["n"]:
            print(f"{name:7s} MAE {s['mae']:{spec}} {unit}  mu {s['mu']:+{spec}}  sigma {s['sigma']:{spec}}  "
                  f"within 1/2 err {fmt(s['within_1'], '.0%')}/{fmt(s['within_2'], '.0%')}  (n={s['n']})")
    if comparison:
        print("MAE by method: " + "; ".join(
            f"{method} " + "/".join(fmt(acc[label]["all"]["mae"], LABEL_HEADINGS[label][2]) for label in LABELS)
            for method, acc in comparison.items()))
    print(f"report -> {os.path.join(os.path.abspath(args.out), 'report.md')}")
    return 0
