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
