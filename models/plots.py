"""Figures in the style of Li et al., written as PNG files.

Matplotlib's object-oriented API with the Agg canvas is used directly (no ``pyplot``):
nothing here touches the global backend or opens a window, so the functions are safe in
worker processes, tests and the web service.

Each function takes plain arrays (one value per spectrum), or the summaries a model
stores (``coverage_vs_snr``), and the output path or a binary file object, and returns it.
"""
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .lasso_mlpnet import LABELS, SNR_BINS

AXIS_LABELS = {"teff": r"$T_\mathrm{eff}$ (K)", "logg": r"$\log g$ (dex)", "feh": "[Fe/H] (dex)"}
SHORT_NAMES = {"teff": r"$T_\mathrm{eff}$", "logg": r"$\log g$", "feh": "[Fe/H]"}
UNITS = {"teff": "K", "logg": "dex", "feh": "dex"}
_DPI = 110


def new_figure(width, height):
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path):
    """PNG of ``figure`` into ``path``, a file name (its folder is made) or a binary file
    object (the web service draws into memory)."""
    if isinstance(path, (str, os.PathLike)):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI)     # constrained layout: no "tight" re-draw
    return path


def _finite(*arrays):
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    keep = np.all([np.isfinite(a) for a in arrays], axis=0)
    return [a[keep] for a in arrays]


def _bin_centres(bins):
    bins = np.asarray(bins, dtype=float)
    return np.sqrt(bins[:-1] * bins[1:])          # geometric centres: SNRg axes are logarithmic


def snr_axis(ax, ticks, tick_labels=None):
    """Logarithmic SNRg axis with plain-number ticks at the given places only."""
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels(tick_labels if tick_labels is not None else [f"{t:g}" for t in ticks], fontsize=8)
    ax.minorticks_off()


def predicted_vs_reference(path, predicted, reference, snrg=None, labels=LABELS, title=None):
    """Paper Fig. 5: estimate against reference per label (1:1 line, coloured by SNRg),
    with the histogram of residuals (estimate - reference) below each panel."""
    figure = new_figure(4.2 * len(labels), 5.6)
    grid = figure.add_gridspec(2, len(labels), height_ratios=(3, 1.3))
    scatter = None
    for column, label in enumerate(labels):
        top = figure.add_subplot(grid[0, column])
        bottom = figure.add_subplot(grid[1, column])
        ref, pred, snr = _finite(reference[label], predicted[label],
                                 np.zeros(np.shape(reference[label])) if snrg is None else snrg)
        if ref.size:
            if snrg is None:
                top.scatter(ref, pred, s=6, alpha=0.6, color="tab:blue", linewidths=0)
            else:
                scatter = top.scatter(ref, pred, s=6, alpha=0.7, c=snr, cmap="viridis", linewidths=0)
            lo, hi = np.min(np.r_[ref, pred]), np.max(np.r_[ref, pred])
            pad = 0.03 * (hi - lo or 1.0)
            top.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", lw=0.8, ls="--")
            top.set_xlim(lo - pad, hi + pad)
            top.set_ylim(lo - pad, hi + pad)
            residual = pred - ref
            bottom.hist(residual, bins=min(40, max(5, residual.size // 5)), color="tab:gray",
                        edgecolor="k", linewidth=0.3)
            bottom.axvline(0.0, color="k", lw=0.8, ls="--")
            mu = residual.mean()
            sigma = residual.std(ddof=1) if residual.size > 1 else 0.0
            fmt = ".0f" if label == "teff" else ".3f"
            top.text(0.04, 0.96, f"MAE = {np.mean(np.abs(residual)):{fmt}} {UNITS[label]}\n"
                     f"$\\mu$ = {mu:+{fmt}}  $\\sigma$ = {sigma:{fmt}}\nN = {residual.size}",
                     transform=top.transAxes, va="top", fontsize=8)
        top.set_xlabel("reference " + AXIS_LABELS[label])
        top.set_ylabel("LASSO-MLPNet " + AXIS_LABELS[label])
        bottom.set_xlabel(r"$\Delta$" + SHORT_NAMES[label] + f" (estimate - reference, {UNITS[label]})")
        bottom.set_ylabel("N")
    if scatter is not None:
        figure.colorbar(scatter, ax=figure.axes, shrink=0.6, pad=0.02, label="SNRg")
    if title:
        figure.suptitle(title)
    return save_figure(figure, path)


def accuracy_vs_snr(path, accuracy, bins=SNR_BINS, labels=LABELS, methods=None):
    """Paper Figs. 8-9: MAE (top row) and sigma (bottom row) of the residuals per SNRg bin.

    ``accuracy``: ``models.metrics.accuracy_by_snr`` output for LASSO-MLPNet; ``methods``:
    optional dict method name -> the same structure, drawn as thinner comparison lines.
    """
    from .metrics import snr_bin_names

    names = snr_bin_names(bins)
    centres = _bin_centres(bins)
    curves = {"LASSO-MLPNet": accuracy}
    for name, value in (methods or {}).items():
        curves.setdefault(name, value)
    figure = new_figure(4.2 * len(labels), 6.4)
    axes = figure.subplots(2, len(labels), squeeze=False)
    for column, label in enumerate(labels):
        for row, statistic in enumerate(("mae", "sigma")):
            ax = axes[row, column]
            for method, per in curves.items():
                values = np.array([np.nan if per[label][n][statistic] is None else per[label][n][statistic]
                                   for n in names], dtype=float)
                main = method == "LASSO-MLPNet"
                ax.plot(centres, values, marker="o" if main else ".", lw=2.0 if main else 0.9,
                        color="k" if main else None, label=method, zorder=3 if main else 2)
            snr_axis(ax, centres, names)
            ax.set_xlabel("SNRg bin")
            ax.set_ylabel(("MAE" if statistic == "mae" else r"$\sigma$") + " of " + AXIS_LABELS[label])
            ax.grid(alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside right upper", fontsize=8)
    return save_figure(figure, path)


def uncertainty_vs_snr(path, snrg, model_err, calibrated_err=None, bins=SNR_BINS, labels=LABELS):
    """Paper Fig. 10: the model uncertainty (``_err_model``) of every spectrum against SNRg
    with its median per bin, and the median calibrated uncertainty (``_err``) of each bin as
    steps."""
    bins = np.asarray(bins, dtype=float)
    figure = new_figure(4.2 * len(labels), 3.8)
    axes = figure.subplots(1, len(labels), squeeze=False)[0]
    for ax, label in zip(axes, labels):
        snr, err = _finite(snrg, model_err[label])
        ax.scatter(snr, err, s=5, alpha=0.4, color="tab:blue", linewidths=0, label="model (_err_model)")
        which = np.searchsorted(bins, snr, side="left") - 1
        medians = np.array([np.median(err[which == k]) if np.any(which == k) else np.nan
                            for k in range(bins.size - 1)])
        ax.plot(_bin_centres(bins), medians, "o-", color="tab:blue", lw=1.5, label="model, bin median")
        if calibrated_err is not None:
            snr, err = _finite(snrg, calibrated_err[label])
            which = np.searchsorted(bins, snr, side="left") - 1
            table = np.array([np.median(err[which == k]) if np.any(which == k) else np.nan
                              for k in range(bins.size - 1)])
            if np.isfinite(table).any():
                ax.stairs(table, bins, color="tab:red", lw=1.8, label="calibrated (_err), bin median")
        snr_axis(ax, bins)
        ax.set_xlim(bins[0] * 0.9, bins[-1] * 1.1)
        ax.set_xlabel("SNRg")
        ax.set_ylabel(r"uncertainty of " + AXIS_LABELS[label])
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside upper center", ncols=len(handles), fontsize=8)
    return save_figure(figure, path)


def reliability_diagram(path, residuals, errors, snrg, bins=SNR_BINS, labels=LABELS):
    """Coverage against nominal level: for each nominal probability p of a central Gaussian
    interval (+-k err, k = Phi^-1((1 + p) / 2)), the fraction of residuals inside it, per
    label (panel) and SNRg bin (line). Honest uncertainties follow the diagonal; the
    +-1 and +-2 sigma levels (68.3%, 95.4%) are marked."""
    from scipy.stats import norm

    bins = np.asarray(bins, dtype=float)
    nominal = np.linspace(0.02, 0.99, 60)
    k = norm.ppf((1 + nominal) / 2)
    figure = new_figure(4.0 * len(labels), 4.0)
    axes = figure.subplots(1, len(labels), squeeze=False)[0]
    colours = ("tab:purple", "tab:blue", "tab:green", "tab:orange", "tab:red", "tab:brown")
    for ax, label in zip(axes, labels):
        snr, resid, err = _finite(snrg, residuals[label], errors[label])
        z = np.abs(resid / err)
        for index, (lo, hi) in enumerate(zip(bins[:-1], bins[1:])):
            inside = z[(snr > lo) & (snr <= hi)]
            if inside.size:
                observed = np.mean(inside[:, None] < k[None, :], axis=0)
                ax.plot(nominal, observed, color=colours[index % len(colours)], lw=1.5,
                        label=f"SNRg {lo:g}-{hi:g} (N={inside.size})")
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="honest")
        for level in (0.6827, 0.9545):
            ax.axvline(level, color="gray", lw=0.6, ls=":")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("nominal coverage (Gaussian)")
        ax.set_ylabel(f"observed coverage, {SHORT_NAMES[label]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(figure, path)


def coverage_vs_snr(path, calibration, labels=LABELS):
    """How the calibrated uncertainties cover the calibration residuals: per label, the
    fraction of residuals within +-1 and +-2 err in each SNRg bin against a Gaussian's
    68.3% and 95.4%. ``calibration``: what a model stores
    (``models.training.calibration_summary``: ``snr_bins``, ``counts`` and per label
    ``coverage`` {"within_1": [per bin], "within_2": [...]}, None where a bin has none)."""
    from .validation import GAUSS_WITHIN_1, GAUSS_WITHIN_2

    bins = np.asarray(calibration["snr_bins"], dtype=float)
    centres = _bin_centres(bins)
    figure = new_figure(4.0 * len(labels), 3.8)
    axes = figure.subplots(1, len(labels), squeeze=False)[0]
    for ax, label in zip(axes, labels):
        for name, nominal, colour in (("within_1", GAUSS_WITHIN_1, "tab:blue"),
                                      ("within_2", GAUSS_WITHIN_2, "tab:red")):
            observed = np.array([np.nan if v is None else v
                                 for v in calibration[label]["coverage"][name]], dtype=float)
            sigmas = name[-1]
            ax.plot(centres, observed, "o-", color=colour, label=f"within ±{sigmas} err")
            ax.axhline(nominal, color=colour, ls="--", lw=0.8,
                       label=f"Gaussian {100 * nominal:.1f}%")
        snr_axis(ax, bins)
        ax.set_xlim(bins[0] * 0.9, bins[-1] * 1.1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("SNRg")
        ax.set_ylabel(f"fraction of residuals, {SHORT_NAMES[label]}")
        ax.grid(alpha=0.3)
    for ax in axes:
        for centre, n in zip(centres, calibration["counts"]):
            ax.annotate(f"N={n}", (centre, 0.03), ha="center", fontsize=7, color="0.3")
    handles, names = axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside upper center", ncols=len(handles), fontsize=8)
    return save_figure(figure, path)


def kiel_diagram(path, teff, logg, feh, reference=None, title="LASSO-MLPNet"):
    """Teff against log g coloured by [Fe/H], both axes inverted as astronomers draw it
    (hot stars left, giants top). With ``reference`` (dict teff, logg, feh) a second panel
    shows the reference labels on the same axes and colour scale."""
    panels = [(title, teff, logg, feh)]
    if reference is not None:
        panels.append(("reference", reference["teff"], reference["logg"], reference["feh"]))
    data = [_finite(t, g, f) for _, t, g, f in panels]
    all_feh = np.concatenate([d[2] for d in data]) if data else np.array([])
    vmin, vmax = (np.percentile(all_feh, [2, 98]) if all_feh.size else (-1.0, 0.5))
    all_teff = np.concatenate([d[0] for d in data])
    all_logg = np.concatenate([d[1] for d in data])
    figure = new_figure(4.6 * len(panels) + 0.8, 4.4)
    axes = figure.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    points = None
    for ax, (name, *_), (t, g, f) in zip(axes, panels, data):
        points = ax.scatter(t, g, c=f, s=6, cmap="coolwarm", vmin=vmin, vmax=vmax, linewidths=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(AXIS_LABELS["teff"])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(AXIS_LABELS["logg"])
    if all_teff.size:
        pad_t = 0.03 * (np.ptp(all_teff) or 100.0)
        pad_g = 0.05 * (np.ptp(all_logg) or 0.5)
        # set limits high-to-low: inverted axes, shared by every panel
        axes[0].set_xlim(all_teff.max() + pad_t, all_teff.min() - pad_t)
        axes[0].set_ylim(all_logg.max() + pad_g, all_logg.min() - pad_g)
    else:
        axes[0].invert_xaxis()
        axes[0].invert_yaxis()
    if points is not None:
        figure.colorbar(points, ax=list(axes), shrink=0.85, pad=0.02, label=AXIS_LABELS["feh"])
    return save_figure(figure, path)
