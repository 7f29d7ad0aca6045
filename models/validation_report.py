"""The ``validate`` report: how a model behaves on real LAMOST spectra.

Simulated spectra measure accuracy against known truth; real spectra check the method
where there is no truth. From folders of real spectra (``lamost-vac validate`` finds the
files and reads the tables) this module estimates every file (:func:`validate_files`) and
writes a report folder (:func:`write_validation_report`):

- robustness: every spectrum file of every folder is read and either estimated or
  flagged with a reason (unreadable with the reader's reason; class not STAR; near-zero
  SNRg; no usable redshift or too few usable pixels); counts per outcome per folder;
- repeatability: stars observed several times (repeat groups from a table, or spectra
  within a radius of each other): the scatter of their estimates against SNRg and the
  pairwise z-scores with the model uncertainty (``<label>_err_model``, the scaled
  ensemble std) and the calibrated one (``<label>_err``) -- a z-score std of ~1 means
  honest uncertainties (statistics in :mod:`models.validation`);
- agreement with reference labels (LASP, APOGEE, GALAH: :class:`ReferenceLabels`): MAE,
  mu, sigma of ours - reference by SNRg, the median offset by reference Teff, scatter
  plots;
- the Kiel diagram of all real estimates.

Files: ``report.md``, ``report.json``, ``estimates.csv`` (one row per file, with outcome
and reason) and PNG figures.
"""
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from .flags import NOT_A_STAR, NOT_ESTIMATED, SNR_OUT_OF_DOMAIN, UNUSABLE_SPECTRUM, describe_flags
from .labels import ESTIMATE_SUFFIXES, LABELS
from .lasso_mlpnet import SNR_BINS
from .metrics import accuracy_by_snr, snr_bin_names
from .pipeline import featurise_files, predict_features
from .plots import AXIS_LABELS, kiel_diagram, new_figure, predicted_vs_reference, save_figure, snr_axis
from .progress import progress
from .readers import SpectrumReadError, read_meta
from .report import (LABEL_HEADINGS, accuracy_table, describe_label_domain, fmt, label_head, table,
                     write_report_files, write_table)
from .validation import (GAUSS_WITHIN_1, group_by_position, pairwise_z, repeat_scatter, scatter_summary,
                         z_summary)

DEFAULT_MIN_SNRG = 2.0

# outcomes, in report order
ESTIMATED = "estimated"                  # estimated, no quality flag
ESTIMATED_FLAGGED = "estimated_flagged"  # estimated, outside the method's domain (flags say why)
NOT_STAR = "not_a_star"                  # header class is not STAR: not estimated
LOW_SNR = "low_snr"                      # SNRg missing or near zero: not estimated
UNUSABLE = "unusable"                    # read, but no usable redshift or too few usable pixels
UNREADABLE = "unreadable"                # the reader refused the file
OUTCOMES = (ESTIMATED, ESTIMATED_FLAGGED, NOT_STAR, LOW_SNR, UNUSABLE, UNREADABLE)

# reference comparison: the paper's SNRg bins plus below 5 and above 80 (real spectra reach 200+)
REFERENCE_SNR_BINS = (0.0, *SNR_BINS, np.inf)
# repeat observations have SNRg 30-375
REPEAT_SNR_BINS = (0.0, 20.0, 40.0, 80.0, 160.0, np.inf)
# offsets from the reference by reference Teff: where a disagreement comes from
REFERENCE_TEFF_BINS = (0.0, 5000.0, 6000.0, 7000.0, np.inf)
PLOT_FILES = {"outcomes": "outcomes.png", "repeat_scatter": "repeat_scatter.png",
              "repeat_zscores": "repeat_zscores.png", "reference": "reference_comparison.png",
              "kiel": "kiel_diagram.png", "kiel_reference": "kiel_reference.png"}
# the figures drawn only when there is a reference table
REFERENCE_PLOTS = ("reference", "kiel_reference")


@dataclass
class ReferenceLabels:
    """Labels to compare the estimates with (LASP, APOGEE, GALAH, ...), one entry per row of
    their table. A spectrum finds its row by ``join``: "file name" (``keys`` are
    :func:`spectrum_key` of the table's file names; a name given twice: the last row),
    "obsid" (``keys`` are obsids, compared with the header's OBSID) or "position" (the
    nearest row within ``radius_arcsec`` of the header's RA, Dec)."""
    name: str                     # what the report calls them, e.g. "LASP"
    source: str                   # the table they come from
    labels: dict                  # label -> float array, NaN where missing
    join: str
    keys: Optional[list] = None
    ra: Optional[np.ndarray] = None
    dec: Optional[np.ndarray] = None
    radius_arcsec: float = 3.0

    JOINS = ("file name", "obsid", "position")

    def __post_init__(self):
        if self.join not in self.JOINS:
            raise ValueError(f"join must be one of {', '.join(self.JOINS)}, not {self.join!r}")

    def rows_of(self, spectra):
        """Per spectrum (dicts with ``file``, ``obsid``, ``ra``, ``dec``): the index of its
        reference row, or None."""
        if self.join == "position":
            return _nearest_within(spectra, self.ra, self.dec, self.radius_arcsec)
        index = {}
        for row, key in enumerate(self.keys):
            if key is not None:
                index[key] = row
        if self.join == "file name":
            return [index.get(spectrum_key(spectrum["file"])) for spectrum in spectra]
        return [index.get(spectrum["obsid"]) if spectrum["obsid"] is not None else None
                for spectrum in spectra]


def _nearest_within(spectra, ra, dec, radius_arcsec):
    """Per spectrum: the index of the nearest (ra, dec) within the radius, or None."""
    found = [None] * len(spectra)
    here = [k for k, s in enumerate(spectra) if np.isfinite(s["ra"]) and np.isfinite(s["dec"])]
    there = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    if not here or not there.size:
        return found
    spectra_at = SkyCoord([spectra[k]["ra"] for k in here], [spectra[k]["dec"] for k in here], unit="deg")
    nearest, separation, _ = spectra_at.match_to_catalog_sky(SkyCoord(ra[there], dec[there], unit="deg"))
    for k, row, within in zip(here, there[nearest], separation <= radius_arcsec * u.arcsec):
        if within:
            found[k] = int(row)
    return found


# -- spectra -------------------------------------------------------------------------------
def spectrum_key(name):
    """File base name without .gz: how the side tables name a spectrum."""
    base = os.path.basename(str(name).strip())
    return base[:-3] if base.endswith(".gz") else base


def _is_star(klass):
    return klass is not None and str(klass).strip().upper() == "STAR"


def read_headers(folders, min_snrg=DEFAULT_MIN_SNRG):
    """One row per file of ``folders`` ([(folder name, [(file, path)])]): folder, file,
    header metadata and, for the files that will not be estimated, the outcome and reason
    (unreadable, not a star, SNRg missing or at most ``min_snrg``); None for the others."""
    rows = []
    for folder, files in folders:
        for name, path in files:
            row = {"folder": folder, "file": name, "path": path, "obsid": None,
                   "class": None, "subclass": None, "snrg": np.nan, "z": np.nan, "ra": np.nan,
                   "dec": np.nan, "outcome": None, "reason": "", "flags": 0,
                   "reference_row": None, "repeat_group": None,
                   **{label + suffix: np.nan for label in LABELS for suffix in ESTIMATE_SUFFIXES}}
            try:
                meta = read_meta(path)
            except SpectrumReadError as error:
                row.update(outcome=UNREADABLE, reason=error.reason, flags=UNUSABLE_SPECTRUM)
                rows.append(row)
                continue
            row.update({key: np.nan if meta[key] is None else meta[key] for key in ("snrg", "z", "ra", "dec")})
            row.update(obsid=meta["obsid"], subclass=meta["subclass"])
            row["class"] = meta["class"]
            if not _is_star(meta["class"]):
                row.update(outcome=NOT_STAR, flags=NOT_A_STAR,
                           reason=f"class is {meta['class']!r}, not STAR: not estimated")
            elif not (row["snrg"] > min_snrg):
                row.update(outcome=LOW_SNR, flags=SNR_OUT_OF_DOMAIN | UNUSABLE_SPECTRUM,
                           reason=("no SNRG in header" if not np.isfinite(row["snrg"]) else
                                   f"SNRg {row['snrg']:g} <= {min_snrg:g}") + ": not estimated")
            rows.append(row)
    return rows


def assign_repeat_groups(rows, groups=None, radius_arcsec=None):
    """Set each row's ``repeat_group``: from ``groups`` ({spectrum key: group id}, a
    repeat-groups table), or, with ``radius_arcsec``, numbered groups of the spectra within
    that radius of each other (:func:`models.validation.group_by_position` on the header
    positions); None for a spectrum in no group."""
    if groups is not None:
        for row in rows:
            row["repeat_group"] = groups.get(spectrum_key(row["file"]))
    elif radius_arcsec is not None:
        found = group_by_position(_column(rows, "ra"), _column(rows, "dec"), radius_arcsec)
        for row, group in zip(rows, found):
            row["repeat_group"] = int(group) if group > 0 else None


def first_per_folder(rows, limit):
    """The first ``limit`` rows of each folder, spectra with a reference row or in a repeat
    group first and a group's members next to each other: a quick subset that still
    has repeats and reference labels."""
    def order(row):
        side = row["repeat_group"] is not None or row["reference_row"] is not None
        return (not side, row["repeat_group"] or 0, row["file"])

    kept = []
    for folder in dict.fromkeys(row["folder"] for row in rows):
        kept += sorted((row for row in rows if row["folder"] == folder), key=order)[:limit]
    return kept


def estimate_rows(artifact, rows, n_jobs=-1):
    """Estimate the rows without an outcome yet (:func:`read_headers`) and set their outcome
    (estimated, estimated_flagged, unusable or unreadable), reason, flags and estimates."""
    todo = [i for i, row in enumerate(rows) if row["outcome"] is None]
    if not todo:
        return rows
    model = artifact["model"]
    feature_set = featurise_files(
        [rows[i]["path"] for i in todo], [rows[i]["z"] for i in todo], artifact["preprocess"],
        n_jobs=n_jobs, progress=lambda it, total: progress(it, total, "preprocessing"))
    errors = feature_set.errors
    snrg = np.array([rows[i]["snrg"] for i in todo], dtype=float)
    estimates = predict_features(model, feature_set, snrg, subclass=[rows[i]["subclass"] for i in todo])
    for k, i in enumerate(todo):
        row = rows[i]
        flags = int(estimates["flags"][k])
        if k in errors:
            row.update(outcome=UNREADABLE, reason=errors[k], flags=UNUSABLE_SPECTRUM)
        elif flags & NOT_ESTIMATED:      # too few usable pixels, no usable redshift
            row.update(outcome=UNUSABLE, flags=flags, reason=estimates["problem"][k])
        else:
            row.update(outcome=ESTIMATED if flags == 0 else ESTIMATED_FLAGGED, flags=flags,
                       reason="; ".join(describe_flags(flags)))
        if row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED):
            for label in LABELS:
                for suffix in ESTIMATE_SUFFIXES:
                    row[label + suffix] = float(estimates[label + suffix][k])
    return rows


def validate_files(artifact, folders, reference=None, repeat_groups=None, repeat_radius_arcsec=None,
                   limit_per_folder=None, min_snrg=DEFAULT_MIN_SNRG, n_jobs=-1):
    """One row per spectrum file of ``folders`` ([(folder name, [(file, path)])]) with its
    outcome, reason, flags, estimates, ``reference_row`` (index into ``reference``, a
    :class:`ReferenceLabels`, or None) and ``repeat_group`` (from the ``repeat_groups``
    table {spectrum key: group id}, or found within ``repeat_radius_arcsec``);
    ``limit_per_folder``: only that many files per folder (:func:`first_per_folder`)."""
    rows = read_headers(folders, min_snrg)
    if reference is not None:
        for row, found in zip(rows, reference.rows_of(rows)):
            row["reference_row"] = found
    assign_repeat_groups(rows, repeat_groups, repeat_radius_arcsec)
    if limit_per_folder is not None:
        rows = first_per_folder(rows, limit_per_folder)
    return estimate_rows(artifact, rows, n_jobs)


def outcome_counts(rows):
    """{folder: {outcome: n}, ..., "all": {...}}, every outcome present (zero when none)."""
    counts = {}
    for row in rows:
        counts.setdefault(row["folder"], {o: 0 for o in OUTCOMES})[row["outcome"]] += 1
    counts["all"] = {o: sum(per[o] for per in counts.values()) for o in OUTCOMES}
    for per in counts.values():
        per["total"] = sum(per[o] for o in OUTCOMES)
    return counts


def _column(rows, key):
    return np.array([row[key] for row in rows], dtype=float)


def _number(value):
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


# -- analyses ---------------------------------------------------------------------------------
def repeat_members(rows):
    """The estimated spectra (flagged ones too) that belong to repeat groups."""
    return [row for row in rows if row["repeat_group"] is not None
            and row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED)]


def repeatability(rows):
    """Scatter and pairwise z-scores of the estimated spectra that belong to repeat groups."""
    members = repeat_members(rows)
    groups = [row["repeat_group"] for row in members]
    snrg = _column(members, "snrg") if members else np.array([])
    result = {"n_files_in_groups": sum(1 for row in rows if row["repeat_group"] is not None),
              "n_estimated_in_groups": len(members), "labels": {}}
    arrays = {}
    for label in LABELS:
        values = _column(members, label) if members else np.array([])
        err_model = _column(members, label + "_err_model") if members else np.array([])
        err = _column(members, label + "_err") if members else np.array([])
        # "rms_err" of the scatter: the model uncertainty; "rms_err_calibrated": the quoted one
        scatter = repeat_scatter(values, groups, snrg, errors=err_model)
        # per star of ``scatter``: rms of its finite _err (NaN outside the calibrated SNRg range)
        group_array = np.array(groups, dtype=object)
        scatter["rms_err_calibrated"] = np.array([
            np.sqrt(np.mean(e[np.isfinite(e)] ** 2)) if np.isfinite(e).any() else np.nan
            for e in (err[group_array == g] for g in scatter["group"])])
        z_model, _ = pairwise_z(values, err_model, groups)
        z_cal, _ = pairwise_z(values, err, groups)
        summary = scatter_summary(scatter, REPEAT_SNR_BINS)
        summary_cal = scatter_summary({**scatter, "rms_err": scatter["rms_err_calibrated"]}, REPEAT_SNR_BINS)
        for name in summary:
            summary[name]["median_rms_err_calibrated"] = summary_cal[name]["median_rms_err"]
        result["labels"][label] = {
            "n_stars": int(len(scatter["std"])),
            "median_scatter": _number(np.median(scatter["std"])) if len(scatter["std"]) else None,
            "rms_scatter": _number(np.sqrt(np.mean(scatter["std"] ** 2))) if len(scatter["std"]) else None,
            "scatter_by_snrg": summary,
            "z_model": z_summary(z_model),
            "z_calibrated": z_summary(z_cal),
        }
        arrays[label] = {"scatter": scatter, "z_model": z_model, "z_cal": z_cal}
    result["n_stars"] = result["labels"][LABELS[0]]["n_stars"]
    return result, arrays


def reference_agreement(rows, reference):
    """Ours - reference for every estimated spectrum with a reference row: accuracy by
    SNRg bin for all of them and for the method's domain (no quality flag), and the median
    offset by reference Teff."""
    matched = [row for row in rows if row["reference_row"] is not None]
    estimated = [row for row in matched if row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED)]
    ours = {label: _column(estimated, label) if estimated else np.array([]) for label in LABELS}
    ref = {label: np.array([reference.labels[label][row["reference_row"]] for row in estimated], dtype=float)
           for label in LABELS}
    snrg = _column(estimated, "snrg") if estimated else np.array([])
    in_domain = np.array([row["flags"] == 0 for row in estimated], dtype=bool)
    result = {"name": reference.name, "table": reference.source, "join": reference.join,
              **({"radius_arcsec": reference.radius_arcsec} if reference.join == "position" else {}),
              "n_with_row": len(matched), "n_estimated": len(estimated),
              "n_in_domain": int(in_domain.sum()),
              "snr_bins": snr_bin_names(REFERENCE_SNR_BINS),
              "all": accuracy_by_snr(ours, ref, snrg, bins=REFERENCE_SNR_BINS),
              "in_domain": accuracy_by_snr({k: v[in_domain] for k, v in ours.items()},
                                           {k: v[in_domain] for k, v in ref.items()},
                                           snrg[in_domain], bins=REFERENCE_SNR_BINS)}
    by_teff = {}
    for lo, hi in zip(REFERENCE_TEFF_BINS[:-1], REFERENCE_TEFF_BINS[1:]):
        mask = (ref["teff"] > lo) & (ref["teff"] <= hi)
        by_teff[f"{lo:g}-{hi:g}"] = {
            "n": int(mask.sum()),
            **{label: _number(np.nanmedian(ours[label][mask] - ref[label][mask])) if mask.any() else None
               for label in LABELS}}
    result["median_offset_by_reference_teff"] = by_teff
    return result, (ours, ref, snrg)


def label_distribution(rows):
    """Per folder: median and 5-95 percentile range of every label of the estimated spectra."""
    out = {}
    for folder in dict.fromkeys(row["folder"] for row in rows):
        estimated = [row for row in rows if row["folder"] == folder
                     and row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED)]
        per = {"n": len(estimated)}
        for label in LABELS:
            values = _column(estimated, label) if estimated else np.array([])
            values = values[np.isfinite(values)]
            per[label] = ({"median": float(np.median(values)), "p05": float(np.percentile(values, 5)),
                           "p95": float(np.percentile(values, 95))} if values.size else None)
        out[folder] = per
    return out


# -- figures ------------------------------------------------------------------------------------
def plot_outcomes(path, counts):
    folders = [f for f in counts if f != "all"]
    figure = new_figure(1.6 + 1.6 * len(folders), 3.8)
    ax = figure.subplots()
    bottom = np.zeros(len(folders))
    colours = {ESTIMATED: "tab:green", ESTIMATED_FLAGGED: "tab:olive", NOT_STAR: "tab:purple",
               LOW_SNR: "tab:orange", UNUSABLE: "tab:gray", UNREADABLE: "tab:red"}
    for outcome in OUTCOMES:
        values = np.array([counts[f][outcome] for f in folders], dtype=float)
        ax.bar(np.arange(len(folders)), values, bottom=bottom, color=colours[outcome], label=outcome)
        bottom += values
    ax.set_xticks(np.arange(len(folders)))
    ax.set_xticklabels([f if len(f) < 18 else f[:16] + "..." for f in folders], fontsize=7)
    ax.set_ylabel("spectrum files")
    figure.legend(loc="outside right upper", fontsize=7)
    return save_figure(figure, path)


def plot_repeat_scatter(path, arrays):
    figure = new_figure(4.2 * len(LABELS), 3.9)
    axes = figure.subplots(1, len(LABELS), squeeze=False)[0]
    for ax, label in zip(axes, LABELS):
        s = arrays[label]["scatter"]
        snr = np.asarray(s["mean_snrg"], dtype=float)
        if snr.size:
            ax.scatter(snr, s["std"], s=12, color="k", label="scatter of repeats (std)", zorder=3)
            ax.scatter(snr, s["rms_err"], s=10, marker="v", color="tab:blue", alpha=0.7,
                       label="model uncertainty (rms)")
            ax.scatter(snr, s["rms_err_calibrated"], s=10, marker="^", color="tab:red", alpha=0.7,
                       label="calibrated uncertainty _err (rms)")
            lo, hi = np.nanmin(snr) / 1.15, np.nanmax(snr) * 1.15
            ticks = [t for t in (5, 10, 20, 30, 50, 100, 200, 300, 500) if lo <= t <= hi] or [round(lo)]
            snr_axis(ax, ticks)
            ax.set_xlim(lo, hi)
            positive = np.asarray(s["std"])[np.asarray(s["std"]) > 0]
            if positive.size:
                ax.set_yscale("log")
        ax.set_xlabel("mean SNRg of the star's spectra")
        ax.set_ylabel(f"{AXIS_LABELS[label]}")
        ax.grid(alpha=0.3, which="both")
    handles, names = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, names, loc="outside upper center", ncols=len(handles), fontsize=8)
    return save_figure(figure, path)


def plot_zscores(path, arrays):
    figure = new_figure(4.2 * len(LABELS), 6.0)
    axes = figure.subplots(2, len(LABELS), squeeze=False)
    grid = np.linspace(-5, 5, 201)
    gauss = np.exp(-0.5 * grid ** 2) / np.sqrt(2 * np.pi)
    for column, label in enumerate(LABELS):
        for row, (key, name) in enumerate((("z_model", "model (_err_model)"), ("z_cal", "calibrated (_err)"))):
            ax = axes[row, column]
            z = np.asarray(arrays[label][key], dtype=float)
            z = z[np.isfinite(z)]
            if z.size:
                edges = np.linspace(-5, 5, 41)
                ax.hist(np.clip(z, -4.99, 4.99), bins=edges, density=True, color="tab:gray",
                        edgecolor="k", linewidth=0.3, label="pairs (clipped at |z| = 5)")
                s = z_summary(z)
                ax.text(0.03, 0.96, f"N = {s['n']}\nstd = {s['std']:.2f}\nrobust std = {s['robust_std']:.2f}",
                        transform=ax.transAxes, va="top", fontsize=8)
            ax.plot(grid, gauss, color="tab:red", lw=1.5, label="unit Gaussian")
            ax.set_xlim(-5, 5)
            ax.set_xlabel(r"$z$ of $\Delta$" + label_name(label) + f", {name} uncertainty")
            ax.set_ylabel("density")
    handles, names = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside upper center", ncols=max(len(handles), 1), fontsize=8)
    return save_figure(figure, path)


def label_name(label):
    return LABEL_HEADINGS[label][0]


# -- markdown --------------------------------------------------------------------------------------
def counts_table_md(counts):
    return table(["folder", *OUTCOMES, "total"],
                 [[f"**{folder}**" if folder == "all" else folder,
                   *(str(per[o]) for o in OUTCOMES), str(per["total"])]
                  for folder, per in counts.items()])


def distribution_table_md(distribution):
    rows = []
    for folder, per in distribution.items():
        cells = [folder, str(per["n"])]
        for label in LABELS:
            d, spec = per[label], LABEL_HEADINGS[label][2]
            cells.append("-" if d is None else
                         f"{d['median']:{spec}} ({d['p05']:{spec}} to {d['p95']:{spec}})")
        rows.append(cells)
    return table(["folder", "N"] + label_head(("median (5-95%)",)), rows)


def teff_offset_table_md(by_teff, reference_name):
    head = [f"{reference_name} Teff (K)", "N"] + [f"median {LABEL_HEADINGS[l][0]} offset ({LABEL_HEADINGS[l][1]})"
                                                  for l in LABELS]
    return table(head, [[name, str(per["n"])] + [fmt(per[l], "+" + LABEL_HEADINGS[l][2]) for l in LABELS]
                        for name, per in by_teff.items() if per["n"]])


def repeat_table_md(rep):
    head = ["label", "stars", "median scatter", "rms scatter", "z std (model)", "robust (model)",
            "|z|<1 (model)", "z std (calibrated)", "robust (calibrated)", "|z|<1 (calibrated)", "pairs"]
    rows = []
    for label in LABELS:
        r = rep["labels"][label]
        name, unit, spec = LABEL_HEADINGS[label]
        zm, zi = r["z_model"], r["z_calibrated"]
        rows.append([
            f"{name} ({unit})", str(r["n_stars"]), fmt(r["median_scatter"], spec), fmt(r["rms_scatter"], spec),
            fmt(zm["std"], ".2f"), fmt(zm["robust_std"], ".2f"), fmt(zm["within_1"], ".2f"),
            fmt(zi["std"], ".2f"), fmt(zi["robust_std"], ".2f"), fmt(zi["within_1"], ".2f"),
            str(zm["n"])])
    return table(head, rows)


def repeat_snr_table_md(rep):
    bins = [n for n in rep["labels"][LABELS[0]]["scatter_by_snrg"] if n != "all"]
    rows = []
    for name in ["all", *bins]:
        n = rep["labels"][LABELS[0]]["scatter_by_snrg"][name]["n_groups"]
        if name != "all" and n == 0:
            continue
        cells = [name, str(n)]
        for label in LABELS:
            s, spec = rep["labels"][label]["scatter_by_snrg"][name], LABEL_HEADINGS[label][2]
            cells += [fmt(s["median_std"], spec), fmt(s["median_rms_err"], spec),
                      fmt(s["median_rms_err_calibrated"], spec)]
        rows.append(cells)
    return table(["mean SNRg", "stars"] + label_head(("scatter", "_err_model", "_err")),
                 rows)


# z std of honest uncertainties, allowing for the sampling noise of ~100 repeat pairs
HONEST_Z_STD = (0.8, 1.25)


def _honesty(std):
    low, high = HONEST_Z_STD
    if std is None:
        return "not measurable"
    if std > high:
        return f"too small (z std > {high:g})"
    if std < low:
        return f"too large (z std < {low:g})"
    return f"about right (z std {low:g}-{high:g})"


def offsets_sentence(reference):
    parts = []
    for label in LABELS:
        s = reference["all"][label]["all"]
        name, unit, spec = LABEL_HEADINGS[label]
        if s["n"]:
            parts.append(f"{name} {s['mu']:+{spec}} {unit} (sigma {s['sigma']:{spec}}, MAE {s['mae']:{spec}})")
    if not parts:
        return f"No spectrum with a {reference['name']} row was estimated."
    return (f"Mean offsets ours - {reference['name']} over {reference['n_estimated']} spectra: " +
            "; ".join(parts) + ".")


def repeat_levels_md(levels):
    """Lines saying that ``_err_model`` was scaled on real repeats (``calibrate-repeats``),
    with the factors and their check on stars left out of the fit."""
    if not levels:
        return []
    per = ", ".join(f"{LABEL_HEADINGS[label][0]} {r['factor']:.3f} (rms z {r['z_rms_cross_validated']:.2f} on "
                    f"stars left out of the fit)" for label, r in levels["labels"].items())
    return [f"This model's `_err_model` is scaled by a factor per label fitted on {levels['n_spectra']} "
            f"real spectra of {levels['n_stars']} stars observed several times (`lamost-vac "
            f"calibrate-repeats`, from model {levels['from_version']}, repeat groups "
            f"{levels['repeat_groups']}): {per}. On the repeats it was fitted on, its z std is 1 "
            "by construction; the cross-validated rms z is the honest check.", ""]


def repeat_source_sentence(repeat_groups):
    """Where the repeat groups come from, for the report (``repeat_groups``: the report's)."""
    if repeat_groups is None:
        return "No repeat groups given (`--repeat-groups` or `--repeat-radius`)."
    if "table" in repeat_groups:
        return f"Repeat groups from `{os.path.basename(repeat_groups['table'])}`."
    return (f"Repeat groups: spectra within {repeat_groups['radius_arcsec']:g}\" of each other "
            "(header positions, linked friends of friends).")


def reference_section_md(reference):
    """The comparison with the reference labels (the report's ``reference``, or None)."""
    if reference is None:
        return ["## Agreement with reference labels", "", "No reference table given (`--reference`).", ""]
    name = reference["name"]
    joined = {"file name": "by file name", "obsid": "by obsid",
              "position": f"by position within {reference.get('radius_arcsec', 0):g}\""}[reference["join"]]
    parts = [
        f"## Agreement with {name}",
        "",
        f"{reference['n_with_row']} spectra have a row in `{os.path.basename(reference['table'])}` "
        f"(joined {joined}), {reference['n_estimated']} estimated ({reference['n_in_domain']} without "
        f"quality flags). Residual = ours - {name}; mu is their mean, sigma their std; SNRg (header) "
        "bins are (low, high].",
        "",
        offsets_sentence(reference),
        "",
        "### All estimated",
        "",
        accuracy_table(reference["all"], ["all", *reference["snr_bins"]], skip_empty=True),
        "",
        "### Without quality flags (inside the method's domain)",
        "",
        accuracy_table(reference["in_domain"], ["all", *reference["snr_bins"]], skip_empty=True),
        "",
        f"### Median offset by {name} Teff",
        "",
        teff_offset_table_md(reference["median_offset_by_reference_teff"], name),
        "",
    ]
    if reference.get("notes"):
        parts += [reference["notes"].strip(), ""]
    return parts


def report_markdown(report):
    model, counts, rep = report["model"], report["counts"], report["repeatability"]
    training = model.get("training") or {}
    parts = [
        f"# Validation of model {model['version']} on real LAMOST spectra",
        "",
        f"- Model: `{model['artifact']}`, trained on {training.get('n_spectra', '?')} spectra with "
        f"SNRg in {training.get('snr_range', '?')}, {describe_label_domain(training)}; "
        f"wavelength range {model.get('wave_range')} A.",
        "- Real spectra: " + ", ".join(f"`{folder}`" for folder in report["spectra"]) +
        (f", first {report['limit_per_folder']} files per folder (subset)" if report["limit_per_folder"] else
         ", every spectrum file") + ".",
        f"- Regenerate: `{report['command']}`",
        "",
        "## Robustness: outcome of every file",
        "",
        f"Outcomes: `{ESTIMATED}` (no quality flag), `{ESTIMATED_FLAGGED}` (estimated, outside the "
        f"method's domain: Teff 3500-6500 K, [Fe/H] >= -1.5, 5 < SNRg <= 80), `{NOT_STAR}` (header "
        f"CLASS is not STAR), `{LOW_SNR}` (SNRg <= {report['min_snrg']:g} or missing), `{UNUSABLE}` "
        f"(no usable redshift, or too few usable pixels), `{UNREADABLE}` (the reader's reason below). "
        "Every file is in `estimates.csv` with its outcome, reason and flags.",
        "",
        counts_table_md(counts),
        "",
    ]
    problems = [r for r in report["not_estimated"]]
    if problems:
        parts += ["Files not estimated:", "", "| folder | file | outcome | reason |", "|---|---|---|---|"]
        parts += [f"| {r['folder']} | {r['file']} | {r['outcome']} | {r['reason']} |" for r in problems]
        parts += [""]
    if report["flag_counts"]:
        parts += ["Quality flags among the estimated spectra: " +
                  "; ".join(f"{text}: {n}" for text, n in report["flag_counts"].items()) + ".", ""]
    parts += ["Estimates per folder (all estimated spectra, flagged ones included):", "",
              distribution_table_md(report["label_distribution"]), ""]
    parts += [
        "## Repeatability: stars observed several times",
        "",
        f"{repeat_source_sentence(report['repeat_groups'])} "
        f"{rep['n_estimated_in_groups']} estimated spectra of {rep['n_stars']} stars with >= 2 estimated "
        f"spectra ({rep['n_files_in_groups']} files in repeat groups). Scatter: sample std of a star's "
        "estimates. z = (x_i - x_j) / sqrt(err_i^2 + err_j^2) over every pair of a star's spectra; "
        "std about zero, robust std = 1.4826 x median|z|; a unit Gaussian gives 1, 1 and "
        f"|z|<1 for {GAUSS_WITHIN_1:.2f} of pairs. Repeats test only the random part of the "
        "uncertainty, which `_err_model` (the ensemble std scaled on cross-fitted repeat pairs of "
        "the training stars) describes: its z std should be 0.8-1.25. The calibrated `_err` also "
        "contains the systematic error against reference labels (shared by a star's repeats) and "
        "so should give z std below 1.",
        "",
        *repeat_levels_md(report["model"].get("repeat_levels")),
        repeat_table_md(rep),
        "",
    ]
    for label in LABELS:
        r = rep["labels"][label]
        parts.append(f"- {LABEL_HEADINGS[label][0]}: model uncertainties {_honesty(r['z_model']['std'])}, "
                     f"calibrated uncertainties {_honesty(r['z_calibrated']['std'])}.")
    parts += ["", "Median scatter and median rms uncertainties by the star's mean SNRg:", "",
              repeat_snr_table_md(rep), ""]
    parts += reference_section_md(report["reference"])
    parts += ["## Figures", ""]
    name = (report["reference"] or {}).get("name")
    titles = {"outcomes": "Outcome of every file per folder",
              "repeat_scatter": "Scatter of repeated estimates and reported uncertainties vs SNRg",
              "repeat_zscores": "Pairwise z-scores of repeats against a unit Gaussian",
              "reference": f"Ours against {name}, with residual histograms",
              "kiel": "Kiel diagram of all real estimates",
              "kiel_reference": f"Kiel diagram of the spectra with {name} labels: ours and {name}"}
    for key, filename in report["files"]["plots"].items():
        parts += [f"### {titles[key]}", "", f"![{titles[key]}]({filename})", ""]
    return "\n".join(parts)


def write_validation_report(out, artifact, artifact_path, rows, inputs, reference=None, reference_notes=None):
    """Write the report folder (see the module docstring) and return the report.

    ``rows``: :func:`validate_files` output; ``inputs``: what the report records of how it
    was made (spectra: the folders; repeat_groups: {"table": path} or {"radius_arcsec": r}
    or None; limit_per_folder; min_snrg; command: the command that regenerates it);
    ``reference``: the :class:`ReferenceLabels` the rows were joined to, and
    ``reference_notes``: markdown printed after the comparison (why they may disagree).
    """
    os.makedirs(out, exist_ok=True)
    counts = outcome_counts(rows)
    rep, rep_arrays = repeatability(rows)
    agreement = None
    if reference is not None:
        agreement, (ours, ref, ref_snrg) = reference_agreement(rows, reference)
        agreement["notes"] = reference_notes

    estimates = Table()
    for key in ("folder", "file"):
        estimates[key] = [row[key] for row in rows]
    estimates["obsid"] = np.array([-1 if row["obsid"] is None else row["obsid"] for row in rows], dtype=np.int64)
    estimates["class"] = [row["class"] or "" for row in rows]
    estimates["subclass"] = [row["subclass"] or "" for row in rows]
    estimates["snrg"] = _column(rows, "snrg")
    estimates["z"] = _column(rows, "z")
    estimates["outcome"] = [row["outcome"] for row in rows]
    estimates["flags"] = np.array([row["flags"] for row in rows], dtype=np.int64)
    for label in LABELS:
        for suffix in ESTIMATE_SUFFIXES:
            estimates[label + suffix] = _column(rows, label + suffix)
    estimates["repeat_group"] = np.array([-1 if row["repeat_group"] is None else row["repeat_group"]
                                          for row in rows], dtype=np.int64)
    for label in LABELS:
        estimates[label + "_ref"] = np.array(
            [np.nan if row["reference_row"] is None else reference.labels[label][row["reference_row"]]
             for row in rows], dtype=float)
    estimates["reason"] = [row["reason"] for row in rows]
    estimates["model_version"] = artifact["version"]
    write_table(estimates, os.path.join(out, "estimates.csv"))

    estimated = [row for row in rows if row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED)]
    plots = {key: name for key, name in PLOT_FILES.items() if reference is not None or key not in REFERENCE_PLOTS}
    plot_outcomes(os.path.join(out, plots["outcomes"]), counts)
    plot_repeat_scatter(os.path.join(out, plots["repeat_scatter"]), rep_arrays)
    plot_zscores(os.path.join(out, plots["repeat_zscores"]), rep_arrays)
    kiel_diagram(os.path.join(out, plots["kiel"]),
                 *(_column(estimated, label) if estimated else np.array([]) for label in LABELS),
                 title=f"LASSO-MLPNet, {len(estimated)} real LAMOST spectra")
    if reference is not None:
        predicted_vs_reference(os.path.join(out, plots["reference"]), ours, ref, ref_snrg,
                               title=f"LASSO-MLPNet against {reference.name} (reference = {reference.name})")
        kiel_diagram(os.path.join(out, plots["kiel_reference"]), ours["teff"], ours["logg"], ours["feh"],
                     reference=ref, title=f"LASSO-MLPNet (spectra with {reference.name} labels)")

    flag_counts = {}
    for row in estimated:
        for text in describe_flags(row["flags"]):
            flag_counts[text] = flag_counts.get(text, 0) + 1
    config = artifact["preprocess"]
    training = artifact.get("training", {})
    report = {
        "model": {"artifact": os.path.abspath(artifact_path), "version": artifact["version"],
                  "wave_range": [getattr(config, "wave_min", None), getattr(config, "wave_max", None)],
                  "training": {k: training.get(k) for k in ("n_spectra", "n_stars", "snr_range", "label_domain",
                                                            "n_outside_label_domain")},
                  "repeat_levels": (artifact.get("extra") or {}).get("repeat_levels")},
        **inputs,
        "outcomes": list(OUTCOMES),
        "counts": counts,
        "not_estimated": [{k: row[k] for k in ("folder", "file", "outcome", "reason")}
                          for row in rows if row["outcome"] not in (ESTIMATED, ESTIMATED_FLAGGED)],
        "flag_counts": flag_counts,
        "label_distribution": label_distribution(rows),
        "repeatability": rep,
        "reference": agreement,
        "files": {"estimates": "estimates.csv", "plots": plots},
    }
    write_report_files(out, report, report_markdown(report))
    return report
