"""File-based inputs without a database: a catalogue file, a spectra folder, a label file.

Used by ``train-files``, ``predict-files`` and ``evaluate``; the database-backed flow
(``ingest``, ``crossmatch``, ``train``) reads the same files through ``etl.ingest``.
"""
import os

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from etl.ingest import (LabelsIngestOptions, SpectrumIndex, UnsafePathError, label_arrays,
                        parse_column_mapping, read_label_table)
from models.flags import missing_value
from models.labels import LABELS

CATALOGUE_COLUMNS = ("obsid", "ra", "dec", "snrg", "z")
# LASP's own parameters (catalogue column -> column here), used where present to flag stars
# outside the method's domain; renamed so that reference labels joined later never mix in
LASP_NUMBERS = {"teff": "lasp_teff", "feh": "lasp_feh"}


def _numbers(column):
    """A catalogue column as float, with empty cells, NaN and the -9999 sentinel as NaN.

    (``np.asarray`` of a masked column returns whatever the empty cells hold -- 0 for an
    empty CSV cell -- so a missing redshift became z = 0.)
    """
    values = np.ma.MaskedArray(column).astype(float).filled(np.nan)
    return np.where(missing_value(values), np.nan, values)


def read_catalogue(path, spectra_root):
    """Catalogue rows (CSV or FITS, gz ok) whose spectrum file exists under ``spectra_root``.

    Returns ``(table, missing)``: an astropy Table with obsid, ra, dec, snrg, z (NaN where
    missing: empty, NaN or -9999), class (STAR when absent), subclass, lasp_teff and
    lasp_feh (the catalogue's teff and feh when it has them: empty / NaN otherwise) and
    ``path`` (absolute), and the list of rows without a file (a file path that leads
    outside the root counts as no file).
    """
    fmt = "ascii.csv" if ".csv" in os.path.basename(path).lower() else None
    table = Table.read(path, format=fmt) if fmt else Table.read(path)
    lower = {name.lower(): name for name in table.colnames}
    missing_columns = [c for c in CATALOGUE_COLUMNS if c not in lower]
    if missing_columns:
        raise ValueError(f"{path}: catalogue lacks column(s) {', '.join(missing_columns)}")
    out = Table({c: np.asarray(table[lower[c]], dtype=np.int64) if c == "obsid" else _numbers(table[lower[c]])
                 for c in CATALOGUE_COLUMNS})
    out["ra"].unit = out["dec"].unit = u.deg
    out["class"] = (np.asarray(table[lower["class"]], dtype=str) if "class" in lower
                    else np.full(len(table), "STAR"))
    out["subclass"] = (np.ma.MaskedArray(table[lower["subclass"]]).astype(str).filled("")
                       if "subclass" in lower else np.full(len(table), ""))
    for name, column in LASP_NUMBERS.items():
        out[column] = _numbers(table[lower[name]]) if name in lower else np.full(len(table), np.nan)
    index = SpectrumIndex(spectra_root)
    paths, missing = [], []
    for i, row in enumerate(table):
        try:
            relative = index.find(
                filename=str(row[lower["filename"]]) if "filename" in lower else None,
                **{k: row[lower[k]] for k in ("lmjd", "planid", "spid", "fiberid") if k in lower})
        except UnsafePathError:         # leads outside the root: never opened, missing
            relative = None
        paths.append(os.path.join(index.root, relative) if relative else "")
        if not relative:
            missing.append(i)
    out["path"] = paths
    keep = np.ones(len(out), dtype=bool)
    keep[missing] = False
    return out[keep], [int(out["obsid"][i]) for i in missing]


def catalogue_evidence(table):
    """Keyword arguments of ``models.pipeline.predict_features`` from a catalogue table:
    the LASP subclass, Teff and [Fe/H] columns it has (see ``read_catalogue``)."""
    names = {"subclass": "subclass", "teff": LASP_NUMBERS["teff"], "feh": LASP_NUMBERS["feh"]}
    return {key: np.asarray(table[column]) for key, column in names.items() if column in table.colnames}


def read_labels(path, columns=None):
    """Reference labels as an astropy Table; ``good`` is True where ``good_flag == 1`` and
    all three labels are present."""
    options = LabelsIngestOptions(path=path, columns=parse_column_mapping(columns))
    _, arrays = label_arrays(read_label_table(path), options)
    table = Table({"apogee_id": np.asarray(arrays["apogee_id"], dtype=str),
                   "ra": np.asarray(arrays["ra"], dtype=float) * u.deg,
                   "dec": np.asarray(arrays["dec"], dtype=float) * u.deg})
    for label in ("teff", "logg", "feh"):
        values = np.asarray(arrays[label], dtype=float)
        table[label] = np.where(values <= -9999, np.nan, values)
    good = (np.ones(len(table), dtype=bool) if arrays["good_flag"] is None
            else np.asarray(arrays["good_flag"], dtype=float) == 1)
    good &= np.isfinite(table["teff"]) & np.isfinite(table["logg"]) & np.isfinite(table["feh"])
    table["good"] = good
    return table


def best_match(catalogue, labels, radius_arcsec=3.0):
    """Join each catalogue row to its nearest label within the radius (TOPCAT best match).

    The nearest star is matched among all labels and only then are bad labels dropped, so
    that a spectrum whose own star has a bad label is not given a neighbour's labels.
    Returns the matched catalogue rows with apogee_id, teff, logg, feh and ``separation``
    (arcsec) added.
    """
    if len(catalogue) == 0 or len(labels) == 0:
        raise ValueError("nothing to cross-match: empty catalogue or label table")
    spectra = SkyCoord(catalogue["ra"], catalogue["dec"], unit=u.deg)
    stars = SkyCoord(labels["ra"], labels["dec"], unit=u.deg)
    nearest, separation, _ = spectra.match_to_catalog_sky(stars)
    within = (separation <= radius_arcsec * u.arcsec) & np.asarray(labels["good"])[nearest]
    matched = catalogue[within]
    for column in ("apogee_id", "teff", "logg", "feh"):
        matched[column] = labels[column][nearest[within]]
    matched["separation"] = separation[within].to(u.arcsec)
    return matched


def read_truth(path):
    """A CSV of obsid, teff, logg, feh (e.g. lamost_sim's truth.csv)."""
    table = Table.read(path, format="ascii.csv")
    return table[["obsid", "teff", "logg", "feh"]]


def join_truth(catalogue, truth):
    """Catalogue rows whose obsid is in the truth table, with its teff, logg, feh added."""
    row_of_obsid = {int(o): i for i, o in enumerate(truth["obsid"])}
    rows = [i for i, o in enumerate(catalogue["obsid"]) if int(o) in row_of_obsid]
    matched = catalogue[rows]
    truth_rows = [row_of_obsid[int(o)] for o in matched["obsid"]]
    for label in LABELS:
        matched[label] = np.asarray(truth[label], dtype=float)[truth_rows]
    return matched
