"""The ``evaluate`` report: accuracy of a model against reference labels, as in the paper.

From the estimates of spectra with reference labels (``lamost-vac evaluate`` predicts them
and joins the references) this module computes, and writes into a report folder:

- ``report.json``: MAE, mu, sigma per label overall and per SNRg bin, uncertainties per
  bin; how the calibrated uncertainty ``<label>_err`` covers the residuals (rms z-score,
  fractions within +-1 and +-2 err) per bin; the model's calibration counts; the
  LASSO-selected pixels in each instrument region (dichroic, telluric bands, sky lines;
  whether the model's preprocessing masks it), the count of spectra carrying each flag
  bit, and (when the artifact was trained with ``--baselines``) the comparison with the
  paper's six baselines in the layout of its Table 4;
- ``report.md``: the same as readable tables;
- ``estimates.csv`` (and ``baseline_estimates.csv``): per spectrum estimates and references;
- PNG figures: estimate vs reference with residual histograms (Fig. 5), MAE and sigma vs
  SNRg (Figs. 8-9), uncertainty vs SNRg (Fig. 10), the reliability diagram (coverage
  against nominal level) and the Kiel diagram.

Spectra of the model's training stars are recognised by :func:`training_overlap` (the
artifact stores their obsids, star ids and positions), so that they can be left out.
"""
import os

import numpy as np

from .baselines import BASELINE_NAMES, MODEL_NAME
from .flags import FLAG_DESCRIPTIONS
from .lasso_mlpnet import LABELS, SNR_BINS
from .metrics import accuracy_by_snr, coverage_by_snr, snr_bin_names
from .pipeline import selected_pixels_by_region
from .plots import (accuracy_vs_snr, kiel_diagram, predicted_vs_reference, reliability_diagram,
                    uncertainty_vs_snr)
from .report import (LABEL_HEADINGS, accuracy_table, describe_label_domain, fmt, label_head,
                     summary_cells, table, write_report_files, write_table)

PLOT_FILES = {"predicted_vs_reference": "predicted_vs_reference.png",
              "accuracy_vs_snr": "accuracy_vs_snr.png",
              "uncertainty_vs_snr": "uncertainty_vs_snr.png",
              "reliability": "reliability.png",
              "kiel": "kiel_diagram.png"}
# a spectrum this close to a training spectrum is taken as the same star (LAMOST fibre
# positions of one star agree to well under an arcsecond; the label cross-match uses 3")
TRAINING_STAR_RADIUS_ARCSEC = 3.0
HELD_OUT_NOTE = ("Spectra of the model's training stars (by obsid, by position within "
                 f"{TRAINING_STAR_RADIUS_ARCSEC:g}\" and, with cross-matched labels, by star id) are "
                 "left out of these statistics.")
TRAINING_INCLUDED_NOTE = ("**Not a validation:** {n} of these spectra belong to the model's training "
                          "stars (--include-training); their residuals and coverages are optimistic.")
UNKNOWN_TRAINING_NOTE = ("This artifact does not record its training spectra: overlap with the "
                         "training set cannot be detected. Use spectra of stars held out from training.")


# -- training stars ----------------------------------------------------------------------
def training_overlap(model, rows):
    """Boolean per row: the spectrum (obsid) or its star was in the model's training set --
    the star by ``apogee_id`` when the rows were cross-matched to labels, and by position
    (within ``TRAINING_STAR_RADIUS_ARCSEC`` of a training spectrum) when the model records
    where its stars are; None when the model does not record its training set."""
    obsids = getattr(model, "training_obsids_", None)
    if obsids is None:
        return None
    overlap = np.isin(np.asarray(rows["obsid"], dtype=np.int64), np.asarray(obsids, dtype=np.int64))
    stars = getattr(model, "training_stars_", None)
    if stars is not None and "apogee_id" in rows.colnames:
        overlap |= np.isin(np.asarray(rows["apogee_id"], dtype=str), np.asarray(stars, dtype=str))
    positions = getattr(model, "training_positions_", None)
    if positions is not None and len(positions) and len(rows):
        from astropy import units as u
        from astropy.coordinates import SkyCoord

        here = SkyCoord(np.asarray(rows["ra"], dtype=float), np.asarray(rows["dec"], dtype=float), unit="deg")
        trained = SkyCoord(positions[:, 0], positions[:, 1], unit="deg")
        _, separation, _ = here.match_to_catalog_sky(trained)
        overlap |= separation < TRAINING_STAR_RADIUS_ARCSEC * u.arcsec
    return overlap


# -- numbers -----------------------------------------------------------------------------
def _number(value):
    value = float(value)
    return value if np.isfinite(value) else None


def _median(values):
    values = values[np.isfinite(values)]
    return _number(np.median(values)) if values.size else None


def uncertainty_by_snr(estimates, snrg, model, bins=SNR_BINS):
    """Per label and SNRg bin: count, median model uncertainty (``_err_model``), median
    calibrated one (``_err``) and the number of spectra the model's calibration had there."""
    snrg = np.asarray(snrg, dtype=float)
    counts = np.asarray(getattr(model, "calibration_counts_", np.zeros(len(bins) - 1)), dtype=int)
    out = {}
    for label in LABELS:
        err_model = np.asarray(estimates[label + "_err_model"], dtype=float)
        err = np.asarray(estimates[label + "_err"], dtype=float)
        per = {}
        for k, (name, lo, hi) in enumerate(zip(snr_bin_names(bins), bins[:-1], bins[1:])):
            inside = (snrg > lo) & (snrg <= hi) & np.isfinite(np.asarray(estimates[label], dtype=float))
            per[name] = {"n": int(inside.sum()), "median_model_err": _median(err_model[inside]),
                         "median_err": _median(err[inside]),
                         "calibration_spectra": int(counts[k]) if k < counts.size else 0}
        out[label] = per
    return out


def evaluate_estimates(artifact, rows, estimates, features):
    """References, SNRg, LASSO-MLPNet accuracy and, when the artifact carries baselines,
    their predictions and accuracy, for catalogue rows with reference labels (``rows``:
    teff, logg, feh, snrg), their ``estimates`` and the ``features`` the model saw."""
    reference = {label: np.asarray(rows[label], dtype=float) for label in LABELS}
    snrg = np.asarray(rows["snrg"], dtype=float)
    accuracy = accuracy_by_snr(estimates, reference, snrg)
    for label in LABELS:     # how the quoted uncertainty covers the residuals, bin by bin
        coverage = coverage_by_snr(estimates, reference, snrg, labels=(label,))[label]
        for name, summary in coverage.items():
            accuracy[label][name].update({k: summary[k] for k in ("z_std", "within_1", "within_2")})
    baselines = (artifact.get("extra") or {}).get("baselines")
    baseline_predictions, comparison = None, None
    if baselines is not None:
        # the same spectra for every method: those LASSO-MLPNet estimated (the features of
        # galaxies, QSOs and unusable spectra are NaN, which every baseline skips)
        baseline_predictions = baselines.predict(features)
        comparison = {}
        for name in BASELINE_NAMES:
            if all(name in baseline_predictions.get(label, {}) for label in LABELS):
                comparison[name] = accuracy_by_snr({label: baseline_predictions[label][name] for label in LABELS},
                                                   reference, snrg)
        comparison[MODEL_NAME] = accuracy
    return reference, snrg, accuracy, baseline_predictions, comparison


# -- report ------------------------------------------------------------------------------
def flag_counts(flags):
    """Spectra carrying each flag bit (every bit listed, zeros included)."""
    flags = np.asarray(flags, dtype=np.int64)
    return {str(bit): {"meaning": text, "n": int(np.sum(flags & bit > 0))}
            for bit, text in FLAG_DESCRIPTIONS.items()}


def region_table_md(regions):
    rows = [[name, f"{r['range'][0]:g}-{r['range'][1]:g}", "yes" if r["masked"] else "no",
             str(r["pixels"]), *(str(r[label]) for label in LABELS)]
            for name, r in regions.items()]
    return table(["region", "observed A", "masked", "pixels", *(LABEL_HEADINGS[label][0]
                                                                        for label in LABELS)], rows)


def flag_table_md(counts):
    return table(["bit", "meaning", "spectra"],
                          [[bit, c["meaning"], str(c["n"])] for bit, c in counts.items()])


def accuracy_table_md(accuracy, bins=SNR_BINS):
    return accuracy_table(accuracy, ["all"] + snr_bin_names(bins))


def comparison_table_md(comparison, snr_bin="all"):
    """The paper's Table 4 layout: one row per method, MAE / mu / sigma per label."""
    return table(["Method"] + label_head(("MAE", "mu", "sigma")),
                          [[method] + summary_cells(accuracy, snr_bin)
                           for method, accuracy in comparison.items()])


def uncertainty_table_md(uncertainty, bins=SNR_BINS):
    rows = []
    for name in snr_bin_names(bins):
        cells = [name, str(uncertainty[LABELS[0]][name]["n"]),
                 str(uncertainty[LABELS[0]][name]["calibration_spectra"])]
        for label in LABELS:
            spec = LABEL_HEADINGS[label][2]
            u = uncertainty[label][name]
            cells += [fmt(u["median_model_err"], spec), fmt(u["median_err"], spec)]
        rows.append(cells)
    return table(["SNRg", "N", "N calibration"] +
                          label_head(("_err_model, median", "_err, median")), rows)


def coverage_table_md(accuracy, bins=SNR_BINS):
    """Per SNRg bin: rms z-score and the fractions within +-1 and +-2 ``_err`` per label."""
    rows = []
    for name in ["all"] + snr_bin_names(bins):
        cells = [name, str(accuracy[LABELS[0]][name]["n"])]
        for label in LABELS:
            s = accuracy[label][name]
            cells += [fmt(s.get("z_std"), ".2f"), fmt(s.get("within_1"), ".1%"), fmt(s.get("within_2"), ".1%")]
        rows.append(cells)
    return table(["SNRg", "N"] + [f"{LABEL_HEADINGS[label][0]} {kind}" for label in LABELS
                                           for kind in ("z std", "within 1 err", "within 2 err")], rows)


def report_markdown(report):
    model, ref, counts = report["model"], report["reference"], report["counts"]
    training = model.get("training", {})
    source = (f"truth table `{ref['path']}` joined by obsid" if ref["kind"] == "truth" else
              f"labels `{ref['path']}` cross-matched within {ref['radius_arcsec']:g}\" (good_flag == 1)")
    parts = [
        f"# Evaluation of model {model['version']}",
        "",
        f"- Model: `{model['artifact']}`, trained on {training.get('n_spectra', '?')} spectra "
        f"with SNRg in {training.get('snr_range', '?')}, {describe_label_domain(training)}.",
        f"- Reference: {source}.",
        f"- Spectra: {counts['catalogue_rows']} catalogue rows with a file ({counts['without_file']} without), "
        f"{counts['with_reference']} with a reference, {counts['estimated']} estimated, "
        f"{counts['in_domain']} of them without quality flags; "
        f"{counts['training_left_out']} spectra of training stars left out.",
        "",
        f"> {report['note']}",
        "",
        "Residuals are estimate - reference; mu is their mean, sigma their standard deviation; "
        "SNRg bins are (low, high].",
        "",
        "## LASSO-MLPNet accuracy by SNRg",
        "",
        accuracy_table_md(report["accuracy"]),
        "",
        "## Uncertainties by SNRg",
        "",
        "`_err_model`: the ensemble members' standard deviation, scaled to match repeat "
        "observations; `_err`: the calibrated 1-sigma uncertainty to quote (medians over the bin's "
        "spectra). N calibration: out-of-sample spectra the model's calibration had in the bin "
        "(fewer than 30: `_err` is NaN there).",
        "",
        uncertainty_table_md(report["uncertainty"]),
        "",
        "## Do the uncertainties cover the residuals?",
        "",
        "z = (estimate - reference) / `_err`; z std is its root mean square (1 when honest); the "
        "fractions of residuals within +-1 and +-2 `_err` should be about 68% and 95% "
        "(acceptance: 62-74% and 92-98% in every bin with at least 30 spectra).",
        "",
        coverage_table_md(report["accuracy"]),
        "",
    ]
    parts += [
        "## Instrument regions",
        "",
        "LASSO-selected pixels of each label whose rest wavelength lies in a region where the "
        "instrument or the atmosphere spoils the data (limits in the observed frame; a star's "
        "redshift moves them by < 20 A). Masked regions are filled from their edges in every "
        "spectrum before the continuum fit (`PreprocessConfig.masked_regions`).",
        "",
        region_table_md(report["instrument_regions"]),
        "",
        "## Quality flags",
        "",
        flag_table_md(report["flags"]),
        "",
    ]
    comparison = report.get("comparison")
    if comparison:
        parts += ["## Comparison with the baselines (paper Table 4 layout)", "",
                  "Every method uses the same features: the scaled pixels each label's LASSO selected.", "",
                  "### All SNRg", "", comparison_table_md(comparison, "all"), ""]
        for name in snr_bin_names(SNR_BINS):
            if comparison[MODEL_NAME][LABELS[0]][name]["n"]:
                parts += [f"### SNRg {name}", "", comparison_table_md(comparison, name), ""]
        seconds = report["baselines"]["fit_seconds"]
        parts += ["Baseline training time (s, on the model's training spectra): " +
                  ", ".join(f"{name} {sum(seconds[l].get(name, 0.0) for l in seconds):.2f}"
                            for name in BASELINE_NAMES) + ".", ""]
    else:
        parts += ["No baselines in this artifact (train with `train-files --baselines` to compare).", ""]
    parts += ["## Figures", ""]
    titles = {"predicted_vs_reference": "Estimates against references, with residual histograms",
              "accuracy_vs_snr": "MAE and sigma against SNRg",
              "uncertainty_vs_snr": "Model and calibrated uncertainty against SNRg",
              "reliability": "Reliability: coverage of the calibrated uncertainty against nominal level",
              "kiel": "Kiel diagram"}
    for key, filename in report["files"]["plots"].items():
        parts += [f"### {titles[key]}", "", f"![{titles[key]}]({filename})", ""]
    return "\n".join(parts)


def write_evaluation_report(out_dir, artifact, artifact_path, reference_info, counts, estimates, reference,
                            snrg, accuracy, baseline_predictions, comparison, in_training=None):
    """Write the report folder (see the module docstring) and return the report.

    ``reference_info``: where the references come from (``kind`` "truth" or "labels",
    ``path``, ``radius_arcsec``); ``counts``: the spectra read (catalogue_rows,
    without_file, with_reference, training_left_out, evaluated), to which the numbers
    estimated and estimated without quality flags (in_domain) are added; ``in_training``:
    per row, whether it belongs to a training star (None: the artifact does not say).
    """
    os.makedirs(out_dir, exist_ok=True)
    model = artifact["model"]
    estimated = np.isfinite(np.asarray(estimates["teff"], dtype=float))
    counts = {**counts, "estimated": int(estimated.sum()),
              "in_domain": int((estimated & (np.asarray(estimates["flags"]) == 0)).sum())}
    estimates_table = estimates.copy()
    estimates_table["snrg"] = snrg
    if in_training is not None:
        estimates_table["in_training"] = np.asarray(in_training, dtype=bool)
    if in_training is None:
        note = UNKNOWN_TRAINING_NOTE
    elif np.any(in_training):
        note = TRAINING_INCLUDED_NOTE.format(n=int(np.sum(in_training)))
    else:
        note = HELD_OUT_NOTE
    for label in LABELS:
        estimates_table[label + "_ref"] = reference[label]
    write_table(estimates_table, os.path.join(out_dir, "estimates.csv"))
    files = {"estimates": "estimates.csv"}
    if baseline_predictions is not None:
        baseline_table = estimates[["obsid"]].copy()
        for label, per in baseline_predictions.items():
            for name, values in per.items():
                baseline_table[f"{label}_{name.lower().replace('-', '_')}"] = values
        write_table(baseline_table, os.path.join(out_dir, "baseline_estimates.csv"))
        files["baseline_estimates"] = "baseline_estimates.csv"

    predicted = {label: np.asarray(estimates[label], dtype=float) for label in LABELS}
    plots = PLOT_FILES
    predicted_vs_reference(os.path.join(out_dir, plots["predicted_vs_reference"]), predicted, reference, snrg)
    accuracy_vs_snr(os.path.join(out_dir, plots["accuracy_vs_snr"]), accuracy,
                    methods={k: v for k, v in (comparison or {}).items() if k != MODEL_NAME})
    errors = {suffix: {label: np.asarray(estimates[label + suffix], dtype=float) for label in LABELS}
              for suffix in ("_err", "_err_model")}
    uncertainty_vs_snr(os.path.join(out_dir, plots["uncertainty_vs_snr"]), snrg, errors["_err_model"],
                       errors["_err"])
    reliability_diagram(os.path.join(out_dir, plots["reliability"]),
                        {label: predicted[label] - reference[label] for label in LABELS}, errors["_err"], snrg)
    kiel_diagram(os.path.join(out_dir, plots["kiel"]), predicted["teff"], predicted["logg"], predicted["feh"],
                 reference=reference)
    files["plots"] = dict(plots)

    baselines = (artifact.get("extra") or {}).get("baselines")
    training = artifact.get("training", {})
    report = {
        "model": {"artifact": os.path.abspath(artifact_path), "version": artifact["version"],
                  "training": {k: training.get(k) for k in ("n_spectra", "n_stars", "snr_range", "obsid_sha256",
                                                                "label_domain", "n_outside_label_domain")}},
        "reference": reference_info,
        "counts": counts,
        "snr_bins": snr_bin_names(SNR_BINS),
        "accuracy": accuracy,
        "uncertainty": uncertainty_by_snr(estimates, snrg, model),
        "instrument_regions": selected_pixels_by_region(model, artifact["preprocess"]),
        "flags": flag_counts(estimates["flags"]),
        "baselines": None if baselines is None else {
            "n_train": baselines.n_train_, "fit_seconds": baselines.fit_seconds_},
        "comparison": comparison,
        "files": files,
        "note": note,
    }
    write_report_files(out_dir, report, report_markdown(report))
    return report


