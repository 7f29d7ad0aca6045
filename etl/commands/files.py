"""File-based science commands: ``train-files`` and ``predict-files``.

They need no database: a catalogue file, a folder of spectra and (for training) a label
file are enough. The database-backed flow (``train``, ``infer``) uses the same functions.
"""
import json
import os
import sys
import warnings

import numpy as np
from astropy.table import Table

from etl import schema
from etl.commands import (add_jobs_argument, at_least, fraction, non_negative_float,
                          non_negative_int, positive_float, positive_int)
from etl.filesets import best_match, catalogue_evidence, read_catalogue, read_labels
from etl.label_domain import add_label_domain_argument, parse_label_domain, select_label_domain
from etl.training import train_with_degraded_copies
from models.artifact import load_model, save_model
from models.augment import DEFAULT_DEGRADED_COPIES
from models.flags import NOT_A_STAR, UNUSABLE_SPECTRUM
from models.labels import ESTIMATE_SUFFIXES, LABELS
from models.lasso_mlpnet import PAPER_PARAMETERS, PAPER_SNR_RANGE
from models.pipeline import featurise_files, predict_features, unfit_for_training
from models.preprocess import (CONTINUUM_MODES, DEFAULT_MASKED_REGIONS, INSTRUMENT_REGIONS,
                               PreprocessConfig, masked_regions_from_names)
from models.progress import progress
from models.report import describe_label_domain, table_format, write_table
from models.training import DEFAULT_CALIBRATION_FOLDS, DEFAULT_TRAINING_SNR


def parse_range(text, what):
    """``"10,20"`` -> (10.0, 20.0), with a message naming the option on bad input."""
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"{what}: expected two numbers 'LOW,HIGH', got {text!r}") from None
    if not lo < hi:
        raise SystemExit(f"{what}: LOW must be below HIGH, got {text!r}")
    return lo, hi


def add_training_arguments(parser):
    """Options shared by ``train`` (database) and ``train-files``."""
    parser.add_argument("--snr-range", default=None,
                        help="SNRg range of training spectra, LOW,HIGH (LOW < SNRg <= HIGH; default "
                             f"{DEFAULT_TRAINING_SNR[0]:g},{DEFAULT_TRAINING_SNR[1]:g}, the method's valid "
                             "range, chosen by cross-validation over 10,20, the paper's, which "
                             "--paper keeps)")
    parser.add_argument("--wave-range", default="3881,8890", help="rest-frame wavelength range in "
                        "Angstrom (use 3881,7400 for MILES-based simulated data)")
    parser.add_argument("--mask-regions", default=",".join(n for n, _, _ in DEFAULT_MASKED_REGIONS),
                        help="observed-frame instrument regions filled like masked pixels, comma-"
                             f"separated, or 'none' (known: {', '.join(INSTRUMENT_REGIONS)}; "
                             "default %(default)s)")
    parser.add_argument("--continuum", choices=CONTINUUM_MODES, default="single",
                        help="one pseudo-continuum polynomial (the paper's, default) or one per "
                             "spectrograph arm")
    parser.add_argument("--despike-sigma", type=non_negative_float, default=PreprocessConfig.despike_sigma,
                        help="mask one- and two-pixel spikes (cosmic rays, which LAMOST marks in "
                             "the or-mask only) standing this many sigma above the running median "
                             "of the observed pixels (default %(default)s; 0 = none, the paper's)")
    parser.add_argument("--ensemble", type=positive_int, default=10, help="networks per label (default 10)")
    parser.add_argument("--holdout", type=fraction, default=0.0,
                        help="fraction of the stars held out of training to calibrate the "
                             "uncertainties on; 0 (default): every star trains the model and the "
                             "uncertainties are calibrated on cross-fitted predictions")
    parser.add_argument("--calibration-folds", type=at_least(2), default=None,
                        help="star-grouped folds of the cross-fitting (default "
                             f"{DEFAULT_CALIBRATION_FOLDS}; each costs one more training)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=positive_int, default=None,
                        help="MLP epoch limit (default: the model's; lower for quick trials)")
    parser.add_argument("--lasso-folds", type=at_least(2), default=None,
                        help="LASSO cross-validation folds (default 10, as in the paper)")
    parser.add_argument("--input-noise", type=non_negative_float, default=None,
                        help="std of the Gaussian noise added to the networks' standardised "
                             "training inputs (default 1.0, chosen by CV; 0 = none)")
    parser.add_argument("--flux-noise", type=non_negative_float, default=None,
                        help="std of the Gaussian noise in units of the normalised flux (as an "
                             "observation's, 1/SNR) added to the same inputs (default 0: "
                             "measured by CV, not better)")
    parser.add_argument("--huber-delta", type=non_negative_float, default=None,
                        help="the networks' loss: Huber, linear beyond this residual in units "
                             "of the standardised label (default: the model's; 0 = squared "
                             "error, the paper's)")
    parser.add_argument("--degraded-copies", type=non_negative_int, default=None,
                        help="low-S/N copies (SNRg 5-20, noise drawn from the spectrum's own "
                             "inverse variance) of every training spectrum above SNRg 20 that "
                             f"train the networks beside it (default {DEFAULT_DEGRADED_COPIES}, "
                             "chosen by CV; 0 = none, the paper's; each copy costs one "
                             "spectrum's features in memory and in training time)")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's network configuration instead of this project's "
                             "defaults, to compare with: published hidden sizes (400,50), "
                             "(600,50), (600,100), the authors' per-label learning rates "
                             "9e-4, 2e-5, 3e-4, L2 1e-4, batches of 200, early stopping "
                             "after 10 epochs, at most 2000, no input noise, training spectra "
                             "10 < SNRg <= 20 (with --ensemble 10; options given explicitly "
                             "still apply)")
    add_jobs_argument(parser)
    add_label_domain_argument(parser)


def preprocess_config(args):
    """The PreprocessConfig of the training options (--wave-range, --mask-regions, --continuum,
    --despike-sigma)."""
    wave = parse_range(args.wave_range, "--wave-range")
    try:
        regions = masked_regions_from_names(args.mask_regions)
    except ValueError as error:
        raise SystemExit(f"--mask-regions: {error}") from None
    return PreprocessConfig(wave_min=wave[0], wave_max=wave[1], masked_regions=regions,
                            continuum=args.continuum, despike_sigma=args.despike_sigma)


# train_lasso_mlpnet keyword (a LassoMLPNet parameter, or calibration_folds) <- command-line
# option (argparse dest) of the tuning options
TUNING_OPTIONS = {"max_epochs": "max_epochs", "cv": "lasso_folds", "input_noise": "input_noise",
                  "flux_noise": "flux_noise", "huber_delta": "huber_delta",
                  "calibration_folds": "calibration_folds"}


def training_snr_range(args):
    """(LOW, HIGH) of the training spectra: --snr-range, else the paper's with --paper,
    else the default."""
    if args.snr_range is not None:
        return parse_range(args.snr_range, "--snr-range")
    return PAPER_SNR_RANGE if args.paper else DEFAULT_TRAINING_SNR


def degraded_copies_per_spectrum(args):
    """--degraded-copies, else none with --paper, else the default."""
    if args.degraded_copies is not None:
        return args.degraded_copies
    return 0 if args.paper else DEFAULT_DEGRADED_COPIES


def model_parameters(args):
    """train_lasso_mlpnet keyword arguments of --paper and of the tuning options given
    (beyond --ensemble, --jobs, --holdout)."""
    params = {k: v for k, v in PAPER_PARAMETERS.items() if k != "n_members"} if args.paper else {}
    params.update({param: getattr(args, option) for param, option in TUNING_OPTIONS.items()
                   if getattr(args, option) is not None})
    return params


def print_held_out(metrics):
    """Out-of-sample accuracy of the calibration predictions (held-out or cross-fitted)."""
    for key, name in (("held_out", "held-out"), ("cross_fitted", "cross-fitted")):
        for label, per in metrics.get(key, {}).items():
            s = per["all"]
            if s["n"]:
                print(f"{name} {label}: MAE {s['mae']:.4g}  mu {s['mu']:+.3g}  sigma {s['sigma']:.4g} "
                      f"(n={s['n']})", file=sys.stderr)


def _add_catalogue_arguments(parser, jobs=True):
    parser.add_argument("--catalog", required=True,
                        help="LAMOST LRS catalogue (CSV or FITS, .gz ok) with obsid, ra, dec, snrg, z "
                             "and filename or lmjd/planid/spid/fiberid")
    parser.add_argument("--spectra-root", required=True,
                        help="folder holding the spec-*.fits[.gz] files, at any depth")
    if jobs:
        add_jobs_argument(parser)


def register(subparsers):
    train = subparsers.add_parser(
        "train-files", help="train LASSO-MLPNet from a catalogue, spectra and a label file",
        description="Cross-match catalogue rows to reference labels (best match within the "
                    "radius, good_flag == 1 only), train one LASSO selection and an ensemble of "
                    "sigmoid MLPs per label, calibrate the uncertainties on cross-fitted (or "
                    "held-out) predictions, and write the model artifact.")
    _add_catalogue_arguments(train, jobs=False)
    add_training_arguments(train)
    train.add_argument("--labels", required=True,
                       help="APOGEE Payne label catalogue (2-D 'payne' column or flat TEFF/LOGG/FE_H)")
    train.add_argument("--label-columns", default=None,
                       help="explicit column mapping, e.g. 'teff=TEFF,logg=LOGG,feh=PARAM_M_H'")
    train.add_argument("--out", required=True, help="artifact file to write (e.g. model.joblib)")
    train.add_argument("--radius", type=positive_float, default=3.0, help="cross-match radius, arcsec")
    train.add_argument("--baselines", action="store_true",
                       help="also fit the paper's six comparison models on the same features and "
                            "store them in the artifact (for evaluate's comparison table)")
    train.set_defaults(func=run_train_files)

    predict = subparsers.add_parser(
        "predict-files", help="estimate Teff, log g, [Fe/H] for the spectra of a catalogue",
        description="Read every catalogue spectrum, preprocess and predict with a model artifact; "
                    "write obsid, each label with <label>_err (the calibrated 1-sigma uncertainty "
                    "to quote) and <label>_err_model (the ensemble spread), flags and the "
                    "model version (CSV, FITS or VOTable by the output's extension).")
    _add_catalogue_arguments(predict)
    predict.add_argument("--model", required=True, help="model artifact from train-files or train")
    predict.add_argument("--out", required=True, help="output table: .csv, .fits or .xml/.vot")
    predict.set_defaults(func=run_predict_files)


def run_train_files(args):
    config = preprocess_config(args)
    snr_range = training_snr_range(args)
    label_domain = parse_label_domain(args.label_domain)
    catalogue, missing = read_catalogue(args.catalog, args.spectra_root)
    labels = read_labels(args.labels, args.label_columns)
    matched = best_match(catalogue, labels, args.radius)
    inside, domain_record = select_label_domain(matched, label_domain)
    matched = matched[inside]
    print(f"{len(catalogue)} catalogue spectra with files ({len(missing)} without), "
          f"{int(labels['good'].sum())} good labels, {len(matched) + int((~inside).sum())} matched "
          f"within {args.radius}\"; training on {describe_label_domain(domain_record)}",
          file=sys.stderr)
    feature_set = featurise_files(matched["path"], matched["z"], config, n_jobs=args.jobs,
                                  progress=lambda it, total: progress(it, total, "preprocessing"))
    features, errors = feature_set.features, feature_set.errors
    for index, reason in sorted(errors.items()):
        print(f"skipped {matched['path'][index]}: {reason}", file=sys.stderr)
    unfit, excluded = unfit_for_training(feature_set, matched["class"])
    features[unfit] = np.nan
    if unfit.any():
        print(f"not trained on: {excluded['not_star']} spectra whose class is not STAR, "
              f"{excluded['suspicious_redshift']} with a suspicious redshift", file=sys.stderr)
    model, training, metrics = train_with_degraded_copies(
        matched["path"], feature_set.z, features, {k: matched[k] for k in LABELS}, matched["snrg"],
        matched["apogee_id"], matched["obsid"], np.column_stack([matched["ra"], matched["dec"]]),
        degraded_copies_per_spectrum(args), config, seed=args.seed, n_jobs=args.jobs,
        snr_range=snr_range, holdout_fraction=args.holdout, n_members=args.ensemble,
        **model_parameters(args))
    training.update(catalogue=os.path.abspath(args.catalog), labels=os.path.abspath(args.labels),
                    radius_arcsec=args.radius, excluded=excluded, **domain_record)
    extra = {}
    if args.baselines:
        from models.baselines import fit_baselines_on_training_set
        extra["baselines"] = fit_baselines_on_training_set(
            model, features, {k: matched[k] for k in LABELS}, matched["snrg"], matched["apogee_id"],
            matched["obsid"], training, random_state=args.seed, n_jobs=args.jobs,
            progress=lambda labels: progress(labels, len(labels), "baselines"))
    version, sha = save_model(args.out, model, config, training, metrics, extra=extra)
    summary = {"version": version, "artifact": os.path.abspath(args.out), "sha256": sha,
               "n_train": training["n_spectra"]}
    print(json.dumps({k: summary[k] for k in ("version", "artifact", "n_train")}))
    print_held_out(metrics)
    return 0


def predict_catalogue(artifact, catalogue, n_jobs=-1, return_features=False):
    """Estimates for every catalogue row as an astropy Table (one row per spectrum).

    ``return_features=True`` also returns the features the model saw (NaN rows for spectra
    not estimated), so other models can be scored on the same spectra without reading
    the files again.
    """
    model = artifact["model"]
    is_star = np.char.upper(np.char.strip(np.asarray(catalogue["class"], dtype=str))) == "STAR"
    feature_set = featurise_files(catalogue["path"], catalogue["z"], artifact["preprocess"],
                                  n_jobs=n_jobs,
                                  progress=lambda it, total: progress(it, total, "preprocessing"))
    features, errors = feature_set.features, feature_set.errors
    features[~is_star] = np.nan            # galaxies and QSOs are not estimated as stars
    estimates = predict_features(model, feature_set, catalogue["snrg"], **catalogue_evidence(catalogue))
    out = Table()
    out["obsid"] = catalogue["obsid"]
    for label in LABELS:
        for suffix in ESTIMATE_SUFFIXES:
            out[label + suffix] = estimates[label + suffix]
    flags = estimates["flags"]
    flags = np.where(is_star, flags, (flags & ~UNUSABLE_SPECTRUM) | NOT_A_STAR)
    out["flags"] = flags
    problems = [errors.get(i) or ("class is not STAR" if not star else estimates["problem"].get(i, ""))
                for i, star in enumerate(is_star)]
    out["problem"] = np.array(problems, dtype=f"U{max([80, *map(len, problems)])}")
    out["model_version"] = artifact["version"]
    return (out, features) if return_features else out


PROBLEM_DESCRIPTION = "why the spectrum was not estimated (empty when it was)"


def _output_description(name):
    """The catalogue's description of a predict-files column (``etl/schema.py``)."""
    if name == "problem":
        return schema.ColumnDescription(name, "text", None, "meta.note", PROBLEM_DESCRIPTION,
                                        True)
    return schema.column_info("estimates", name)


def write_predictions(table, path):
    """The predict-files table by extension (``models.report.write_table``), its FITS and
    VOTable with the units, UCDs and descriptions (the flag bits included) that the
    catalogue declares and ``export`` writes."""
    write_table(table, path)
    descriptions = [_output_description(name) for name in table.colnames]
    if table_format(path) == "fits":
        from astropy.io import fits

        with fits.open(path, mode="update") as hdus:
            schema.describe_fits_columns(hdus[1].header, descriptions)
    elif table_format(path) == "votable":
        from astropy.io.votable import from_table, writeto
        from astropy.io.votable.exceptions import VOWarning

        votable = from_table(table)
        for field, described in zip(votable.get_first_table().fields, descriptions):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", VOWarning)    # W50: not a unit it knows
                field.unit = described.unit
            field.ucd, field.description = described.ucd, described.description
        writeto(votable, path)


def run_predict_files(args):
    artifact = load_model(args.model)
    catalogue, missing = read_catalogue(args.catalog, args.spectra_root)
    table = predict_catalogue(artifact, catalogue, n_jobs=args.jobs)
    for obsid in missing:                  # every catalogue row appears once in the output
        table.add_row({"obsid": obsid, "flags": UNUSABLE_SPECTRUM, "model_version": artifact["version"],
                       "problem": "no spectrum file under --spectra-root",
                       **{c: np.nan for c in table.colnames if c.startswith(LABELS)}})
    write_predictions(table, args.out)
    n_estimated = int(np.isfinite(table["teff"]).sum())
    print(f"{len(table)} spectra: {n_estimated} estimated, {len(table) - n_estimated} not "
          f"(unreadable, unusable, no usable redshift or not STAR), {len(missing)} catalogue rows "
          f"without a file "
          f"-> {args.out}", file=sys.stderr)
    return 0
