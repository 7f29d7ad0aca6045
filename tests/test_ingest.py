"""ETL ingest of spectra and reference labels, on SQLite and PostgreSQL (same tests)."""
import argparse
import csv
import gzip
import hashlib
import shutil

import numpy as np
import pytest
from astropy.io import fits
from sqlalchemy import select, text

from etl import schema
from etl.ingest import (NO_OBSID_REASON, LabelsIngestOptions, SpectraIngestOptions,
                        ingest_labels, ingest_spectra)


def run_cli(url, *argv):
    """Run an ``ingest`` command through the CLI parser; returns (exit code)."""
    from etl.commands import db as commands

    parser = argparse.ArgumentParser(prog="lamost-vac")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv) + ["--url", url])
    return args.func(args)


def url_of(engine):
    return engine.url.render_as_string(hide_password=False)


def table_rows(engine, table, order_by):
    with engine.connect() as connection:
        return [tuple(r) for r in connection.execute(select(table).order_by(*order_by))]


def quarantine_rows(engine):
    with engine.connect() as connection:
        return connection.execute(select(
            schema.quarantine.c.source_file, schema.quarantine.c.source_row,
            schema.quarantine.c.obsid, schema.quarantine.c.reason)).all()


@pytest.fixture(scope="session")
def real_dir(shared_dir):
    return shared_dir / "data" / "lamost-real"


# --------------------------------------------------------------------------------------
def test_every_real_file_is_ingested_or_quarantined(catalogue_engine, real_dir):
    dr1_catalogue = real_dir / "dr1-plate-B6212" / "dr1_afgk_catalog_rows.csv"
    code = run_cli(url_of(catalogue_engine), "ingest", "spectra", str(dr1_catalogue),
                   "--spectra-root", str(real_dir))
    assert code == 0
    files = sorted(str(p.relative_to(real_dir)) for p in real_dir.rglob("*.fits*"))
    assert len(files) == 496
    with catalogue_engine.connect() as connection:
        stored = dict(connection.execute(select(schema.spectra.c.file_path,
                                                schema.spectra.c.obsid)).all())
        layouts = dict(connection.execute(select(schema.spectra.c.file_path,
                                                 schema.spectra.c.layout)).all())
    quarantined = {row.source_file: row.reason for row in quarantine_rows(catalogue_engine)
                   if row.source_row == 0}
    for relative in files:
        absolute = str(real_dir / relative)
        assert (relative in stored) != (absolute in quarantined), relative
    assert len(stored) == 451
    assert set(quarantined.values()) == {NO_OBSID_REASON}
    assert all(p.startswith("dr1-plate-B6212/") for p in quarantined.__iter__() for p in
               [p.split("lamost-real/")[1]])
    # DR1 files (no OBSID in the header) got their obsid from the catalogue, by file name.
    with open(dr1_catalogue, newline="") as handle:
        by_name = {row["filename"]: int(row["obsid"]) for row in csv.DictReader(handle)}
    dr1 = {p: o for p, o in stored.items() if p.startswith("dr1-plate-B6212/")}
    assert len(dr1) == 131
    assert all(by_name[p.split("/")[-1]] == obsid for p, obsid in dr1.items())
    assert {layouts[p] for p in dr1} == {"dr1-image"}
    assert {layouts[p] for p in stored if p not in dr1} == {"dr8-image"}
    # Catalogue rows whose file is not on this plate are quarantined, not lost silently.
    missing = [r for r in quarantine_rows(catalogue_engine) if r.source_row > 0]
    assert len(missing) == 3165 - 131
    assert all(r.reason.startswith("spectrum file not found") for r in missing)


def test_headers_only_ingest_of_dr8_repeats(catalogue_engine, real_dir):
    root = real_dir / "dr8-repeats"
    code = run_cli(url_of(catalogue_engine), "ingest", "spectra", "--spectra-root", str(root))
    assert code == 0
    with catalogue_engine.connect() as connection:
        count, with_snr = connection.execute(text(
            "SELECT count(*), count(snrg) FROM spectra")).one()
    assert count == with_snr == 220


def test_simulated_catalogue_with_relative_filenames(catalogue_engine, simulated_set):
    summary = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(simulated_set / "lamost_catalog.csv"), spectra_root=str(simulated_set)))
    with open(simulated_set / "lamost_catalog.csv", newline="") as handle:
        catalogue = {int(r["obsid"]): r for r in csv.DictReader(handle)}
    assert (summary.loaded, summary.quarantined) == (len(catalogue), 0)
    for row in table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]):
        values = dict(zip([c.name for c in schema.spectra.columns], row))
        expected = catalogue[values["obsid"]]
        assert values["file_path"] == expected["filename"]
        assert values["ra"] == pytest.approx(float(expected["ra"]), abs=1e-9)
        assert values["class"] == "STAR"
        raw = (simulated_set / expected["filename"]).read_bytes()
        assert values["file_size"] == len(raw)
        assert values["file_sha256"] == hashlib.sha256(raw).hexdigest()
        assert values["layout"] in ("dr8-image", "dr8-v2-table")
        assert values["data_version"] == "LAMOST DR8"


def test_second_run_changes_nothing(catalogue_engine, simulated_set):
    options = SpectraIngestOptions(catalogue=str(simulated_set / "lamost_catalog.csv"),
                                   spectra_root=str(simulated_set))
    first = ingest_spectra(catalogue_engine, options)
    before = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    second = ingest_spectra(catalogue_engine, options)
    assert first.loaded == len(before) > 0
    assert (second.loaded, second.updated, second.unchanged) == (0, 0, len(before))
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before
    # Header-only ingest of the same files finds the same data: still nothing changes.
    third = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        spectra_root=str(simulated_set)))
    assert (third.loaded, third.updated, third.quarantined) == (0, 0, 0)
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before


@pytest.fixture
def bad_input(simulated_set, tmp_path):
    """A copy of the simulated set plus a catalogue with one of each kind of bad row."""
    root = tmp_path / "root"
    shutil.copytree(simulated_set / "spectra", root / "spectra")
    with open(simulated_set / "lamost_catalog.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    good, victims = rows[:-3], rows[-3:]
    truncated = dict(victims[0])
    path = root / truncated["filename"]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))         # truncated FITS data
    bad_ra = dict(victims[1], ra="12h30m")                          # non-numeric RA
    duplicate = dict(good[0], ra=str(float(good[0]["ra"]) + 1))     # duplicate obsid
    missing = dict(victims[2], obsid="123456789", filename="spectra/nowhere/spec-1-X_sp01-001.fits.gz")
    good_catalogue = tmp_path / "good.csv"
    bad_catalogue = tmp_path / "bad.csv.gz"
    with open(good_catalogue, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(good)
    with gzip.open(bad_catalogue, "wt", newline="") as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(good + [truncated, bad_ra, duplicate, missing])
    return root, good_catalogue, bad_catalogue, len(good)


def test_bad_input_is_quarantined_and_nothing_stored_is_lost(catalogue_engine, bad_input):
    root, good_catalogue, bad_catalogue, n_good = bad_input
    url = url_of(catalogue_engine)
    assert run_cli(url, "ingest", "spectra", str(good_catalogue), "--spectra-root", str(root),
                   "--unreferenced", "ignore") == 0
    before = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    assert len(before) == n_good

    assert run_cli(url, "ingest", "spectra", str(bad_catalogue), "--spectra-root", str(root),
                   "--unreferenced", "ignore") == 0
    assert table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid]) == before
    reasons = sorted((row.source_row, row.reason.split(":")[0].split(" (")[0])
                     for row in quarantine_rows(catalogue_engine))
    assert reasons == [
        (n_good + 1, "unreadable spectrum file"),
        (n_good + 2, "non-numeric ra"),
        (n_good + 3, "duplicate obsid"),
        (n_good + 4, "spectrum file not found"),
    ]
    truncated_reason = [r.reason for r in quarantine_rows(catalogue_engine)
                        if r.source_row == n_good + 1][0]
    assert "truncated" in truncated_reason
    # The truncated file met without a catalogue row (header ingest) is quarantined too.
    assert run_cli(url, "ingest", "spectra", "--spectra-root", str(root)) == 0
    assert any(r.source_row == 0 and "truncated" in r.reason
               for r in quarantine_rows(catalogue_engine))
    after = table_rows(catalogue_engine, schema.spectra, [schema.spectra.c.obsid])
    assert set(before) <= set(after) and len(after) == n_good + 2   # + the two good files


def test_exit_code_is_non_zero_only_when_nothing_loads(catalogue_engine, tmp_path):
    catalogue = tmp_path / "all_bad.csv"
    catalogue.write_text("obsid,ra,dec\n1,abc,10\n2,20,-95\n")
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                   "--metadata-only") == 1
    catalogue.write_text("obsid,ra,dec\n1,abc,10\n2,20,-45\n")
    assert run_cli(url_of(catalogue_engine), "ingest", "spectra", str(catalogue),
                   "--metadata-only") == 0


def test_crashed_ingest_resumes(catalogue_engine, simulated_set, monkeypatch):
    import etl.ingest as ingest

    options = SpectraIngestOptions(catalogue=str(simulated_set / "lamost_catalog.csv"),
                                   spectra_root=str(simulated_set), batch_rows=4)
    real_write = ingest._write_batch
    calls = []

    def crash_on_second_batch(batch, summary):
        calls.append(1)
        if len(calls) == 2:
            batch.connection.close()        # what dying in the middle of it does
            raise RuntimeError("simulated crash")
        return real_write(batch, summary)

    monkeypatch.setattr(ingest, "_write_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError):
        ingest_spectra(catalogue_engine, options)
    monkeypatch.setattr(ingest, "_write_batch", real_write)
    with catalogue_engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM spectra")).scalar() == 4
        assert connection.execute(text("SELECT status FROM ingest_runs")).scalar() == "failed"
    summary = ingest_spectra(catalogue_engine, options)
    assert summary.unchanged == 4 and summary.loaded == summary.read - 4


def test_fits_catalogue_and_metadata_only(catalogue_engine, simulated_set, tmp_path):
    from astropy.table import Table

    table = Table.read(simulated_set / "lamost_catalog.csv", format="ascii.csv")
    table.rename_columns(table.colnames, [c.upper() for c in table.colnames])
    table.remove_columns(["SNRZ", "DESIGNATION", "FILENAME"])         # optional columns
    path = tmp_path / "catalogue.fits.gz"
    table.write(path)
    summary = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(path), spectra_root=str(simulated_set)))
    assert summary.loaded == len(table) and summary.quarantined == 0   # by standard name
    metadata_only = ingest_spectra(catalogue_engine, SpectraIngestOptions(
        catalogue=str(path), metadata_only=True))
    # Missing columns and file-less rows never erase what is stored.
    assert (metadata_only.updated, metadata_only.unchanged) == (0, len(table))
    with catalogue_engine.connect() as connection:
        assert connection.execute(text(
            "SELECT count(*) FROM spectra WHERE file_sha256 IS NULL")).scalar() == 0


# --------------------------------------------------------------------------------------
def test_labels_payne_layout(catalogue_engine, simulated_set):
    path = simulated_set / "apogee_payne.fits"
    assert run_cli(url_of(catalogue_engine), "ingest", "labels", str(path)) == 0
    data = fits.getdata(path)
    with catalogue_engine.connect() as connection:
        stored = {r.apogee_id: r for r in connection.execute(select(schema.reference_labels))}
    assert len(stored) == len(data)
    for row in data:
        label = stored[row["APOGEE_ID"].strip()]
        assert label.teff == pytest.approx(row["payne"][0])
        assert label.logg == pytest.approx(row["payne"][1])
        assert label.feh == pytest.approx(row["payne"][19])
        assert label.good_flag == row["good_flag"]
        assert label.label_set == "apogee_payne"
    again = ingest_labels(catalogue_engine, LabelsIngestOptions(path=str(path)))
    assert (again.loaded, again.updated, again.unchanged) == (0, 0, len(data))


def test_labels_payne_missing_values_are_null(catalogue_engine, simulated_set, tmp_path):
    data = fits.getdata(simulated_set / "apogee_payne.fits").copy()
    data["payne"][0, 0] = -9999.0
    data["RA"][1] = np.nan
    path = tmp_path / "payne_missing.fits"
    fits.BinTableHDU(data).writeto(path)
    summary = ingest_labels(catalogue_engine, LabelsIngestOptions(path=str(path)))
    assert summary.quarantined == 1 and summary.loaded == len(data) - 1
    with catalogue_engine.connect() as connection:
        teff = connection.execute(select(schema.reference_labels.c.teff).where(
            schema.reference_labels.c.apogee_id == data["APOGEE_ID"][0].strip())).scalar()
    assert teff is None


def test_labels_flat_columns(catalogue_engine, shared_dir, tmp_path):
    cannon = shared_dir / "data" / "labels" / "cannon_lamost_dr2_x_apogee_dr12.fits"
    url = url_of(catalogue_engine)
    assert run_cli(url, "ingest", "labels", str(cannon)) == 1          # no [Fe/H] column
    assert run_cli(url, "ingest", "labels", str(cannon),
                   "--columns", "teff=TEFF,logg=LOGG,feh=PARAM_M_H") == 0
    data = fits.getdata(cannon, ext=1)
    with catalogue_engine.connect() as connection:
        count, good = connection.execute(text(
            "SELECT count(*), sum(good_flag) FROM reference_labels")).one()
        feh = connection.execute(select(schema.reference_labels.c.feh).where(
            schema.reference_labels.c.apogee_id == data["APOGEE_ID"][0].strip())).scalar()
    assert count == len(data) and good == len(data)
    assert feh == pytest.approx(data["PARAM_M_H"][0])
    flat = tmp_path / "flat.csv"
    flat.write_text("APOGEE_ID,RA,DEC,Teff,Logg,FeH\n2M0001,10.0,20.0,5000,4.5,-0.2\n"
                    "2M0002,11.0,21.0,4800,,0.1\n")
    summary = ingest_labels(catalogue_engine, LabelsIngestOptions(path=str(flat)))
    assert summary.loaded == 2
    with catalogue_engine.connect() as connection:
        rows = connection.execute(text(
            "SELECT apogee_id, teff, logg, feh, good_flag FROM reference_labels "
            "WHERE label_set = 'flat' ORDER BY apogee_id")).all()
    assert [tuple(r) for r in rows] == [("2M0001", 5000.0, 4.5, -0.2, 1),
                                        ("2M0002", 4800.0, None, 0.1, 0)]
