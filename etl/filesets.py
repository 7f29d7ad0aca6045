"""File-based inputs without a database: a catalogue file, a spectra folder, a label file;
for ``validate``, folders of spectra, a reference-label table and a repeat-groups table.

Used by ``train-files``, ``predict-files``, ``evaluate`` and ``validate``; the
database-backed flow (``ingest``, ``crossmatch``, ``train``) reads the same files through
``etl.ingest``. Tables with columns of any names are mapped as ``ingest labels --columns``
maps them (:func:`etl.ingest.parse_column_mapping`, :func:`etl.ingest.find_column`).
"""
import os
import warnings

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from etl.catalogue import read_label_table, read_table
from etl.ingest import (FLAT_LABEL_NAMES, LABELS_BY_NAME, LabelsIngestOptions, SpectrumIndex,
                        UnsafePathError, find_column, label_arrays, parse_column_mapping)
from etl.validation import convert_column
from models.flags import missing_value
from models.labels import LABELS
from models.validation_report import ReferenceLabels, spectrum_key

CATALOGUE_COLUMNS = ("obsid", "ra", "dec", "snrg", "z")
# LASP's own parameters (catalogue column -> column here), used where present to flag stars
# outside the method's domain; renamed so that reference labels joined later never mix in
LASP_NUMBERS = {"teff": "lasp_teff", "feh": "lasp_feh"}


SHOWN_BAD_ROWS = 5


def _bad_rows(path, name, rows, values, what):
    shown = ", ".join(f"{row + 1} ({values[row]!s:.40})" for row in rows[:SHOWN_BAD_ROWS])
    more = f" and {len(rows) - SHOWN_BAD_ROWS} more" if len(rows) > SHOWN_BAD_ROWS else ""
    return ValueError(f"{path}: column {name!r} {what} in data row(s) {shown}{more}")


def _numbers(column, path, name):
    """A catalogue column as float, with empty cells, NaN and the -9999 sentinel as NaN;
    ValueError naming the file, column and rows of a cell that is not a number.

    (``np.asarray`` of a masked column returns whatever the empty cells hold -- 0 for an
    empty CSV cell -- so a missing redshift became z = 0.)
    """
    masked = np.ma.MaskedArray(column)
    try:
        values = masked.astype(float).filled(np.nan)
    except (TypeError, ValueError):
        cells = masked.filled("").tolist() if masked.dtype.kind in "USO" else masked.tolist()
        values, bad = np.full(len(cells), np.nan), []
        for row, text in enumerate(_texts(cells)):      # blanks (None) stay missing
            try:
                values[row] = np.nan if text is None else float(text)
            except ValueError:
                bad.append(row)
        if bad:
            raise _bad_rows(path, name, bad, cells, "holds text that is not a number") from None
    return np.where(missing_value(values), np.nan, values)


def _catalogue_obsids(column, path, name):
    """The obsid column as int64; ValueError naming the rows with an empty or
    non-integer obsid (an empty cell was read as obsid 0)."""
    masked = np.ma.MaskedArray(column)
    cells = masked.tolist()
    obsids = _obsids(["" if cell is None else cell for cell in cells])
    bad = [row for row, obsid in enumerate(obsids) if obsid is None]
    if bad:
        raise _bad_rows(path, name, bad, cells, "has no integer obsid")
    return np.array(obsids, dtype=np.int64)


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
    out = Table({c: _catalogue_obsids(table[lower[c]], path, lower[c]) if c == "obsid"
                 else _numbers(table[lower[c]], path, lower[c]) for c in CATALOGUE_COLUMNS})
    out["ra"].unit = out["dec"].unit = u.deg
    out["class"] = (np.asarray(table[lower["class"]], dtype=str) if "class" in lower
                    else np.full(len(table), "STAR"))
    out["subclass"] = (np.ma.MaskedArray(table[lower["subclass"]]).astype(str).filled("")
                       if "subclass" in lower else np.full(len(table), ""))
    for name, column in LASP_NUMBERS.items():
        out[column] = _numbers(table[lower[name]], path, lower[name]) if name in lower \
            else np.full(len(table), np.nan)
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
    options = LabelsIngestOptions(path=path, columns=parse_column_mapping(columns, option="--label-columns"))
    _, arrays = label_arrays(read_label_table(path), options)
    table = Table({"apogee_id": np.asarray(arrays["apogee_id"], dtype=str),
                   "ra": np.asarray(arrays["ra"], dtype=float) * u.deg,
                   "dec": np.asarray(arrays["dec"], dtype=float) * u.deg})
    # the database's reading of a label: the -9999 sentinel, blanks and text are missing, a
    # value outside the physical range (a unit mistake, a sentinel) unusable
    refused = {}
    for label in ("teff", "logg", "feh"):
        values, problems = convert_column(LABELS_BY_NAME[label], arrays[label], label)
        table[label] = np.array([np.nan if v is None else v for v in values], dtype=float)
        for row, reason in problems.items():
            refused.setdefault(row, reason)
    if refused:
        first = min(refused)
        warnings.warn(f"{path}: {len(refused)} row(s) with a label that cannot be used are left "
                      f"out (row {first + 1}: {refused[first]})", stacklevel=2)
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


# -- validate's inputs ---------------------------------------------------------------------
# candidate columns (lower case) of the ways a reference row names its spectrum, in the
# order they are tried: the file name (LAMOST catalogues), the obsid, the position
REFERENCE_FILE_NAMES = ["filename", "file", "file_name", "combined_file"]
REFERENCE_MAPPING_NAMES = ("teff", "logg", "feh", "filename", "obsid", "ra", "dec")
REPEAT_FILE_NAMES = ["combined_file", "filename", "file", "file_name"]
REPEAT_GROUP_NAMES = ["groupid", "group_id", "group"]


def spectrum_folders(folders, option="--spectra"):
    """[(folder name, [(file, path)])]: the spectrum files (``spec-*.fits[.gz]``, at any
    depth, sorted) of each folder, ``file`` relative to it. The name is the folder's base
    name, or the path as given when two folders share a base name."""
    found = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise ValueError(f"{option} {folder}: no such folder")
        index = SpectrumIndex(folder)
        if not index.relative_paths:
            raise ValueError(f"{option} {folder}: no spectrum files (spec-*.fits[.gz]) in it or below")
        found.append((folder, [(relative, os.path.join(index.root, relative)) for relative in index.relative_paths]))
    names = [os.path.basename(os.path.normpath(folder)) for folder, _ in found]
    if len(set(names)) < len(names):
        names = [os.path.normpath(folder) for folder, _ in found]
    return [(name, files) for name, (_, files) in zip(names, found)]


def _read_whole_table(path, option):
    """(column name -> array) of a CSV or FITS table; errors name the option and the file."""
    try:
        columns, _unreadable_rows = read_table(path)     # a row the csv module refuses is blank
    except (OSError, ValueError) as error:
        raise ValueError(f"{option} {path}: unreadable table ({error})") from None
    if not columns:
        raise ValueError(f"{option} {path}: no columns (an empty file?)")
    return columns


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return np.nan


def _label_numbers(column):
    """A column of a table read by ``read_table`` (text from a CSV, numbers from FITS) as
    float: empty, not a number, NaN, infinite or -9999 is NaN (missing)."""
    try:
        values = np.asarray(column).astype(float)
    except (TypeError, ValueError):          # an empty cell or a word: value by value
        values = np.array([_number(value) for value in column], dtype=float)
    return np.where(missing_value(values), np.nan, values)


def _texts(column):
    """Column values as stripped text, None where empty."""
    texts = [str(value.decode() if isinstance(value, bytes) else value).strip() for value in column]
    return [text or None for text in texts]


def _obsids(column):
    """Column values as obsids (int), None where empty or not an integer."""
    obsids = []
    for text in _texts(column):
        try:
            obsids.append(int(text))
        except (TypeError, ValueError):
            number = _number(text)
            obsids.append(int(number) if np.isfinite(number) and number == int(number) else None)
    return obsids


def read_reference_labels(path, columns=None, name="reference", radius_arcsec=3.0,
                          option="--reference-columns", table_option="--reference"):
    """Reference labels (teff, logg, feh) from a table of any columns, and how a spectrum
    finds its row: a file-name column if the table has one (or one is mapped), else an
    obsid column, else ra and dec (nearest within ``radius_arcsec``). ``columns`` maps
    names to columns as ``ingest labels --columns`` does, e.g.
    ``"teff=TEFF,logg=LOGG,feh=FE_H,ra=RA,dec=DEC"``; values that are empty, not numbers,
    NaN or -9999 are missing."""
    mapping = parse_column_mapping(columns, allowed=REFERENCE_MAPPING_NAMES, option=option)
    table = _read_whole_table(path, table_option)
    names = list(table)

    def column(what, candidates, required=True):
        found = find_column(names, mapping.get(what), candidates, what, required=required, option=option,
                            source=path)
        return None if found is None else table[found]

    labels = {label: _label_numbers(column(label, FLAT_LABEL_NAMES[label])) for label in LABELS}
    # the join: the one mapped, else the first the table has of file name, obsid, position
    mapped = [key for key in ("filename", "obsid", "ra", "dec") if key in mapping]
    file_names = column("filename", REFERENCE_FILE_NAMES, required="filename" in mapped)
    obsids = column("obsid", ["obsid"], required="obsid" in mapped)
    source = os.path.abspath(path)
    if file_names is not None and (not mapped or mapped[0] == "filename"):
        keys = [None if text is None else spectrum_key(text) for text in _texts(file_names)]
        return ReferenceLabels(name, source, labels, "file name", keys=keys)
    if obsids is not None and (not mapped or mapped[0] == "obsid"):
        return ReferenceLabels(name, source, labels, "obsid", keys=_obsids(obsids))
    positioned = "ra" in mapped or "dec" in mapped
    ra = column("ra", ["ra", "ra_deg"], required=positioned)
    dec = column("dec", ["dec", "dec_deg", "de"], required=positioned)
    if ra is None or dec is None:
        raise ValueError(f"{path}: no column to find a spectrum's row by: map a file name, an obsid or "
                         f"ra and dec with {option} (e.g. filename=NAME or ra=RA,dec=DEC); columns: "
                         f"{', '.join(names)}")
    return ReferenceLabels(name, source, labels, "position", ra=_label_numbers(ra), dec=_label_numbers(dec),
                           radius_arcsec=radius_arcsec)


def read_repeat_groups(path, columns=None, option="--repeat-columns", table_option="--repeat-groups"):
    """{spectrum key: group id} from a table of repeat observations: a file-name column
    (e.g. ``combined_file``) and a group column (e.g. ``GroupID``), mapped with ``columns``
    (``"file=NAME,group=NAME"``) when their names are others."""
    mapping = parse_column_mapping(columns, allowed=("file", "group"), option=option)
    table = _read_whole_table(path, table_option)
    names = list(table)
    files = table[find_column(names, mapping.get("file"), REPEAT_FILE_NAMES, "file", option=option,
                              source=path)]
    groups = _label_numbers(table[find_column(names, mapping.get("group"), REPEAT_GROUP_NAMES, "group",
                                        option=option, source=path)])
    return {spectrum_key(name): int(group) for name, group in zip(_texts(files), groups)
            if name and np.isfinite(group)}
