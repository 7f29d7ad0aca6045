"""Load LAMOST spectrum metadata and reference labels into the catalogue database.

Spectra (``ingest_spectra``)
    * With a catalogue (CSV or FITS, optionally gzipped; DR8 LRS column names, any case;
      optional columns may be missing): each row is joined to its spectrum file under the
      spectra root, found at any depth by the ``filename`` column when there is one
      (as a relative path, else by its base name) or else by the standard name
      ``spec-LMJD-PLANID_spSS-FFF.fits[.gz]``. The catalogue's values win; the file
      supplies size, SHA-256, layout and data version, and must be readable.
    * Files under the root that no catalogue row names ("unreferenced"), and every file
      when there is no catalogue, are ingested from their FITS headers. **Rule for files
      without OBSID** (LAMOST DR1 headers have none): such a file is only ingested through
      a catalogue row that names it; without one it is quarantined with the reason
      ``no OBSID and no catalogue row`` -- unless an earlier catalogue ingest stored a
      spectrum with the same file path (relative to the root), which is then kept.
    * ``metadata_only``: load catalogue rows without looking for files (file columns stay
      as stored, NULL for new rows).

Rejections go to the ``quarantine`` table with a reason; the rest is loaded:
non-numeric or out-of-range RA/Dec or other numbers, a missing obsid, a duplicate obsid
(the first row wins, later ones are quarantined), a missing or unreadable (for example
truncated) file, a header OBSID that contradicts the catalogue.

Idempotent and resumable: rows are upserted in batches, each batch in its own
transaction; a stored row is only rewritten when a value differs, and a NULL in new input
never erases a stored value. Re-running after a crash re-does only what is missing.

Labels (``ingest_labels``)
    APOGEE Payne as repackaged (2-D ``payne`` column: Teff at index 0, logg 1, [Fe/H] 19;
    -9999 = missing; ``good_flag``) or flat columns (TEFF/LOGG/FE_H, Teff/Logg/FeH, ...;
    any mapping with ``columns={"teff": ..., "logg": ..., "feh": ...}``). Without a good
    flag column, ``good_flag`` is 1 exactly when Teff, logg and [Fe/H] are all present.
"""
import csv
import gzip
import hashlib
import itertools
import math
import os
import re
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Iterable, List, Optional

import numpy as np
from sqlalchemy import insert, select, update

from etl import db, schema
from models.artifact import code_version

SPECTRUM_NAME = re.compile(r"^spec-(\d+)-(.+)_sp(\d+)-(\d+)\.fits(?:\.gz)?$", re.IGNORECASE)
SPECTRUM_FILE = re.compile(r"^spec-.+\.fits?(?:\.gz)?$", re.IGNORECASE)
MISSING_SENTINELS = (-9999.0, -9999)
NO_OBSID_REASON = "no OBSID and no catalogue row"

# Catalogue column names accepted for each spectra column (compared lower-case, with a
# TOPCAT-style "combined_" prefix removed); the first one present is used.
CATALOGUE_ALIASES = {
    "obsid": ["obsid"],
    "designation": ["designation", "desig"],
    "ra": ["ra", "ra_obs"],
    "dec": ["dec", "dec_obs"],
    "lmjd": ["lmjd"],
    "mjd": ["mjd"],
    "planid": ["planid"],
    "spid": ["spid"],
    "fiberid": ["fiberid"],
    "snru": ["snru"], "snrg": ["snrg"], "snrr": ["snrr"], "snri": ["snri"], "snrz": ["snrz"],
    "class": ["class"],
    "subclass": ["subclass"],
    "z": ["z"],
    "z_err": ["z_err"],
    "filename": ["filename", "file", "fits_name", "lamost_id"],
}
INTEGER_COLUMNS = ("obsid", "lmjd", "mjd", "spid", "fiberid")
FLOAT_COLUMNS = ("ra", "dec", "snru", "snrg", "snrr", "snri", "snrz", "z", "z_err")
TEXT_COLUMNS = ("designation", "planid", "class", "subclass", "filename")
REQUIRED_COLUMNS = ("obsid", "ra", "dec")
# Columns not compared when deciding whether a stored row changed.
BOOKKEEPING_COLUMNS = ("ingest_run_id",)
SPECTRA_COLUMNS = [c.name for c in schema.spectra.columns]


def utcnow():
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------------------------------
# Runs, summaries and quarantine
@dataclass
class IngestSummary:
    run_id: str
    kind: str
    read: int = 0
    loaded: int = 0
    updated: int = 0
    unchanged: int = 0
    quarantined: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def stored(self) -> int:
        """Input now in the database (new, changed, or already there unchanged)."""
        return self.loaded + self.updated + self.unchanged

    @property
    def exit_code(self) -> int:
        """Non-zero only when nothing could be loaded."""
        return 0 if self.stored > 0 else 1

    def add(self, counts: db.UpsertCounts):
        self.loaded += counts.inserted
        self.updated += counts.updated
        self.unchanged += counts.unchanged

    def text(self) -> str:
        lines = [f"{self.kind}: {self.read} read, {self.loaded} loaded, {self.updated} updated, "
                 f"{self.unchanged} skipped (unchanged), {self.quarantined} quarantined "
                 f"[run {self.run_id}]"]
        for reason, count in self.reasons.most_common(8):
            lines.append(f"  quarantined {count:>7} x {reason}")
        return "\n".join(lines)


@dataclass
class Rejection:
    source_file: str
    source_row: int          # 1-based data row; 0 = the whole file
    reason: str
    obsid: Optional[int] = None

    @property
    def reason_class(self) -> str:
        """The reason without row-specific detail, for the summary."""
        return re.split(r"[:(]", self.reason, maxsplit=1)[0].strip()


def start_run(engine, kind, source=None, spectra_root=None, options=None) -> str:
    """Record a run as 'running' (committed at once, so a crash leaves a trace)."""
    run_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(insert(schema.ingest_runs).values(
            run_id=run_id, kind=kind, source=source, spectra_root=spectra_root,
            status="running", started_at=utcnow(), code_version=code_version(),
            options=_jsonable(options or {})))
    return run_id


def finish_run(engine, summary: IngestSummary, status="finished", message=None):
    with engine.begin() as connection:
        connection.execute(update(schema.ingest_runs)
                           .where(schema.ingest_runs.c.run_id == summary.run_id)
                           .values(status=status, finished_at=utcnow(), n_read=summary.read,
                                   n_loaded=summary.loaded, n_updated=summary.updated,
                                   n_unchanged=summary.unchanged,
                                   n_quarantined=summary.quarantined, message=message))


def _jsonable(options):
    return {key: (value if isinstance(value, (str, int, float, bool, type(None), list, dict))
                  else str(value)) for key, value in options.items()}


def store_rejections(connection, kind, run_id, rejections: List[Rejection]):
    """Insert rejections; one already recorded by an earlier run is not stored again."""
    if not rejections:
        return
    now = utcnow()
    unique = {}
    for rejection in rejections:
        key = (rejection.source_file, rejection.source_row, rejection.reason)
        unique.setdefault(key, {
            "kind": kind, "source_file": rejection.source_file,
            "source_row": rejection.source_row, "obsid": rejection.obsid,
            "reason": rejection.reason, "run_id": run_id, "created_at": now})
    db.insert_ignore(connection, schema.quarantine, list(unique.values()),
                     ["kind", "source_file", "source_row", "reason"])


# ---------------------------------------------------------------------------------------
# Reading catalogues
def is_fits_file(path) -> bool:
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rb") as handle:
        return handle.read(9) == b"SIMPLE  ="


def _is_gzip(path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _canonical_name(name: str) -> str:
    name = name.strip().lower()
    if name.startswith("combined_"):
        name = name[len("combined_"):]
    return name


@dataclass
class CatalogueChunk:
    first_row: int                    # 1-based data row number of the chunk's first row
    columns: Dict[str, list]          # canonical name -> raw values (str or numbers)
    size: int


def iter_catalogue_chunks(path, chunk_rows=50000, wanted=None) -> Iterable[CatalogueChunk]:
    """Yield the catalogue in chunks of raw column values, keyed by canonical name.

    Only the ``wanted`` canonical names are kept (all when None). CSV values stay
    strings (converted and validated later, per column); FITS values are numpy values.
    """
    if is_fits_file(path):
        yield from _iter_fits_chunks(path, chunk_rows, wanted)
    else:
        yield from _iter_csv_chunks(path, chunk_rows, wanted)


def _pick_columns(names, wanted):
    """Map canonical wanted name -> index of the first matching input column."""
    canonical = [_canonical_name(n) for n in names]
    picked = {}
    for index, name in enumerate(canonical):
        if (wanted is None or name in wanted) and name not in picked:
            picked[name] = index
    return picked


def _iter_csv_chunks(path, chunk_rows, wanted):
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        picked = _pick_columns(header, wanted)
        width = len(header)
        first_row = 1
        while True:
            rows = list(itertools.islice(reader, chunk_rows))
            if not rows:
                return
            if min(map(len, rows)) < width:     # short rows: missing trailing fields are blank
                rows = [row + [""] * (width - len(row)) for row in rows]
            columns = {name: [row[index] for row in rows] for name, index in picked.items()}
            yield CatalogueChunk(first_row, columns, len(rows))
            first_row += len(rows)


def _iter_fits_chunks(path, chunk_rows, wanted):
    from astropy.io import fits

    with fits.open(path, memmap=not _is_gzip(path)) as hdus:
        table_hdu = next((h for h in hdus if isinstance(h, fits.BinTableHDU)), None)
        if table_hdu is None:
            raise ValueError(f"{path}: no binary table")
        data = table_hdu.data
        picked = _pick_columns(data.columns.names, wanted)
        names = data.columns.names
        total = len(data)
        for start in range(0, total, chunk_rows):
            stop = min(start + chunk_rows, total)
            columns = {}
            for name, index in picked.items():
                values = np.asarray(data.field(names[index])[start:stop])
                if values.dtype.kind in "SU":
                    values = np.char.strip(values.astype(str))
                columns[name] = values
            yield CatalogueChunk(start + 1, columns, stop - start)


# ---------------------------------------------------------------------------------------
# Converting raw column values (vectorised; element-wise only to locate bad values)
def parse_numbers(values, integer=False):
    """(python list with None for blanks/missing sentinels, list of bad-value indices).

    ``values`` are strings or numbers. Blank strings, NaN and -9999 are missing (None);
    anything non-numeric (or non-integral for ``integer``) is a bad value.
    """
    array = values if isinstance(values, np.ndarray) else None
    if array is None and values and not isinstance(values[0], str):
        array = np.asarray(values)
    if array is not None and array.dtype.kind in "fiub":
        numbers = array.astype(float)
        bad_mask = np.zeros(len(numbers), dtype=bool)
    else:
        try:
            # float() per value is faster than numpy's string casts; blanks are missing.
            numbers = np.array([float(v) if v.strip() else math.nan for v in values],
                               dtype=float)
            bad_mask = np.zeros(len(numbers), dtype=bool)
        except (ValueError, AttributeError):
            numbers, bad_mask = _parse_numbers_slowly(
                np.char.strip(np.asarray(values).astype(str)))
    missing = ~np.isfinite(numbers) | (numbers == -9999.0)
    if integer:
        integral = np.zeros(len(numbers), dtype=bool)
        finite = ~missing
        integral[finite] = numbers[finite] == np.round(numbers[finite])
        bad_mask |= finite & ~integral
        missing |= bad_mask
        out = np.where(missing, 0, numbers).astype(np.int64).tolist()
    else:
        missing |= bad_mask
        out = numbers.tolist()
    if missing.any():
        for index in np.flatnonzero(missing).tolist():
            out[index] = None
    bad = np.flatnonzero(bad_mask).tolist()
    return out, bad


def _parse_numbers_slowly(strings):
    numbers = np.empty(len(strings), dtype=float)
    bad = np.zeros(len(strings), dtype=bool)
    for index, text in enumerate(strings.tolist()):
        if text == "":
            numbers[index] = np.nan
            continue
        try:
            numbers[index] = float(text)
        except ValueError:
            numbers[index] = np.nan
            bad[index] = True
    return numbers, bad


def parse_texts(values):
    out = []
    for value in (values.tolist() if isinstance(values, np.ndarray) else values):
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        value = str(value).strip() if value is not None else ""
        out.append(value or None)
    return out


@dataclass
class CatalogueRecord:
    row: int
    values: dict                       # spectra column name -> value (no file columns yet)
    filename: Optional[str]


@dataclass
class ParsedChunk:
    first_row: int
    columns: Dict[str, list]           # spectra column name (and "filename") -> values
    valid: List[int]                   # indices of rows that passed validation

    def records(self) -> List[CatalogueRecord]:
        names = [n for n in self.columns if n != "filename"]
        return [CatalogueRecord(self.first_row + i, {n: self.columns[n][i] for n in names},
                                self.columns["filename"][i]) for i in self.valid]

    def spectra_rows(self, run_id) -> List[tuple]:
        """Rows in ``spectra`` column order for the valid rows, built column-wise."""
        pick = (lambda values: values) if len(self.valid) == len(self.columns["obsid"]) \
            else (lambda values: [values[i] for i in self.valid])
        count = len(self.valid)
        dec = pick(self.columns["dec"])
        derived = {
            "ra": [value % 360.0 for value in pick(self.columns["ra"])],
            "dec": dec,
            "zone": np.minimum(np.floor((np.asarray(dec, dtype=float) + 90.0)
                                        / schema.ZONE_HEIGHT_DEG).astype(np.int64),
                               db.zone_count() - 1).tolist(),
            "ingest_run_id": [run_id] * count,
        }
        nothing = [None] * count
        columns = [derived[name] if name in derived
                   else pick(self.columns[name]) if name in self.columns else nothing
                   for name in SPECTRA_COLUMNS]
        return list(zip(*columns))


def convert_chunk(chunk: CatalogueChunk, source_file: str):
    """Typed column values, the valid row indices, and rejections for one chunk."""
    aliases = {target: next((a for a in names if a in chunk.columns), None)
               for target, names in CATALOGUE_ALIASES.items()}
    missing_required = [c for c in REQUIRED_COLUMNS if aliases[c] is None]
    if missing_required:
        raise ValueError(f"{source_file}: catalogue lacks required column(s) "
                         f"{', '.join(missing_required)}")
    parsed, problems = {}, {}
    for target, source in aliases.items():
        if source is None:
            parsed[target] = [None] * chunk.size
            continue
        raw = chunk.columns[source]
        if target in INTEGER_COLUMNS or target in FLOAT_COLUMNS:
            values, bad = parse_numbers(raw, integer=target in INTEGER_COLUMNS)
            parsed[target] = values
            for index in bad:
                problems.setdefault(index, f"non-numeric {target}: {str(raw[index])!r}")
        else:
            parsed[target] = parse_texts(raw)
    valid, rejections = [], []
    obsids, ras, decs = parsed["obsid"], parsed["ra"], parsed["dec"]
    for index in range(chunk.size):
        reason = problems.get(index) or _position_problem(obsids[index], ras[index], decs[index])
        if reason:
            rejections.append(Rejection(source_file, chunk.first_row + index, reason,
                                        obsids[index]))
        else:
            valid.append(index)
    return ParsedChunk(chunk.first_row, parsed, valid), rejections


def _position_problem(obsid, ra, dec):
    if obsid is None:
        return "missing obsid"
    if ra is None or dec is None:
        return "missing ra/dec"
    if not (0.0 <= ra <= 360.0) or not (-90.0 <= dec <= 90.0):
        return f"ra/dec out of range: ({ra}, {dec})"
    return None


def spectra_row(values: dict, run_id: str, file_info=None) -> tuple:
    """A tuple in ``spectra`` column order from catalogue/header values."""
    ra = values["ra"] % 360.0
    full = dict(values, ra=ra, zone=db.zone_of(values["dec"]), ingest_run_id=run_id)
    if file_info:
        full.update(file_info)
    return tuple(full.get(name) for name in SPECTRA_COLUMNS)


# ---------------------------------------------------------------------------------------
# Spectrum files
class SpectrumIndex:
    """Spectrum files (``spec-*.fits[.gz]``) under a root, found at any depth, by relative
    path and base name. A catalogue's filename column may name other files: those are
    looked up as paths relative to the root."""

    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.by_name = {}            # base name without .gz, lower-case -> [relative paths]
        self.relative_paths = []
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                # Only LAMOST spectrum names: label tables and catalogues may share the tree.
                if not SPECTRUM_FILE.match(name):
                    continue
                relative = os.path.relpath(os.path.join(folder, name), self.root)
                self.relative_paths.append(relative)
                self.by_name.setdefault(_bare_name(name), []).append(relative)
        self.relative_paths.sort()

    def find(self, filename=None, lmjd=None, planid=None, spid=None, fiberid=None):
        """Relative path of a spectrum, or None."""
        if filename:
            candidate = filename.replace("\\", "/").lstrip("/")
            for option in (candidate, candidate + ".gz", re.sub(r"\.gz$", "", candidate)):
                if os.path.isfile(os.path.join(self.root, option)):
                    return os.path.normpath(option)
            matches = self.by_name.get(_bare_name(os.path.basename(candidate)))
            return matches[0] if matches else None
        if None in (lmjd, planid, spid, fiberid):
            return None
        matches = self.by_name.get(_bare_name(standard_name(lmjd, planid, spid, fiberid)))
        return matches[0] if matches else None


def standard_name(lmjd, planid, spid, fiberid) -> str:
    return f"spec-{int(lmjd)}-{planid}_sp{int(spid):02d}-{int(fiberid):03d}.fits"


def _bare_name(name):
    name = name.lower()
    return name[:-3] if name.endswith(".gz") else name


@dataclass
class FileInfo:
    relative_path: str
    meta: Optional[dict] = None
    columns: Optional[dict] = None   # file_* columns, layout, data_version
    problem: Optional[str] = None


def inspect_file(root, relative_path) -> FileInfo:
    """Read and check one spectrum file: metadata, layout, size and SHA-256."""
    from models.readers import SpectrumReadError, read_spectrum

    path = os.path.join(root, relative_path)
    try:
        spectrum = read_spectrum(path)
        with open(path, "rb") as handle:
            raw = handle.read()
    except SpectrumReadError as error:
        return FileInfo(relative_path, problem=f"unreadable spectrum file: {error.reason}")
    except OSError as error:
        return FileInfo(relative_path, problem=f"unreadable spectrum file: {error}")
    columns = {
        "file_path": relative_path.replace(os.sep, "/"),
        "file_size": len(raw),
        "file_sha256": hashlib.sha256(raw).hexdigest(),
        "layout": spectrum.layout,
        "data_version": spectrum.meta.get("data_version"),
    }
    return FileInfo(relative_path, meta=spectrum.meta, columns=columns)


def inspect_files(root, relative_paths, workers=4):
    """inspect_file over many files; threads overlap the file I/O and hashing."""
    if workers <= 1 or len(relative_paths) < 8:
        return [inspect_file(root, p) for p in relative_paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: inspect_file(root, p), relative_paths))


def header_values(meta: dict) -> dict:
    """spectra column values from a header (read_meta dict)."""
    values = {name: meta.get(name) for name in CATALOGUE_ALIASES if name != "filename"}
    for name in ("snru", "snrg", "snrr", "snri", "snrz"):
        if values[name] is not None and values[name] in MISSING_SENTINELS:
            values[name] = None
    return values


# ---------------------------------------------------------------------------------------
# Spectra ingest
@dataclass
class SpectraIngestOptions:
    catalogue: Optional[str] = None
    spectra_root: Optional[str] = None
    metadata_only: bool = False
    unreferenced: str = "headers"      # "headers": ingest files no row names; "ignore"
    batch_rows: int = 50000
    workers: int = 4
    show_progress: Optional[bool] = None


def ingest_spectra(engine, options: SpectraIngestOptions, log=sys.stderr) -> IngestSummary:
    """Ingest spectra (see the module docstring); returns the summary."""
    if options.catalogue is None and options.spectra_root is None:
        raise ValueError("give a catalogue, a spectra root, or both")
    if options.catalogue is None and options.metadata_only:
        raise ValueError("metadata_only needs a catalogue")
    root = os.path.abspath(options.spectra_root) if options.spectra_root else None
    catalogue = os.path.abspath(options.catalogue) if options.catalogue else None
    run_id = start_run(engine, "ingest-spectra", source=catalogue or root, spectra_root=root,
                       options=vars(options))
    summary = IngestSummary(run_id, "ingest-spectra")
    try:
        index = SpectrumIndex(root) if root and not options.metadata_only else None
        seen_obsids = {}
        referenced = set()
        if catalogue:
            _ingest_catalogue(engine, options, catalogue, index, seen_obsids, referenced,
                              summary)
        if index is not None and (catalogue is None or options.unreferenced == "headers"):
            unreferenced = [p for p in index.relative_paths if p not in referenced]
            _ingest_headers(engine, options, index, unreferenced, seen_obsids, summary)
        with engine.begin() as connection:
            db.analyze(connection, ["spectra"])
    except BaseException as error:
        finish_run(engine, summary, status="failed", message=f"{type(error).__name__}: {error}")
        raise
    finish_run(engine, summary)
    return summary


def _ingest_catalogue(engine, options, catalogue, index, seen_obsids, referenced, summary):
    from concurrent.futures import ThreadPoolExecutor

    from models.progress import progress

    wanted = {name for names in CATALOGUE_ALIASES.values() for name in names}
    chunks = iter_catalogue_chunks(catalogue, options.batch_rows, wanted)
    # On PostgreSQL the server merges batch i (in a writer thread that only waits on the
    # socket) while this thread parses and COPYs batch i + 1 into its own staging table:
    # the Python work and the database work overlap, and batches still commit in order.
    # SQLite has one writer, so it stages and merges in turn.
    overlap = db.is_postgres(engine)
    with ThreadPoolExecutor(1) as writer:
        pending = None
        try:
            for chunk in progress(chunks, desc=f"catalogue {os.path.basename(catalogue)}",
                                  enabled=options.show_progress):
                summary.read += chunk.size
                parsed, rejections = convert_chunk(chunk, catalogue)
                _drop_duplicates(parsed, catalogue, seen_obsids, rejections)
                if index is not None:
                    rows = _join_files(parsed.records(), index, catalogue, referenced,
                                       rejections, summary.run_id, options.workers)
                else:
                    rows = parsed.spectra_rows(summary.run_id)
                batch = _stage_batch(engine, rows, rejections)
                if pending is not None:
                    try:
                        pending.result()
                    except BaseException:
                        batch.connection.close()      # rolls the staged batch back
                        raise
                    pending = None
                if overlap:
                    pending = writer.submit(_write_batch, batch, summary)
                else:
                    _write_batch(batch, summary)
        finally:
            if pending is not None:
                pending.result()


def _drop_duplicates(parsed: ParsedChunk, source_file, seen_obsids, rejections):
    """Keep the first row of each obsid (across the whole input); quarantine the rest."""
    obsids = parsed.columns["obsid"]
    kept = []
    for index in parsed.valid:
        obsid = obsids[index]
        first = seen_obsids.get(obsid)
        if first is not None:
            rejections.append(Rejection(source_file, parsed.first_row + index,
                                        f"duplicate obsid: {obsid} (first at {first})", obsid))
            continue
        seen_obsids[obsid] = f"row {parsed.first_row + index}"
        kept.append(index)
    parsed.valid = kept


def _join_files(records, index, catalogue, referenced, rejections, run_id, workers):
    located = []
    for record in records:
        values = record.values
        relative = index.find(record.filename, values["lmjd"], values["planid"],
                              values["spid"], values["fiberid"])
        if relative is None:
            wanted = record.filename or (standard_name(values["lmjd"], values["planid"],
                                                       values["spid"], values["fiberid"])
                                         if None not in (values["lmjd"], values["planid"],
                                                         values["spid"], values["fiberid"])
                                         else "no filename and no lmjd/planid/spid/fiberid")
            rejections.append(Rejection(catalogue, record.row,
                                        f"spectrum file not found: {wanted}", values["obsid"]))
            continue
        referenced.add(relative)
        located.append((record, relative))
    infos = inspect_files(index.root, [relative for _, relative in located], workers)
    rows = []
    for (record, relative), info in zip(located, infos):
        obsid = record.values["obsid"]
        if info.problem:
            rejections.append(Rejection(catalogue, record.row, f"{info.problem} ({relative})",
                                        obsid))
            continue
        header_obsid = info.meta.get("obsid")
        if header_obsid is not None and header_obsid != obsid:
            rejections.append(Rejection(
                catalogue, record.row,
                f"obsid mismatch: catalogue {obsid}, header OBSID {header_obsid} ({relative})",
                obsid))
            continue
        rows.append(spectra_row(record.values, run_id, info.columns))
    return rows


def _ingest_headers(engine, options, index, relative_paths, seen_obsids, summary):
    from models.progress import progress

    batches = [relative_paths[i:i + options.batch_rows]
               for i in range(0, len(relative_paths), options.batch_rows)]
    for batch in progress(batches, desc=f"spectrum headers under {index.root}",
                          enabled=options.show_progress):
        summary.read += len(batch)
        rows, rejections = [], []
        infos = inspect_files(index.root, batch, options.workers)
        stored = _stored_by_path(engine, [i.columns["file_path"] for i in infos
                                          if not i.problem and i.meta.get("obsid") is None])
        for info in infos:
            path = os.path.join(index.root, info.relative_path)
            if info.problem:
                rejections.append(Rejection(path, 0, info.problem))
                continue
            values = header_values(info.meta)
            if values["obsid"] is None and info.columns["file_path"] in stored:
                # A DR1 file ingested earlier through its catalogue row: the catalogue
                # values stay; only the file columns are refreshed.
                obsid, ra, dec = stored[info.columns["file_path"]]
                values = dict.fromkeys(values, None)
                values.update(obsid=obsid, ra=ra, dec=dec)
            obsid = values["obsid"]
            problem = (NO_OBSID_REASON if obsid is None
                       else _position_problem(obsid, values["ra"], values["dec"]))
            if problem is None and obsid in seen_obsids:
                problem = f"duplicate obsid: {obsid} (first at {seen_obsids[obsid]})"
            if problem:
                rejections.append(Rejection(path, 0, problem, obsid))
                continue
            seen_obsids[obsid] = info.relative_path
            rows.append(spectra_row(values, summary.run_id, info.columns))
        _write_batch(_stage_batch(engine, rows, rejections), summary)


def _stored_by_path(engine, file_paths):
    """file_path -> (obsid, ra, dec) of stored spectra with those paths."""
    found = {}
    table = schema.spectra
    with engine.connect() as connection:
        for start in range(0, len(file_paths), 500):
            chunk = file_paths[start:start + 500]
            for path, obsid, ra, dec in connection.execute(
                    select(table.c.file_path, table.c.obsid, table.c.ra, table.c.dec)
                    .where(table.c.file_path.in_(chunk))):
                found[path] = (obsid, ra, dec)
    return found


@dataclass
class StagedBatch:
    """A batch COPYed into a staging table, in an open transaction, not yet merged."""
    connection: object
    staging: str
    size: int
    rejections: List[Rejection]


def _stage_batch(engine, rows, rejections) -> StagedBatch:
    connection = engine.connect()
    try:
        connection.begin()
        staging = db.stage_rows(connection, schema.spectra, rows, SPECTRA_COLUMNS)
    except BaseException:
        connection.close()
        raise
    return StagedBatch(connection, staging, len(rows), rejections)


def _write_batch(batch: StagedBatch, summary):
    """Merge and commit one staged batch: a crash loses at most the batch in flight."""
    compare = [c for c in SPECTRA_COLUMNS if c != "obsid" and c not in BOOKKEEPING_COLUMNS]
    with batch.connection as connection:
        counts = db.merge_staged(connection, schema.spectra, batch.staging,
                                 SPECTRA_COLUMNS, ["obsid"], compare, compare, batch.size)
        store_rejections(connection, "spectra", summary.run_id, batch.rejections)
        connection.commit()
    summary.add(counts)
    summary.quarantined += len(batch.rejections)
    summary.reasons.update(r.reason_class for r in batch.rejections)


# ---------------------------------------------------------------------------------------
# Labels ingest
PAYNE_INDEX = {"teff": 0, "logg": 1, "feh": 19}
FLAT_LABEL_NAMES = {
    "teff": ["teff", "teff_payne"],
    "logg": ["logg", "logg_payne"],
    "feh": ["fe_h", "feh", "[fe/h]", "fe_h_payne"],
}
ID_NAMES = ["apogee_id", "apogeeid", "2mass_id", "tmass_id", "id"]
GOOD_FLAG_NAMES = ["good_flag", "goodflag", "good"]
LABEL_COLUMNS = [c.name for c in schema.reference_labels.columns if c.name != "label_id"]


@dataclass
class LabelsIngestOptions:
    path: str
    columns: Dict[str, str] = field(default_factory=dict)   # teff/logg/feh/apogee_id/... -> name
    label_set: Optional[str] = None
    payne_index: Dict[str, int] = field(default_factory=lambda: dict(PAYNE_INDEX))
    batch_rows: int = 50000


def parse_column_mapping(text: Optional[str]) -> Dict[str, str]:
    """``"teff=TEFF,logg=LOGG,feh=PARAM_M_H"`` -> dict."""
    mapping = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"bad column mapping {part!r}: expected NAME=COLUMN")
        mapping[key.strip().lower()] = value.strip()
    allowed = {"teff", "logg", "feh", "apogee_id", "ra", "dec", "good_flag"}
    unknown = set(mapping) - allowed
    if unknown:
        raise ValueError(f"unknown label(s) in mapping: {', '.join(sorted(unknown))}; "
                         f"use {', '.join(sorted(allowed))}")
    return mapping


def read_label_table(path):
    """The label catalogue as a dict of column name -> numpy array (FITS or CSV)."""
    if is_fits_file(path):
        from astropy.table import Table

        table = Table.read(path, hdu=_first_table_hdu(path))
        return {name: np.asarray(table[name]) for name in table.colnames}
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = next(reader, [])
        rows = [row + [""] * (len(header) - len(row)) for row in reader]
    return {name: np.asarray([row[i] for row in rows], dtype=object)
            for i, name in enumerate(header)}


def _first_table_hdu(path):
    from astropy.io import fits

    with fits.open(path) as hdus:
        for number, hdu in enumerate(hdus):
            if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                return number
    raise ValueError(f"{path}: no table HDU")


def _find_column(columns, explicit, candidates, what, required=True):
    by_lower = {name.lower(): name for name in columns}
    if explicit:
        if explicit.lower() not in by_lower:
            raise ValueError(f"column {explicit!r} (for {what}) not in the file; columns: "
                             f"{', '.join(columns)}")
        return by_lower[explicit.lower()]
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    if required:
        raise ValueError(f"no {what} column found (tried {', '.join(candidates)}); "
                         f"map one with --columns {what}=NAME")
    return None


def label_arrays(columns, options: LabelsIngestOptions):
    """(layout, dict of apogee_id/ra/dec/teff/logg/feh/good_flag raw arrays)."""
    mapping = options.columns
    out = {
        "apogee_id": columns[_find_column(columns, mapping.get("apogee_id"), ID_NAMES,
                                          "apogee_id")],
        "ra": columns[_find_column(columns, mapping.get("ra"), ["ra", "ra_deg"], "ra")],
        "dec": columns[_find_column(columns, mapping.get("dec"), ["dec", "dec_deg", "de"],
                                    "dec")],
    }
    payne_name = _find_column(columns, None, ["payne"], "payne", required=False)
    explicit_labels = any(k in mapping for k in ("teff", "logg", "feh"))
    if payne_name is not None and not explicit_labels:
        layout = "payne-2d"
        payne = np.asarray(columns[payne_name], dtype=float)
        if payne.ndim != 2:
            raise ValueError(f"column {payne_name!r} is not 2-D (shape {payne.shape})")
        for label, position in options.payne_index.items():
            out[label] = payne[:, position]
    else:
        layout = "flat"
        for label in ("teff", "logg", "feh"):
            out[label] = columns[_find_column(columns, mapping.get(label),
                                              FLAT_LABEL_NAMES[label], label)]
    flag_name = _find_column(columns, mapping.get("good_flag"), GOOD_FLAG_NAMES, "good_flag",
                             required=False)
    out["good_flag"] = columns[flag_name] if flag_name else None
    return layout, out


def ingest_labels(engine, options: LabelsIngestOptions, log=sys.stderr) -> IngestSummary:
    path = os.path.abspath(options.path)
    label_set = options.label_set or default_label_set(path)
    run_id = start_run(engine, "ingest-labels", source=path,
                       options=dict(vars(options), label_set=label_set))
    summary = IngestSummary(run_id, "ingest-labels")
    try:
        layout, arrays = label_arrays(read_label_table(path), options)
        rows, rejections = label_rows(arrays, label_set, path, run_id)
        summary.read = len(arrays["ra"])
        compare = [c for c in LABEL_COLUMNS
                   if c not in ("label_set", "apogee_id") and c not in BOOKKEEPING_COLUMNS]
        for start in range(0, max(len(rows), 1), options.batch_rows):
            batch = rows[start:start + options.batch_rows]
            with engine.begin() as connection:
                summary.add(db.bulk_upsert(connection, schema.reference_labels, batch,
                                           ["label_set", "apogee_id"], compare,
                                           columns=LABEL_COLUMNS, keep_when_null=compare))
        with engine.begin() as connection:
            store_rejections(connection, "labels", run_id, rejections)
            db.analyze(connection, ["reference_labels"])
        summary.quarantined = len(rejections)
        summary.reasons.update(r.reason_class for r in rejections)
        print(f"labels layout {layout}, label set {label_set!r}", file=log)
    except BaseException as error:
        finish_run(engine, summary, status="failed", message=f"{type(error).__name__}: {error}")
        raise
    finish_run(engine, summary)
    return summary


def default_label_set(path) -> str:
    name = os.path.basename(path)
    for suffix in (".gz", ".fits", ".fit", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def label_rows(arrays, label_set, source_file, run_id):
    """Rows in LABEL_COLUMNS order and rejections, from label_arrays output."""
    ids = parse_texts(arrays["apogee_id"])
    ra, bad_ra = parse_numbers(arrays["ra"])
    dec, bad_dec = parse_numbers(arrays["dec"])
    labels = {name: parse_numbers(arrays[name]) for name in ("teff", "logg", "feh")}
    problems = {}
    for index in bad_ra:
        problems.setdefault(index, f"non-numeric ra: {arrays['ra'][index]!r}")
    for index in bad_dec:
        problems.setdefault(index, f"non-numeric dec: {arrays['dec'][index]!r}")
    for name, (_, bad) in labels.items():
        for index in bad:
            problems.setdefault(index, f"non-numeric {name}: {arrays[name][index]!r}")
    if arrays["good_flag"] is not None:
        flags, bad_flags = parse_numbers(arrays["good_flag"], integer=True)
        for index in bad_flags:
            problems.setdefault(index, f"non-integer good_flag: {arrays['good_flag'][index]!r}")
    else:
        flags = None
    rows, rejections, seen = [], [], {}
    for index, apogee_id in enumerate(ids):
        source_row = index + 1
        reason = problems.get(index)
        if reason is None and apogee_id is None:
            reason = "missing apogee_id"
        if reason is None:
            reason = _position_problem(0, ra[index], dec[index])
        if reason is None and apogee_id in seen:
            reason = f"duplicate apogee_id: {apogee_id} (first at row {seen[apogee_id]})"
        if reason:
            rejections.append(Rejection(source_file, source_row, reason))
            continue
        seen[apogee_id] = source_row
        teff, logg, feh = (labels[name][0][index] for name in ("teff", "logg", "feh"))
        if flags is not None:
            good = flags[index]
        else:
            good = int(None not in (teff, logg, feh))
        values = {
            "label_set": label_set, "apogee_id": apogee_id, "ra": ra[index] % 360.0,
            "dec": dec[index], "zone": db.zone_of(dec[index]), "teff": teff, "logg": logg,
            "feh": feh, "good_flag": good, "source_file": source_file,
            "source_row": source_row, "ingest_run_id": run_id,
        }
        rows.append(tuple(values[name] for name in LABEL_COLUMNS))
    return rows, rejections
