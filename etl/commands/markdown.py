"""Markdown tables of the evaluate and validate reports: one layout, one number format."""
from models.labels import LABELS

# label -> (heading, unit, format of its values)
LABEL_HEADINGS = {"teff": ("Teff", "K", ".0f"), "logg": ("log g", "dex", ".3f"),
                  "feh": ("[Fe/H]", "dex", ".3f")}


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
