"""Plots the pages show, drawn by the service as PNG (matplotlib, Agg canvas: no pyplot
state, safe in a threaded worker).

:func:`kiel_png` and :func:`histograms_png` draw a selection from the histograms the
database counted on all its rows (:func:`service.catalogue.selection_histograms`);
:func:`spectrum_png` one spectrum, observed and continuum-normalised, with the
LASSO-selected pixels of each label marked.
"""
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from models.flags import FEH_MIN, TEFF_RANGE
from service.catalogue import KIEL_AXES

LABELS = (("teff", "Teff [K]"), ("logg", "log g [dex]"), ("feh", "[Fe/H] [dex]"))
PIXEL_COLOURS = {"teff": "tab:red", "logg": "tab:green", "feh": "tab:blue"}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _occupied(counts, edges, axis=None):
    """(low, high) of the edges around the non-empty bins (all of them if none is)."""
    filled = counts > 0 if axis is None else (counts > 0).any(axis=axis)
    if not filled.any():
        return edges[0], edges[-1]
    where = np.flatnonzero(filled)
    return edges[where[0]], edges[where[-1] + 1]


def kiel_png(counted) -> bytes:
    """The Kiel diagram of a selection from its binned counts
    (:class:`service.catalogue.SelectionHistograms`): Teff against log g (both axes
    reversed, as astronomers read them), each cell coloured by its stars' mean [Fe/H]
    (left) and by their number (right); the valid Teff domain marked."""
    teff_bins, logg_bins = (counted.histograms[name].bins for name in KIEL_AXES)
    teff_edges, logg_edges = teff_bins.edges, logg_bins.edges
    counts = counted.kiel_counts
    shown = int(counts.sum())
    # fixed margins: a constrained layout would take more than half of the drawing time
    figure = Figure(figsize=(10, 4.5), dpi=100)
    figure.subplots_adjust(left=0.07, right=0.97, bottom=0.12, top=0.9, wspace=0.12)
    by_feh, by_count = figure.subplots(1, 2, sharex=True, sharey=True)
    # pcolormesh takes C[row = y bin, column = x bin]: log g rows, Teff columns
    mean_feh = np.ma.masked_invalid(np.where(counts > 0, counted.kiel_mean_feh, np.nan).T)
    cells = by_feh.pcolormesh(teff_edges, logg_edges, mean_feh, cmap="viridis")
    figure.colorbar(cells, ax=by_feh, label="mean [Fe/H] of the cell [dex]")
    number = np.ma.masked_equal(counts.T, 0)
    most = int(counts.max())
    # a logarithmic scale once counts span a decade (dense and sparse regions both show)
    norm = LogNorm(vmin=1, vmax=most) if most >= 10 else Normalize(vmin=0, vmax=max(most, 1))
    cells = by_count.pcolormesh(teff_edges, logg_edges, number, cmap="magma_r", norm=norm)
    figure.colorbar(cells, ax=by_count, label="stars in the cell",
                    ticks=None if most >= 10 else MaxNLocator(integer=True),
                    format=FuncFormatter(lambda value, _: f"{value:g}"))
    for axes in (by_feh, by_count):
        for edge in TEFF_RANGE:
            axes.axvline(edge, color="0.5", ls="--", lw=0.8)
        axes.set_xlabel("Teff [K]")
        axes.grid(alpha=0.2)
    by_feh.set_ylabel("log g [dex]")
    low, high = _occupied(counts, teff_edges, axis=1)
    by_feh.set_xlim(high, low)                       # reversed: hot stars left
    low, high = _occupied(counts, logg_edges, axis=0)
    by_feh.set_ylim(high, low)                       # reversed: giants at the top
    left_out = counted.rows - shown
    figure.suptitle(f"Kiel diagram of {shown} stars"
                    + (f" ({left_out} more without Teff or log g in the plotted ranges)"
                       if left_out else "") + "; dashed: the valid Teff domain")
    return _png(figure)


def histograms_png(counted) -> bytes:
    """Histograms of the three labels (top row) and of their uncertainties (bottom) from
    a selection's binned counts (:class:`service.catalogue.SelectionHistograms`), with the
    rows outside the bins' range and without a value said under each."""
    figure = Figure(figsize=(9, 5.5), dpi=100)       # fixed margins, as kiel_png
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.9, wspace=0.25,
                           hspace=0.5)
    grid = figure.subplots(2, 3)
    for column, (label, title) in enumerate(LABELS):
        for row, name in enumerate((label, f"{label}_err")):
            histogram = counted.histograms[name]
            edges = histogram.bins.edges
            axes = grid[row, column]
            axes.stairs(histogram.counts, edges, fill=True, alpha=0.35,
                        color="tab:blue" if row == 0 else "tab:orange")
            axes.stairs(histogram.counts, edges, color="tab:blue" if row == 0 else "tab:orange")
            axes.set_xlim(*_occupied(histogram.counts, edges))
            if name == "teff":
                axes.axvline(TEFF_RANGE[0], color="0.5", ls="--")
                axes.axvline(TEFF_RANGE[1], color="0.5", ls="--")
            if name == "feh":
                axes.axvline(FEH_MIN, color="0.5", ls="--")
            axes.set_xlabel(title if row == 0 else f"uncertainty of {title}")
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))   # 4e5, not 400000
            if column == 0:
                axes.set_ylabel("stars")
            outside = [f"{n} {what}" for n, what in
                       ((histogram.below, f"below {edges[0]:g}"),
                        (histogram.above, f"above {edges[-1]:g}"),
                        (histogram.missing, "without a value")) if n]
            if outside:
                axes.set_title("; ".join(outside), fontsize="small")
    figure.suptitle(f"{counted.rows} stars; dashed: the valid domain")
    return _png(figure)


def spectrum_png(wavelength, flux, rest_wavelength, normalised, selected_pixels,
                 continuum=None, z=0.0) -> bytes:
    """Observed flux (top) and the continuum-normalised rest-frame spectrum (bottom);
    ``selected_pixels``: label -> boolean mask over ``rest_wavelength`` (may be empty);
    ``normalised`` None: no usable redshift, so no rest frame (said in the bottom panel);
    ``continuum``: the fitted pseudo-continuum over ``rest_wavelength`` in the file's flux
    units, drawn over the observed flux shifted by the redshift ``z``."""
    figure = Figure(figsize=(10, 6), dpi=100, layout="constrained")
    observed, features = figure.subplots(2, 1)
    observed.plot(wavelength, flux, lw=0.5, color="k", label="observed flux")
    if continuum is not None:
        observed.plot(rest_wavelength * (1.0 + z), continuum, lw=1.2, color="tab:red",
                      label="pseudo-continuum")
        observed.legend(loc="upper right", fontsize="small")
    observed.set_xlabel("observed wavelength [Å]")
    observed.set_ylabel("flux")
    observed.set_title("Observed spectrum")
    if normalised is None:
        features.set_axis_off()
        features.text(0.5, 0.5, "No usable redshift: no rest-frame spectrum (not estimated)",
                      ha="center", va="center", transform=features.transAxes)
        return _png(figure)
    features.plot(rest_wavelength, normalised, lw=0.5, color="k")
    features.set_xlabel("rest-frame wavelength [Å]")
    features.set_ylabel("normalised flux")
    features.set_title("Continuum-normalised spectrum"
                       + (" with the LASSO-selected pixels" if selected_pixels else ""))
    finite = normalised[np.isfinite(normalised)]
    top = float(np.nanmax(finite)) if finite.size else 1.5
    for offset, (label, mask) in enumerate(selected_pixels.items()):
        y = np.full(int(mask.sum()), top + 0.08 * (offset + 1))
        features.plot(rest_wavelength[mask], y, "|", color=PIXEL_COLOURS.get(label, "k"),
                      markersize=6, label=f"{label} ({int(mask.sum())} pixels)")
    if selected_pixels:
        features.legend(loc="lower right", fontsize="small")
    return _png(figure)
