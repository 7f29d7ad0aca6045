"""Accuracy summaries as in the paper: MAE, mean offset (mu) and scatter (sigma) per SNRg bin."""
import numpy as np

from .lasso_mlpnet import LABELS, SNR_BINS


def residual_summary(residuals):
    residuals = np.asarray(residuals, dtype=float)
    residuals = residuals[np.isfinite(residuals)]
    if residuals.size == 0:
        return {"n": 0, "mae": None, "mu": None, "sigma": None}
    return {"n": int(residuals.size), "mae": float(np.mean(np.abs(residuals))),
            "mu": float(np.mean(residuals)),
            "sigma": float(np.std(residuals, ddof=1)) if residuals.size > 1 else 0.0}


def snr_bin_names(bins=SNR_BINS):
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(bins[:-1], bins[1:])]


def snr_bins_of(summary):
    """The SNRg bin edges of an ``accuracy_by_snr`` entry of one label, from its keys
    besides "all" (the bin names, in any order: a JSON document may sort them): a stored
    summary keeps the bins it was computed with."""
    bins = sorted(tuple(float(edge) for edge in name.split("-")) for name in summary
                  if name != "all")
    return [low for low, _ in bins] + [bins[-1][1]] if bins else []


def accuracy_by_snr(predicted, reference, snrg, bins=SNR_BINS, labels=LABELS):
    """{label: {"all": summary, "5-10": summary, ...}} with (lo, hi] bins, like the paper."""
    snrg = np.asarray(snrg, dtype=float)
    out = {}
    for label in labels:
        resid = np.asarray(predicted[label], dtype=float) - np.asarray(reference[label], dtype=float)
        per = {"all": residual_summary(resid)}
        for name, lo, hi in zip(snr_bin_names(bins), bins[:-1], bins[1:]):
            per[name] = residual_summary(resid[(snrg > lo) & (snrg <= hi)])
        out[label] = per
    return out


def z_scores_summary(residuals, errors):
    """Count, MAE, mu, sigma of the residuals, and how the uncertainties cover them: the
    root-mean-square of z = residual / error about zero (1 for honest errors) and the
    fractions with |z| < 1 and < 2 (0.683 and 0.954 for Gaussian residuals).

    Spectra with a NaN error (e.g. outside the calibrated SNRg range) are counted in
    ``n_without_error`` and left out of the z statistics."""
    residuals = np.asarray(residuals, dtype=float)
    errors = np.asarray(errors, dtype=float)
    finite = np.isfinite(residuals)
    out = residual_summary(residuals[finite])
    with np.errstate(invalid="ignore"):
        with_error = finite & np.isfinite(errors) & (errors > 0)
    z = residuals[with_error] / errors[with_error]
    out["n_without_error"] = int(finite.sum() - with_error.sum())
    out["z_std"] = float(np.sqrt(np.mean(z ** 2))) if z.size else None
    out["within_1"] = float(np.mean(np.abs(z) < 1)) if z.size else None
    out["within_2"] = float(np.mean(np.abs(z) < 2)) if z.size else None
    return out


def coverage_by_snr(predicted, reference, snrg, suffix="_err", bins=SNR_BINS, labels=LABELS):
    """{label: {"all": summary, "5-10": summary, ...}} of ``z_scores_summary`` with the
    errors ``predicted[label + suffix]``, (lo, hi] bins."""
    snrg = np.asarray(snrg, dtype=float)
    out = {}
    for label in labels:
        resid = np.asarray(predicted[label], dtype=float) - np.asarray(reference[label], dtype=float)
        err = np.asarray(predicted[label + suffix], dtype=float)
        per = {"all": z_scores_summary(resid, err)}
        for name, lo, hi in zip(snr_bin_names(bins), bins[:-1], bins[1:]):
            inside = (snrg > lo) & (snrg <= hi)
            per[name] = z_scores_summary(resid[inside], err[inside])
        out[label] = per
    return out
