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

One bad value costs one row, never a batch. Rejections go to the ``quarantine`` table
with a reason naming the column and the value (the row is the quarantine row's
``source_row``, the file its ``source_file``); the rest is loaded:

* a value the schema's column does not accept (:mod:`etl.validation`): non-numeric or
  non-integral numbers, numbers outside the column type's range (an obsid beyond 64 bits,
  an lmjd beyond 32 bits) or its physical range (RA, Dec, spid 1-16, fiberid 1-250,
  obsid > 0), text longer than the column, text that is not valid UTF-8 (never stored
  with replacement characters, so it never overwrites a good stored value), a NUL
  character, a missing obsid/RA/Dec;
* a CSV row the csv module cannot read (a field over its size limit);
* a duplicate obsid (the first row wins, later ones are quarantined);
* a missing or unreadable (for example truncated) file, a file path that leaves the
  spectra root (``..``, absolute, or a symlink pointing outside: never opened, see
  :mod:`etl.spectrum_files`), a header OBSID that contradicts the catalogue.

Should the database still refuse a batch (a constraint the checks do not know), the
batch is written again in halves until only the refused rows are left; those are
quarantined with the database's message, and a one-line note is printed (no traceback).
A database that cannot be reached fails the run (it can be resumed).

Idempotent and resumable: rows are upserted in batches, each batch in its own
transaction; a stored row is only rewritten when a value differs, and a NULL in new input
never erases a stored value. Re-running after a crash re-does only what is missing.

Labels (``ingest_labels``)
    APOGEE Payne as repackaged (2-D ``payne`` column: Teff at index 0, logg 1, [Fe/H] 19;
    -9999 = missing; ``good_flag``) or flat columns (TEFF/LOGG/FE_H, Teff/Logg/FeH, ...;
    any mapping with ``columns={"teff": ..., "logg": ..., "feh": ...}``). Without a good
    flag column, ``good_flag`` is 1 exactly when Teff, logg and [Fe/H] are all present.
    Rows are checked and quarantined as for spectra.

Reading the input files is :mod:`etl.catalogue`, checking values :mod:`etl.validation`,
finding and reading spectrum files :mod:`etl.spectrum_files`; their public names are
importable from here too.
"""
import os
import re
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional, Tuple

import numpy as np
from sqlalchemy import insert, select, update

from etl import db, schema
from etl.catalogue import CatalogueChunk, iter_catalogue_chunks, read_table
from etl.spectrum_files import (FileInfo, SpectrumIndex, UnsafePathError, inspect_files,
                                standard_name)
from etl.validation import convert_column
from models.artifact import code_version

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
SPECTRA_BY_NAME = {c.name: c for c in schema.spectra.columns}
# The catalogue's filename is checked as the file path it becomes.
CATALOGUE_COLUMNS = {target: SPECTRA_BY_NAME["file_path" if target == "filename" else target]
                     for target in CATALOGUE_ALIASES}
REQUIRED_COLUMNS = tuple(t for t, c in CATALOGUE_COLUMNS.items() if not c.nullable)
# Columns not compared when deciding whether a stored row changed.
BOOKKEEPING_COLUMNS = ("ingest_run_id",)
SPECTRA_COLUMNS = [c.name for c in schema.spectra.columns]
SPECTRA_COMPARE = [c for c in SPECTRA_COLUMNS if c != "obsid" and c not in BOOKKEEPING_COLUMNS]
# What an estimate is computed from (etl.inference reads these of a spectrum): when one of
# them changes at ingest, the spectrum's estimates and failures no longer follow from what
# is stored and are deleted, so that the spectrum is stale again for every model version.
ESTIMATE_INPUT_COLUMNS = ("file_path", "file_sha256", "z", "snrg", "class", "subclass")


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

    def add_rejections(self, rejections):
        self.quarantined += len(rejections)
        self.reasons.update(r.reason_class for r in rejections)

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


# Where a row came from: (source_file, source_row, obsid), to quarantine it if refused.
Origin = Tuple[str, int, Optional[int]]


def start_run(engine, kind, source=None, spectra_root=None, options=None) -> str:
    """Record a run as 'running' (committed at once, so a crash leaves a trace)."""
    run_id = str(uuid.uuid4())
    with engine.begin() as connection:
        connection.execute(insert(schema.ingest_runs).values(
            run_id=run_id, kind=kind, source=_storable(source),
            spectra_root=_storable(spectra_root), status="running", started_at=utcnow(),
            code_version=code_version(), options=_jsonable(options or {})))
    return run_id


def finish_run(engine, summary: IngestSummary, status="finished", message=None):
    with engine.begin() as connection:
        connection.execute(update(schema.ingest_runs)
                           .where(schema.ingest_runs.c.run_id == summary.run_id)
                           .values(status=status, finished_at=utcnow(), n_read=summary.read,
                                   n_loaded=summary.loaded, n_updated=summary.updated,
                                   n_unchanged=summary.unchanged,
                                   n_quarantined=summary.quarantined,
                                   message=_storable(message)))


def _jsonable(options):
    out = {}
    for key, value in options.items():
        if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = str(value)
        out[key] = _storable(value) if isinstance(value, str) else value
    return out


def _storable(text):
    """``text`` as the database can store it: a file name that is not valid UTF-8 (its
    bytes kept as surrogate escapes by the OS layer) shows those bytes as \\xNN."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def store_rejections(connection, kind, run_id, rejections: List[Rejection]):
    """Insert rejections; one already recorded by an earlier run is not stored again."""
    if not rejections:
        return
    now = utcnow()
    unique = {}
    for rejection in rejections:
        key = (_storable(rejection.source_file), rejection.source_row,
               _storable(rejection.reason))
        unique.setdefault(key, {
            "kind": kind, "source_file": key[0], "source_row": rejection.source_row,
            "obsid": rejection.obsid, "reason": key[2], "run_id": run_id, "created_at": now})
    db.insert_ignore(connection, schema.quarantine, list(unique.values()),
                     ["kind", "source_file", "source_row", "reason"])


# ---------------------------------------------------------------------------------------
# Checked values: catalogue chunks, header values, file columns
def convert_row(table_columns: Dict[str, object], values: dict):
    """(values converted and checked against their columns, None) or (None, reason);
    for values that come one row at a time (headers, files)."""
    out = dict(values)
    for name, value in values.items():
        column = table_columns.get(name)
        if column is None:
            continue
        converted, problems = convert_column(column, [value], name)
        if problems:
            return None, problems[0]
        out[name] = converted[0]
    return out, None


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

    def origins(self, source_file) -> List[Origin]:
        obsids = self.columns["obsid"]
        return [(source_file, self.first_row + i, obsids[i]) for i in self.valid]


def convert_chunk(chunk: CatalogueChunk, source_file: str):
    """Typed column values, the valid row indices, and rejections for one chunk."""
    aliases = {target: next((a for a in names if a in chunk.columns), None)
               for target, names in CATALOGUE_ALIASES.items()}
    missing_required = [c for c in REQUIRED_COLUMNS if aliases[c] is None]
    if missing_required:
        raise ValueError(f"{source_file}: catalogue lacks required column(s) "
                         f"{', '.join(missing_required)}")
    parsed, problems = {}, dict(chunk.problems)
    for target, source in aliases.items():
        if source is None:
            parsed[target] = [None] * chunk.size
            continue
        parsed[target], bad = convert_column(CATALOGUE_COLUMNS[target], chunk.columns[source],
                                             target)
        for index, reason in bad.items():
            problems.setdefault(index, reason)
    obsids = parsed["obsid"]
    rejections = [Rejection(source_file, chunk.first_row + index, reason, obsids[index])
                  for index, reason in sorted(problems.items())]
    valid = [index for index in range(chunk.size) if index not in problems] \
        if problems else list(range(chunk.size))
    return ParsedChunk(chunk.first_row, parsed, valid), rejections


def spectra_row(values: dict, run_id: str, file_info=None) -> tuple:
    """A tuple in ``spectra`` column order from checked catalogue/header values."""
    ra = values["ra"] % 360.0
    full = dict(values, ra=ra, zone=db.zone_of(values["dec"]), ingest_run_id=run_id)
    if file_info:
        full.update(file_info)
    return tuple(full.get(name) for name in SPECTRA_COLUMNS)


def header_values(meta: dict) -> dict:
    """spectra column values from a header (read_meta dict), not yet checked (checking
    also turns the -9999 of a missing S/N into None)."""
    return {name: meta.get(name) for name in CATALOGUE_ALIASES if name != "filename"}


def _check_file_columns(infos: List[FileInfo]):
    """Turn file columns the schema does not accept (a header's data version too long, a
    file name that is not UTF-8) into the file's problem."""
    for info in infos:
        if info.problem is None:
            checked, problem = convert_row(SPECTRA_BY_NAME, info.columns)
            if problem:
                info.problem = f"file refused: {problem}"
            else:
                info.columns = checked
    return infos


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


def ingest_spectra(engine, options: SpectraIngestOptions, log=None) -> IngestSummary:
    """Ingest spectra (see the module docstring); returns the summary. Notes go to
    ``log`` (default: standard error)."""
    log = log or sys.stderr
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
                              summary, log)
        if index is not None and (catalogue is None or options.unreferenced == "headers"):
            unreferenced = [p for p in index.relative_paths if p not in referenced]
            _ingest_headers(engine, options, index, unreferenced, seen_obsids, summary, log)
        with engine.begin() as connection:
            db.analyze(connection, ["spectra"])
    except BaseException as error:
        finish_run(engine, summary, status="failed", message=f"{type(error).__name__}: {error}")
        raise
    finish_run(engine, summary)
    return summary


def _ingest_catalogue(engine, options, catalogue, index, seen_obsids, referenced, summary,
                      log):
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
                    rows, origins = _join_files(parsed.records(), index, catalogue,
                                                referenced, rejections, summary.run_id,
                                                options.workers)
                else:
                    rows, origins = parsed.spectra_rows(summary.run_id), \
                        parsed.origins(catalogue)
                what = (f"{catalogue} rows {chunk.first_row}-"
                        f"{chunk.first_row + chunk.size - 1}")
                batch = _stage_batch(engine, rows, rejections, origins, what, log)
                if pending is not None:
                    try:
                        pending.result()
                    except BaseException:
                        batch.close()              # rolls the staged batch back
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
        try:
            relative = index.find(record.filename, values["lmjd"], values["planid"],
                                  values["spid"], values["fiberid"])
        except UnsafePathError as error:
            rejections.append(Rejection(catalogue, record.row, str(error), values["obsid"]))
            continue
        if relative is None:
            wanted = repr(record.filename) if record.filename else (
                standard_name(values["lmjd"], values["planid"], values["spid"],
                              values["fiberid"])
                if None not in (values["lmjd"], values["planid"], values["spid"],
                                values["fiberid"])
                else "no filename and no lmjd/planid/spid/fiberid")
            rejections.append(Rejection(catalogue, record.row,
                                        f"spectrum file not found: {wanted}", values["obsid"]))
            continue
        referenced.add(relative)
        located.append((record, relative))
    infos = _check_file_columns(inspect_files(index.root, [r for _, r in located], workers))
    rows, origins = [], []
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
                f"obsid mismatch: catalogue {obsid}, header OBSID {header_obsid!r} ({relative})",
                obsid))
            continue
        rows.append(spectra_row(record.values, run_id, info.columns))
        origins.append((catalogue, record.row, obsid))
    return rows, origins


def _ingest_headers(engine, options, index, relative_paths, seen_obsids, summary, log):
    from models.progress import progress

    batches = [relative_paths[i:i + options.batch_rows]
               for i in range(0, len(relative_paths), options.batch_rows)]
    for batch in progress(batches, desc=f"spectrum headers under {index.root}",
                          enabled=options.show_progress):
        summary.read += len(batch)
        rows, origins, rejections = [], [], []
        infos = _check_file_columns(inspect_files(index.root, batch, options.workers))
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
            problem = NO_OBSID_REASON if values["obsid"] is None else None
            if problem is None:
                values, problem = convert_row(SPECTRA_BY_NAME, values)
            obsid = values["obsid"] if values else None
            if problem is None and obsid in seen_obsids:
                problem = f"duplicate obsid: {obsid} (first at {seen_obsids[obsid]})"
            if problem:
                rejections.append(Rejection(path, 0, problem, obsid))
                continue
            seen_obsids[obsid] = info.relative_path
            rows.append(spectra_row(values, summary.run_id, info.columns))
            origins.append((path, 0, obsid, info.columns))
        rows, origins = _keep_stored_files(engine, rows, origins, rejections)
        what = f"spectrum headers under {index.root} ({len(batch)} files)"
        _write_batch(_stage_batch(engine, rows, rejections, origins, what, log), summary)


def _keep_stored_files(engine, rows, origins, rejections):
    """The rows (and origins) that do not re-point a stored spectrum to another file; the
    others become rejections. A stored obsid may take a new file only at its own path
    (a file replaced in place) or with the same content (an archive moved); a different
    file claiming it (another release, or a header that lies) would silently replace what
    is stored. ``origins`` carry each file's columns; they are returned without them."""
    table = schema.spectra
    stored = {}
    obsids = [origin[2] for origin in origins]
    with engine.connect() as connection:
        for start in range(0, len(obsids), 500):
            for obsid, path, sha in connection.execute(
                    select(table.c.obsid, table.c.file_path, table.c.file_sha256)
                    .where(table.c.obsid.in_(obsids[start:start + 500]),
                           table.c.file_sha256.is_not(None))):
                stored[obsid] = (path, sha)
    kept_rows, kept_origins = [], []
    for row, (path, source_row, obsid, columns) in zip(rows, origins):
        old_path, old_sha = stored.get(obsid, (columns["file_path"], None))
        if old_sha is not None and old_sha != columns["file_sha256"] and old_path != columns["file_path"]:
            rejections.append(Rejection(path, source_row, f"obsid already stored from another file: "
                                                          f"{obsid} is {old_path}", obsid))
            continue
        kept_rows.append(row)
        kept_origins.append((path, source_row, obsid))
    return kept_rows, kept_origins


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


# ---------------------------------------------------------------------------------------
# Writing batches: one transaction each; a batch the database refuses is split
@dataclass
class StagedBatch:
    """A batch COPYed into a staging table, in an open transaction, not yet merged
    (``connection`` is None when the database refused the rows while staging)."""
    engine: object
    connection: object
    staging: Optional[str]
    rows: List[tuple]
    origins: List[Origin]
    rejections: List[Rejection]
    what: str                          # names the batch in messages
    log: object
    error: Optional[BaseException] = None

    def close(self):
        if self.connection is not None:
            self.connection.close()


def _stage_batch(engine, rows, rejections, origins, what, log) -> StagedBatch:
    connection = engine.connect()
    try:
        connection.begin()
        staging = db.stage_rows(connection, schema.spectra, rows, SPECTRA_COLUMNS)
    except db.REFUSED_DATA_ERRORS as error:
        connection.close()
        return StagedBatch(engine, None, None, rows, origins, rejections, what, log, error)
    except BaseException:
        connection.close()
        raise
    return StagedBatch(engine, connection, staging, rows, origins, rejections, what, log)


def _write_batch(batch: StagedBatch, summary):
    """Merge and commit one staged batch: a crash loses at most the batch in flight."""
    if batch.error is None:
        try:
            with batch.connection as connection:
                counts = _merge_spectra(connection, batch.staging, len(batch.rows))
                store_rejections(connection, "spectra", summary.run_id, batch.rejections)
                connection.commit()
            summary.add(counts)
            summary.add_rejections(batch.rejections)
            return
        except db.REFUSED_DATA_ERRORS as error:
            batch.error = error
    counts, refused = write_isolating(batch.engine, batch.rows, batch.origins, _upsert_spectra,
                                      batch.what, batch.error, batch.log)
    with batch.engine.begin() as connection:
        store_rejections(connection, "spectra", summary.run_id, batch.rejections + refused)
    summary.add(counts)
    summary.add_rejections(batch.rejections + refused)


def _upsert_spectra(connection, rows):
    staging = db.stage_rows(connection, schema.spectra, rows, SPECTRA_COLUMNS)
    return _merge_spectra(connection, staging, len(rows))


def _merge_spectra(connection, staging, total):
    """Merge the staged spectra rows (a NULL keeps the stored value), first deleting the
    estimates and failures of the stored spectra whose estimate inputs change."""
    distinct = db.null_safe_differs(connection)
    changed = " OR ".join(f's."{c}" IS NOT NULL AND s."{c}" {distinct} t."{c}"'
                          for c in ESTIMATE_INPUT_COLUMNS)
    for table in (schema.estimates, schema.estimate_failures):
        connection.exec_driver_sql(
            f"DELETE FROM {table.name} WHERE obsid IN (SELECT s.obsid FROM {staging} s "
            f"JOIN spectra t ON t.obsid = s.obsid WHERE {changed})")
    return db.merge_staged(connection, schema.spectra, staging, SPECTRA_COLUMNS, ["obsid"],
                           SPECTRA_COMPARE, SPECTRA_COMPARE, total)


def write_isolating(engine, rows, origins: List[Origin], write, what, error, log):
    """Write ``rows`` that the database refused as one batch (``error``): each half in
    its own transaction, halving again what is refused, so that only the refused rows
    are left out. Returns (counts of what was written, rejections of the refused rows)."""
    print(f"{what}: the database refused the batch ({db.error_message(error)}); "
          f"writing it in parts to find the refused rows", file=log)
    counts, refused = db.UpsertCounts(), []
    pending = [(0, len(rows))]
    while pending:
        start, stop = pending.pop()
        try:
            with engine.begin() as connection:
                counts += write(connection, rows[start:stop])
        except db.REFUSED_DATA_ERRORS as part_error:
            if stop - start > 1:
                middle = (start + stop) // 2
                pending += [(middle, stop), (start, middle)]     # in order, first half first
                continue
            source_file, source_row, obsid = origins[start]
            refused.append(Rejection(source_file, source_row, "refused by the database: "
                                     f"{db.error_message(part_error)}", obsid))
    print(f"{what}: {len(refused)} row(s) refused by the database, quarantined", file=log)
    return counts, refused


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
LABELS_BY_NAME = {c.name: c for c in schema.reference_labels.columns}
LABEL_COMPARE = [c for c in LABEL_COLUMNS
                 if c not in ("label_set", "apogee_id") and c not in BOOKKEEPING_COLUMNS]


@dataclass
class LabelsIngestOptions:
    path: str
    columns: Dict[str, str] = field(default_factory=dict)   # teff/logg/feh/apogee_id/... -> name
    label_set: Optional[str] = None
    payne_index: Dict[str, int] = field(default_factory=lambda: dict(PAYNE_INDEX))
    batch_rows: int = 50000


LABEL_MAPPING_NAMES = ("teff", "logg", "feh", "apogee_id", "ra", "dec", "good_flag")


def parse_column_mapping(text: Optional[str], allowed=LABEL_MAPPING_NAMES,
                         option: str = "--columns") -> Dict[str, str]:
    """``"teff=TEFF,logg=LOGG,feh=PARAM_M_H"`` -> dict; ``allowed``: the names that may be
    mapped, ``option``: the option that errors name."""
    mapping = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"{option}: bad column mapping {part!r}: expected NAME=COLUMN")
        mapping[key.strip().lower()] = value.strip()
    unknown = set(mapping) - set(allowed)
    if unknown:
        raise ValueError(f"{option}: unknown name(s) in mapping: {', '.join(sorted(unknown))}; "
                         f"use {', '.join(sorted(allowed))}")
    return mapping


def find_column(columns, explicit, candidates, what, required=True, option="--columns", source=None):
    """The column of ``columns`` (names) that holds ``what``: the ``explicit`` name mapped
    with ``option`` (any case), else the first of ``candidates`` (lower case) present;
    None when absent and not ``required``. Errors name the file (``source``) and the column."""
    where = f"{source}: " if source else ""
    by_lower = {name.lower(): name for name in columns}
    if explicit:
        if explicit.lower() not in by_lower:
            raise ValueError(f"{where}column {explicit!r} (for {what}) not in the file; columns: "
                             f"{', '.join(columns)}")
        return by_lower[explicit.lower()]
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    if required:
        raise ValueError(f"{where}no {what} column found (tried {', '.join(candidates)}); "
                         f"map one with {option} {what}=NAME")
    return None


def label_arrays(columns, options: LabelsIngestOptions):
    """(layout, dict of apogee_id/ra/dec/teff/logg/feh/good_flag raw arrays)."""
    mapping, source = options.columns, options.path
    out = {
        "apogee_id": columns[find_column(columns, mapping.get("apogee_id"), ID_NAMES,
                                         "apogee_id", source=source)],
        "ra": columns[find_column(columns, mapping.get("ra"), ["ra", "ra_deg"], "ra",
                                  source=source)],
        "dec": columns[find_column(columns, mapping.get("dec"), ["dec", "dec_deg", "de"],
                                   "dec", source=source)],
    }
    payne_name = find_column(columns, None, ["payne"], "payne", required=False)
    explicit_labels = any(k in mapping for k in ("teff", "logg", "feh"))
    if payne_name is not None and not explicit_labels:
        layout = "payne-2d"
        payne = np.asarray(columns[payne_name], dtype=float)
        if payne.ndim != 2:
            raise ValueError(f"{source}: column {payne_name!r} is not 2-D (shape {payne.shape})")
        for label, position in options.payne_index.items():
            if not 0 <= position < payne.shape[1]:
                raise ValueError(f"{source}: column {payne_name!r} has {payne.shape[1]} entries "
                                 f"a row; {label} is expected at index {position} (--payne-index)")
            out[label] = payne[:, position]
    else:
        layout = "flat"
        for label in ("teff", "logg", "feh"):
            out[label] = columns[find_column(columns, mapping.get(label),
                                             FLAT_LABEL_NAMES[label], label, source=source)]
    flag_name = find_column(columns, mapping.get("good_flag"), GOOD_FLAG_NAMES, "good_flag",
                            required=False, source=source)
    out["good_flag"] = columns[flag_name] if flag_name else None
    return layout, out


def ingest_labels(engine, options: LabelsIngestOptions, log=None) -> IngestSummary:
    log = log or sys.stderr
    path = os.path.abspath(options.path)
    label_set = options.label_set or default_label_set(path)
    _check_label_set(label_set)
    run_id = start_run(engine, "ingest-labels", source=path,
                       options=dict(vars(options), label_set=label_set))
    summary = IngestSummary(run_id, "ingest-labels")
    try:
        columns, unreadable = read_table(path)
        layout, arrays = label_arrays(columns, options)
        rows, origins, rejections = label_rows(arrays, label_set, _storable(path), run_id,
                                               unreadable)
        summary.read = len(arrays["ra"])
        for start in range(0, len(rows), options.batch_rows):
            stop = start + options.batch_rows
            counts, refused = _write_labels(engine, rows[start:stop], origins[start:stop],
                                            f"{path} labels {start + 1}-{min(stop, len(rows))}",
                                            log)
            summary.add(counts)
            rejections += refused
        with engine.begin() as connection:
            store_rejections(connection, "labels", run_id, rejections)
            db.analyze(connection, ["reference_labels"])
        summary.add_rejections(rejections)
        print(f"labels layout {layout}, label set {label_set!r}", file=log)
    except BaseException as error:
        finish_run(engine, summary, status="failed", message=f"{type(error).__name__}: {error}")
        raise
    finish_run(engine, summary)
    return summary


def _write_labels(engine, rows, origins, what, log):
    try:
        with engine.begin() as connection:
            return _upsert_labels(connection, rows), []
    except db.REFUSED_DATA_ERRORS as error:
        return write_isolating(engine, rows, origins, _upsert_labels, what, error, log)


def _upsert_labels(connection, rows):
    return db.bulk_upsert(connection, schema.reference_labels, rows, ["label_set", "apogee_id"],
                          LABEL_COMPARE, columns=LABEL_COLUMNS, keep_when_null=LABEL_COMPARE)


def _check_label_set(label_set):
    """A label set name the schema cannot hold fails the whole file, before anything."""
    _, problems = convert_column(LABELS_BY_NAME["label_set"], [label_set], "label_set")
    if problems:
        raise ValueError(f"{problems[0]}; choose a shorter one with --label-set")


def default_label_set(path) -> str:
    name = os.path.basename(path)
    for suffix in (".gz", ".fits", ".fit", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def label_rows(arrays, label_set, source_file, run_id, unreadable=None):
    """Rows in LABEL_COLUMNS order, their origins, and rejections, from label_arrays
    output; ``unreadable``: {row index: reason} of rows the reader could not read."""
    problems = dict(unreadable or {})
    converted = {}
    for name in ("apogee_id", "ra", "dec", "teff", "logg", "feh", "good_flag"):
        if arrays[name] is None:
            continue
        converted[name], bad = convert_column(LABELS_BY_NAME[name], arrays[name], name)
        for index, reason in bad.items():
            problems.setdefault(index, reason)
    ids, ra, dec = converted["apogee_id"], converted["ra"], converted["dec"]
    flags = converted.get("good_flag")
    rows, origins, rejections, seen = [], [], [], {}
    for index, apogee_id in enumerate(ids):
        source_row = index + 1
        reason = problems.get(index)
        if reason is None and apogee_id in seen:
            reason = f"duplicate apogee_id: {apogee_id} (first at row {seen[apogee_id]})"
        if reason:
            rejections.append(Rejection(source_file, source_row, reason))
            continue
        seen[apogee_id] = source_row
        teff, logg, feh = (converted[name][index] for name in ("teff", "logg", "feh"))
        good = flags[index] if flags is not None else int(None not in (teff, logg, feh))
        values = {
            "label_set": label_set, "apogee_id": apogee_id, "ra": ra[index] % 360.0,
            "dec": dec[index], "zone": db.zone_of(dec[index]), "teff": teff, "logg": logg,
            "feh": feh, "good_flag": good, "source_file": source_file,
            "source_row": source_row, "ingest_run_id": run_id,
        }
        rows.append(tuple(values[name] for name in LABEL_COLUMNS))
        origins.append((source_file, source_row, None))
    return rows, origins, rejections
