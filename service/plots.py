"""Plots the pages show, drawn by the service as PNG (matplotlib, Agg canvas: no pyplot
state, safe in a threaded worker).

:func:`kiel_png` and :func:`histograms_png` draw a selection's rows; :func:`spectrum_png`
one spectrum, observed and continuum-normalised, with the LASSO-selected pixels of each
label marked.
"""
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from models.flags import FEH_MIN, TEFF_RANGE

LABELS = (("teff", "Teff [K]"), ("logg", "log g [dex]"), ("feh", "[Fe/H] [dex]"))
PIXEL_COLOURS = {"teff": "tab:red", "logg": "tab:green", "feh": "tab:blue"}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _column(rows, index):
    return np.array([np.nan if row[index] is None else row[index] for row in rows], float)


def kiel_png(rows, names) -> bytes:
    """Teff against log g (both axes reversed, as astronomers read them), coloured by
    [Fe/H]; the valid Teff domain shaded."""
    teff, logg, feh = (_column(rows, names.index(n)) for n in ("teff", "logg", "feh"))
    figure = Figure(figsize=(6, 4.5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.axvspan(*TEFF_RANGE, color="0.93", zorder=0, label="valid Teff domain")
    shown = np.isfinite(teff) & np.isfinite(logg)
    points = axes.scatter(teff[shown], logg[shown], c=feh[shown], s=4, cmap="viridis",
                          rasterized=True)
    figure.colorbar(points, ax=axes, label="[Fe/H] [dex]")
    if shown.any():
        axes.invert_xaxis()
        axes.invert_yaxis()
    axes.set_xlabel("Teff [K]")
    axes.set_ylabel("log g [dex]")
    axes.set_title(f"Kiel diagram ({int(shown.sum())} stars)")
    axes.legend(loc="lower left", fontsize="small")
    return _png(figure)


def histograms_png(rows, names) -> bytes:
    """Histograms of the three labels (top row) and of their uncertainties (bottom)."""
    figure = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    grid = figure.subplots(2, 3)
    for column, (label, title) in enumerate(LABELS):
        for row, name in enumerate((label, f"{label}_err")):
            values = _column(rows, names.index(name))
            values = values[np.isfinite(values)]
            axes = grid[row, column]
            if values.size:
                axes.hist(values, bins=40, color="tab:blue" if row == 0 else "tab:orange")
            if name == "teff":
                axes.axvline(TEFF_RANGE[0], color="0.5", ls="--")
                axes.axvline(TEFF_RANGE[1], color="0.5", ls="--")
            if name == "feh":
                axes.axvline(FEH_MIN, color="0.5", ls="--")
            axes.set_xlabel(title if row == 0 else f"uncertainty of {title}")
            axes.set_ylabel("stars")
    return _png(figure)


def spectrum_png(wavelength, flux, rest_wavelength, normalised, selected_pixels) -> bytes:
    """Observed flux (top) and the continuum-normalised rest-frame spectrum (bottom);
    ``selected_pixels``: label -> boolean mask over ``rest_wavelength`` (may be empty);
    ``normalised`` None: no usable redshift, so no rest frame (said in the bottom panel)."""
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
