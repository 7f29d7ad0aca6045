"""What the evaluate and validate reports share: one table layout, one number format, and
the files of a report folder (``report.json``, ``report.md``, tables of estimates).

The reports themselves are built in :mod:`models.evaluation_report` (accuracy against
reference labels) and :mod:`models.validation_report` (behaviour on real spectra).
"""
import json
import os

import numpy as np

from .labels import LABELS

# label -> (heading, unit, format of its values)
LABEL_HEADINGS = {"teff": ("Teff", "K", ".0f"), "logg": ("log g", "dex", ".3f"),
                  "feh": ("[Fe/H]", "dex", ".3f")}


# -- markdown ------------------------------------------------------------------------------
def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(head, rows):
    """A markdown table from a header and rows of cell strings."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def label_head(kinds):
    """Column headings 'Teff MAE (K)', ... : every label with every kind."""
    return [f"{LABEL_HEADINGS[label][0]} {kind} ({LABEL_HEADINGS[label][1]})"
            for label in LABELS for kind in kinds]


def summary_cells(accuracy, snr_bin):
    """MAE, mu and sigma of every label in one SNRg bin of ``accuracy_by_snr`` output."""
    cells = []
    for label in LABELS:
        s, spec = accuracy[label][snr_bin], LABEL_HEADINGS[label][2]
        cells += [fmt(s["mae"], spec), fmt(s["mu"], "+" + spec), fmt(s["sigma"], spec)]
    return cells


def accuracy_table(accuracy, snr_bins, skip_empty=False):
    """One row per SNRg bin (``snr_bins``: names such as 'all', '10-20'); ``skip_empty``
    leaves out the bins other than 'all' that hold no spectra."""
    rows = []
    for name in snr_bins:
        n = accuracy[LABELS[0]][name]["n"]
        if skip_empty and name != "all" and n == 0:
            continue
        rows.append([name, str(n)] + summary_cells(accuracy, name))
    return table(["SNRg", "N"] + label_head(("MAE", "mu", "sigma")), rows)


def describe_label_domain(record):
    """One line for reports from a training-set description (``record``): the label
    domain the model was trained in (see ``etl/label_domain.py`` for the option)."""
    if record.get("label_domain") is None:           # artifacts from before the option
        return "label domain not recorded"
    domain = record["label_domain"]
    if not domain:
        return "labels of every value (no label-domain restriction)"
    parts = []
    for label, (low, high) in domain.items():
        if low is not None and high is not None:
            parts.append(f"{low:g} <= {label} <= {high:g}")
        elif low is not None:
            parts.append(f"{label} >= {low:g}")
        else:
            parts.append(f"{label} <= {high:g}")
    outside = record.get("n_outside_label_domain")
    return ("labels inside " + ", ".join(parts) +
            (f" ({outside} matched spectra outside left out)" if outside is not None else ""))


# -- files ---------------------------------------------------------------------------------
def table_format(path) -> str:
    """The astropy format of a table file by its extension: .fits/.fit(.gz) "fits",
    .xml/.vot/.votable "votable", anything else "ascii.csv"."""
    lower = path.lower()
    if lower.endswith((".fits", ".fit", ".fits.gz")):
        return "fits"
    if lower.endswith((".xml", ".vot", ".votable")):
        return "votable"
    return "ascii.csv"


def write_table(table, path):
    """Write an astropy Table in the format of its extension (:func:`table_format`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table.write(path, format=table_format(path), overwrite=True)


def _json_number(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        value = float(value)
        return value if np.isfinite(value) else None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report_files(out_dir, report, markdown):
    """``report.json`` (numpy numbers as plain ones) and ``report.md`` in ``out_dir``."""
    with open(os.path.join(out_dir, "report.json"), "w") as handle:
        json.dump(report, handle, indent=2, default=_json_number)
    with open(os.path.join(out_dir, "report.md"), "w") as handle:
        handle.write(markdown)
