"""The ``validate`` report: how a model behaves on real LAMOST spectra.

Simulated spectra measure accuracy against known truth; real spectra check the method
where there is no truth. From folders of real spectra (``lamost-vac validate`` finds the
files and reads the side tables) this module estimates every file and writes a report
folder:

- robustness: every spectrum file of every folder is read and either estimated or
  flagged with a reason (unreadable with the reader's reason; class not STAR; near-zero
  SNRg; no usable redshift or too few usable pixels); counts per outcome per folder;
- repeatability: stars observed several times: the scatter of their estimates against
  SNRg and the pairwise z-scores with the model uncertainty (``<label>_err_model``, the
  scaled ensemble std) and the calibrated one (``<label>_err``) -- a z-score std of ~1
  means honest uncertainties (statistics in :mod:`models.validation`);
- agreement with LASP: spectra with LASP rows: MAE, mu, sigma of ours - LASP by SNRg,
  with scatter plots;
- the Kiel diagram of all real estimates.

Files: ``report.md``, ``report.json``, ``estimates.csv`` (one row per file, with outcome
and reason) and PNG figures.
"""
import os

import numpy as np
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
from .validation import GAUSS_WITHIN_1, pairwise_z, repeat_scatter, scatter_summary, z_summary

DEFAULT_MIN_SNRG = 2.0

# outcomes, in report order
ESTIMATED = "estimated"                  # estimated, no quality flag
ESTIMATED_FLAGGED = "estimated_flagged"  # estimated, outside the method's domain (flags say why)
NOT_STAR = "not_a_star"                  # header class is not STAR: not estimated
LOW_SNR = "low_snr"                      # SNRg missing or near zero: not estimated
UNUSABLE = "unusable"                    # read, but no usable redshift or too few usable pixels
UNREADABLE = "unreadable"                # the reader refused the file
OUTCOMES = (ESTIMATED, ESTIMATED_FLAGGED, NOT_STAR, LOW_SNR, UNUSABLE, UNREADABLE)

# LASP comparison: the paper's SNRg bins plus below 5 and above 80 (real spectra reach 200+)
LASP_SNR_BINS = (0.0, *SNR_BINS, np.inf)
# repeat observations have SNRg 30-375
REPEAT_SNR_BINS = (0.0, 20.0, 40.0, 80.0, 160.0, np.inf)
# offsets from LASP by LASP Teff: where a disagreement comes from
LASP_TEFF_BINS = (0.0, 5000.0, 6000.0, 7000.0, np.inf)
PLOT_FILES = {"outcomes": "outcomes.png", "repeat_scatter": "repeat_scatter.png",
              "repeat_zscores": "repeat_zscores.png", "lasp": "lasp_comparison.png",
              "kiel": "kiel_diagram.png", "kiel_lasp": "kiel_lasp.png"}
OFFSET_DISCUSSION = (
    "Possible causes of the offsets from LASP: (1) the model is trained on simulated spectra "
    "of MILES stars (an empirical library observed through a model of LAMOST), not on real "
    "LAMOST spectra, so any mismatch between simulated and real spectra (noise, flux "
    "calibration, sky residuals, instrumental profile) and between MILES labels and the "
    "APOGEE/LASP scales propagates into the estimates; (2) the DR1 spectra come from the "
    "oldest pipeline (v2.6.4), whose flux calibration and sky subtraction are poorer than "
    "DR7/DR8's, which changes the continuum shape the normalisation sees; (3) the model uses "
    "3881-7400 A only (MILES' coverage) while LASP fits the whole spectrum, and LASP's own "
    "labels carry their own systematics (LASP is ULySS with the ELODIE library), so part of "
    "the offset is LASP's. (4) Found and fixed here: the DR1 pipeline sets ivar = 0 in the cores "
    "of the strongest lines (Ca II H and K, G band); masking them made Teff ~1,100 K too hot, "
    "so preprocessing keeps those DR1 pixels (models/preprocess.py, _good_pixels).")



# -- spectra -------------------------------------------------------------------------------
def spectrum_key(name):
    """File base name without .gz: how the side tables name a spectrum."""
    base = os.path.basename(str(name).strip())
    return base[:-3] if base.endswith(".gz") else base


def _is_star(klass):
    return klass is not None and str(klass).strip().upper() == "STAR"


def estimate_files(artifact, folders, n_jobs=-1, min_snrg=DEFAULT_MIN_SNRG):
    """One row per file: folder, file, header metadata, outcome, reason, flags, estimates."""
    rows = []
    for folder, paths in folders:
        for path in paths:
            row = {"folder": folder, "file": os.path.basename(path), "path": path, "obsid": None,
                   "class": None, "subclass": None, "snrg": np.nan, "z": np.nan,
                   "outcome": None, "reason": "", "flags": 0,
                   **{label + suffix: np.nan for label in LABELS for suffix in ESTIMATE_SUFFIXES}}
            try:
                meta = read_meta(path)
            except SpectrumReadError as error:
                row.update(outcome=UNREADABLE, reason=error.reason, flags=UNUSABLE_SPECTRUM)
                rows.append(row)
                continue
            row.update(obsid=meta["obsid"], subclass=meta["subclass"],
                       snrg=np.nan if meta["snrg"] is None else meta["snrg"],
                       z=np.nan if meta["z"] is None else meta["z"])
            row["class"] = meta["class"]
            if not _is_star(meta["class"]):
                row.update(outcome=NOT_STAR, flags=NOT_A_STAR,
                           reason=f"class is {meta['class']!r}, not STAR: not estimated")
            elif not (row["snrg"] > min_snrg):
                row.update(outcome=LOW_SNR, flags=SNR_OUT_OF_DOMAIN | UNUSABLE_SPECTRUM,
                           reason=("no SNRG in header" if not np.isfinite(row["snrg"]) else
                                   f"SNRg {row['snrg']:g} <= {min_snrg:g}") + ": not estimated")
            rows.append(row)
    todo = [i for i, row in enumerate(rows) if row["outcome"] is None]
    estimates = {}
    if todo:
        model = artifact["model"]
        feature_set = featurise_files(
            [rows[i]["path"] for i in todo], [rows[i]["z"] for i in todo], artifact["preprocess"],
            n_jobs=n_jobs, progress=lambda it, total: progress(it, total, "preprocessing"))
        errors = feature_set.errors
        snrg = np.array([rows[i]["snrg"] for i in todo], dtype=float)
        estimates = predict_features(model, feature_set, snrg,
                                     subclass=[rows[i]["subclass"] for i in todo])
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
def repeatability(rows, repeats):
    """Scatter and pairwise z-scores of the estimated spectra that belong to repeat groups."""
    members = [row for row in rows if spectrum_key(row["file"]) in repeats
               and row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED)]
    groups = [repeats[spectrum_key(row["file"])] for row in members]
    snrg = _column(members, "snrg") if members else np.array([])
    result = {"n_files_in_groups": sum(1 for row in rows if spectrum_key(row["file"]) in repeats),
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


def lasp_agreement(rows, lasp):
    """Ours - LASP for every estimated spectrum with a LASP row: accuracy by SNRg bin for all
    of them and for the method's domain (no quality flag)."""
    matched = [row for row in rows if spectrum_key(row["file"]) in lasp]
    estimated = [row for row in matched if row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED)]
    ours = {label: _column(estimated, label) if estimated else np.array([]) for label in LABELS}
    ref = {label: np.array([lasp[spectrum_key(row["file"])][label] for row in estimated], dtype=float)
           for label in LABELS}
    snrg = _column(estimated, "snrg") if estimated else np.array([])
    in_domain = np.array([row["flags"] == 0 for row in estimated], dtype=bool)
    result = {"n_with_lasp_row": len(matched), "n_estimated": len(estimated),
              "n_in_domain": int(in_domain.sum()),
              "snr_bins": snr_bin_names(LASP_SNR_BINS),
              "all": accuracy_by_snr(ours, ref, snrg, bins=LASP_SNR_BINS),
              "in_domain": accuracy_by_snr({k: v[in_domain] for k, v in ours.items()},
                                           {k: v[in_domain] for k, v in ref.items()},
                                           snrg[in_domain], bins=LASP_SNR_BINS)}
    by_teff = {}
    for lo, hi in zip(LASP_TEFF_BINS[:-1], LASP_TEFF_BINS[1:]):
        mask = (ref["teff"] > lo) & (ref["teff"] <= hi)
        by_teff[f"{lo:g}-{hi:g}"] = {
            "n": int(mask.sum()),
            **{label: _number(np.nanmedian(ours[label][mask] - ref[label][mask])) if mask.any() else None
               for label in LABELS}}
    result["median_offset_by_lasp_teff"] = by_teff
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


def teff_offset_table_md(by_teff):
    head = ["LASP Teff (K)", "N"] + [f"median {LABEL_HEADINGS[l][0]} offset ({LABEL_HEADINGS[l][1]})"
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


def offsets_sentence(lasp):
    parts = []
    for label in LABELS:
        s = lasp["all"][label]["all"]
        name, unit, spec = LABEL_HEADINGS[label]
        if s["n"]:
            parts.append(f"{name} {s['mu']:+{spec}} {unit} (sigma {s['sigma']:{spec}}, MAE {s['mae']:{spec}})")
    if not parts:
        return "No DR1 spectrum with a LASP row was estimated."
    return (f"Mean offsets ours - LASP over {lasp['n_estimated']} spectra: " + "; ".join(parts) + ".")


def report_markdown(report):
    model, counts, rep, lasp = report["model"], report["counts"], report["repeatability"], report["lasp"]
    training = model.get("training") or {}
    parts = [
        f"# Validation of model {model['version']} on real LAMOST spectra",
        "",
        f"- Model: `{model['artifact']}`, trained on {training.get('n_spectra', '?')} spectra with "
        f"SNRg in {training.get('snr_range', '?')}, {describe_label_domain(training)}; "
        f"wavelength range {model.get('wave_range')} A.",
        f"- Real spectra: `{report['real_dir']}`" +
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
        repeat_table_md(rep),
        "",
    ]
    for label in LABELS:
        r = rep["labels"][label]
        parts.append(f"- {LABEL_HEADINGS[label][0]}: model uncertainties {_honesty(r['z_model']['std'])}, "
                     f"calibrated uncertainties {_honesty(r['z_calibrated']['std'])}.")
    parts += ["", "Median scatter and median rms uncertainties by the star's mean SNRg:", "",
              repeat_snr_table_md(rep), ""]
    parts += [
        "## Agreement with LASP (DR1)",
        "",
        f"{lasp['n_with_lasp_row']} spectra have a row in the DR1 A/F/G/K catalogue, "
        f"{lasp['n_estimated']} estimated ({lasp['n_in_domain']} without quality flags). "
        "Residual = ours - LASP; mu is their mean, sigma their std; SNRg (header) bins are (low, high].",
        "",
        offsets_sentence(lasp),
        "",
        "### All estimated",
        "",
        accuracy_table(lasp["all"], ["all", *lasp["snr_bins"]], skip_empty=True),
        "",
        "### Without quality flags (inside the method's domain)",
        "",
        accuracy_table(lasp["in_domain"], ["all", *lasp["snr_bins"]], skip_empty=True),
        "",
        "### Median offset by LASP Teff",
        "",
        teff_offset_table_md(lasp["median_offset_by_lasp_teff"]),
        "",
        OFFSET_DISCUSSION,
        "",
        "## Figures",
        "",
    ]
    titles = {"outcomes": "Outcome of every file per folder",
              "repeat_scatter": "Scatter of repeated estimates and reported uncertainties vs SNRg",
              "repeat_zscores": "Pairwise z-scores of repeats against a unit Gaussian",
              "lasp": "Ours against LASP (DR1), with residual histograms",
              "kiel": "Kiel diagram of all real estimates",
              "kiel_lasp": "Kiel diagram of the DR1 spectra: ours and LASP"}
    for key, filename in report["files"]["plots"].items():
        parts += [f"### {titles[key]}", "", f"![{titles[key]}]({filename})", ""]
    return "\n".join(parts)


def write_validation_report(out, artifact, artifact_path, rows, repeats, lasp_rows, inputs):
    """Write the report folder (see the module docstring) and return the report.

    ``rows``: :func:`estimate_files` output; ``repeats``: {spectrum key: repeat group};
    ``lasp_rows``: {spectrum key: LASP labels}; ``inputs``: what the report records of how
    it was made (real_dir, limit_per_folder, min_snrg and the command that regenerates it).
    """
    os.makedirs(out, exist_ok=True)
    counts = outcome_counts(rows)
    rep, rep_arrays = repeatability(rows, repeats)
    lasp, (ours, ref, lasp_snrg) = lasp_agreement(rows, lasp_rows)

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
    estimates["repeat_group"] = np.array([repeats.get(spectrum_key(row["file"]), -1) for row in rows],
                                         dtype=np.int64)
    for label in LABELS:
        estimates[label + "_lasp"] = np.array([lasp_rows.get(spectrum_key(row["file"]), {}).get(label, np.nan)
                                             for row in rows], dtype=float)
    estimates["reason"] = [row["reason"] for row in rows]
    estimates["model_version"] = artifact["version"]
    write_table(estimates, os.path.join(out, "estimates.csv"))

    estimated = [row for row in rows if row["outcome"] in (ESTIMATED, ESTIMATED_FLAGGED)]
    plots = dict(PLOT_FILES)
    plot_outcomes(os.path.join(out, plots["outcomes"]), counts)
    plot_repeat_scatter(os.path.join(out, plots["repeat_scatter"]), rep_arrays)
    plot_zscores(os.path.join(out, plots["repeat_zscores"]), rep_arrays)
    predicted_vs_reference(os.path.join(out, plots["lasp"]), ours, ref, lasp_snrg,
                           title="LASSO-MLPNet against LASP (reference = LASP, LAMOST DR1)")
    kiel_diagram(os.path.join(out, plots["kiel"]),
                 *(_column(estimated, label) if estimated else np.array([]) for label in LABELS),
                 title=f"LASSO-MLPNet, {len(estimated)} real LAMOST spectra")
    kiel_diagram(os.path.join(out, plots["kiel_lasp"]), ours["teff"], ours["logg"], ours["feh"],
                 reference=ref, title="LASSO-MLPNet (DR1)")

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
                                                            "n_outside_label_domain")}},
        **inputs,
        "outcomes": list(OUTCOMES),
        "counts": counts,
        "not_estimated": [{k: row[k] for k in ("folder", "file", "outcome", "reason")}
                          for row in rows if row["outcome"] not in (ESTIMATED, ESTIMATED_FLAGGED)],
        "flag_counts": flag_counts,
        "label_distribution": label_distribution(rows),
        "repeatability": rep,
        "lasp": lasp,
        "files": {"estimates": "estimates.csv", "plots": plots},
        "offset_discussion": OFFSET_DISCUSSION,
    }
    write_report_files(out, report, report_markdown(report))
    return report
