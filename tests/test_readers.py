"""Tests for models.readers: our FITS parsing must agree exactly with astropy.io.fits.

astropy is the independent reference here (it is deliberately kept out of the reader's
hot path for speed, see models/readers.py).
"""
import gzip
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from models.readers import (LAYOUT_DR1_IMAGE, LAYOUT_DR8_IMAGE, LAYOUT_DR8_V2_TABLE, Spectrum,
                            SpectrumReadError, parse_card_value, read_meta, read_spectrum)

# folder under data/lamost-real -> (layout, number of spectrum files; all of them read)
REAL_FOLDERS = {
    "dr1-plate-B6212": (LAYOUT_DR1_IMAGE, 176),
    "dr7-plate-HD103621N361936B01": (LAYOUT_DR8_IMAGE, 100),
    "dr8-repeats": (LAYOUT_DR8_IMAGE, 220),
}
SAMPLE_EVERY = 10        # compare every 10th real file with astropy (~50 files)
META_KEYS = {"obsid", "designation", "ra", "dec", "lmjd", "mjd", "planid", "spid", "fiberid",
             "snru", "snrg", "snrr", "snri", "snrz", "class", "subclass", "z", "z_err",
             "filename", "data_version", "loglam0", "dloglam"}


# --------------------------------------------------------------------------- fixtures / helpers

@pytest.fixture(scope="session")
def real_dir(shared_dir) -> Path:
    path = shared_dir / "data" / "lamost-real"
    if not path.is_dir():
        pytest.skip(f"real LAMOST spectra not found at {path}")
    return path


def spectrum_files(folder: Path):
    return sorted(p for p in folder.iterdir() if p.name.endswith((".fits", ".fits.gz")))


def real_sample(real_dir):
    return [path for name in REAL_FOLDERS
            for path in spectrum_files(real_dir / name)[::SAMPLE_EVERY]]


@pytest.fixture(scope="session")
def sim_dir(shared_dir, tmp_path_factory) -> Path:
    """A tiny simulated set (3 stars x 2 spectra) holding both DR8 image and v2.0 table files."""
    tool = shared_dir / "tools" / "lamost_sim.py"
    miles = shared_dir / "data" / "miles"
    if not tool.is_file() or not miles.is_dir():
        pytest.skip(f"lamost_sim.py or MILES not found under {shared_dir}")
    out = tmp_path_factory.mktemp("sim")
    stars = out / "stars.txt"
    stars.write_text("1\n3\n4\n")
    subprocess.run([sys.executable, str(tool), "--miles", str(miles), "--out", str(out / "set"),
                    "--stars", str(stars), "--per-star", "2x10-20", "--seed", "3",
                    "--v2-fraction", "0.5"], check=True, capture_output=True, timeout=300)
    return out / "set"


def sim_files(sim_dir):
    return sorted((sim_dir / "spectra").rglob("*.fits.gz"))


def astropy_reference(path):
    """(header, dict of arrays) read by astropy, in the dtypes our reader promises."""
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header
        if len(hdul) > 1 and isinstance(hdul[1], fits.BinTableHDU):
            row = hdul[1].data[0]
            arrays = {"flux": row["FLUX"], "ivar": row["IVAR"], "wavelength": row["WAVELENGTH"],
                      "andmask": row["ANDMASK"], "ormask": row["ORMASK"]}
        else:
            data = hdul[0].data
            arrays = {"flux": data[0], "ivar": data[1], "row3": data[2],
                      "andmask": data[3], "ormask": data[4]}
            if "WAVELENGTH" in header.get("EXTEN0", "").upper():
                arrays["wavelength"] = data[2]
            else:   # DR1: log-linear grid from the header
                npix = data.shape[1]
                arrays["wavelength"] = 10.0 ** (header["COEFF0"] + header["COEFF1"] * np.arange(npix))
        dtypes = {"flux": np.float32, "ivar": np.float32, "wavelength": np.float64,
                  "andmask": np.int32, "ormask": np.int32, "row3": np.float32}
        arrays = {k: np.array(v).astype(dtypes[k]) for k, v in arrays.items()}
        return header.copy(), arrays


def assert_matches_astropy(spectrum: Spectrum, path):
    header, ref = astropy_reference(path)
    for name in ("wavelength", "flux", "ivar", "andmask", "ormask"):
        ours = getattr(spectrum, name)
        assert ours.dtype == ref[name].dtype, name
        assert ours.dtype.isnative and ours.flags.writeable, name
        np.testing.assert_array_equal(ours, ref[name], err_msg=f"{name} of {path}")
    return header


def assert_meta_matches_header(meta, header, path):
    assert set(meta) == META_KEYS
    assert meta["obsid"] == header.get("OBSID")
    assert meta["ra"] == header["RA"] and meta["dec"] == header["DEC"]
    assert meta["snrg"] == header.get("SNRG", header.get("SN_G"))
    assert meta["z"] == header.get("Z") and meta["z_err"] == header.get("Z_ERR")
    assert meta["class"] == header.get("CLASS") and meta["subclass"] == header.get("SUBCLASS")
    assert meta["designation"] == header.get("DESIG")
    assert meta["lmjd"] == header["LMJD"] and meta["fiberid"] == header["FIBERID"]
    assert meta["planid"] == header["PLANID"]
    assert meta["data_version"] == header.get("DATA_V")
    assert meta["filename"] == header.get("FILENAME", Path(path).name.removesuffix(".gz"))
    assert meta["loglam0"] == header["COEFF0"] and meta["dloglam"] == header["COEFF1"]


def assert_read_error(path, *reason_parts, reader=read_spectrum):
    with pytest.raises(SpectrumReadError) as info:
        reader(path)
    err = info.value
    assert err.path == str(path)
    assert Path(path).name in str(err)
    for part in reason_parts:
        assert part in err.reason, f"{part!r} not in reason {err.reason!r}"
        assert part in str(err)
    return err


# --------------------------------------------------------------------------- real files

def test_every_real_file_reads_with_the_expected_layout(real_dir):
    """~500 files of all three folders: each reads or raises SpectrumReadError, nothing else."""
    counts = Counter()
    failures = []
    for folder, (layout, _) in REAL_FOLDERS.items():
        for path in spectrum_files(real_dir / folder):
            try:
                spectrum = read_spectrum(path)
            except SpectrumReadError as err:
                failures.append(str(err))
                continue
            assert spectrum.layout == layout, path
            n = len(spectrum)
            assert 3700 <= n <= 3910 and spectrum.wavelength.shape == (n,)
            assert 3690 < spectrum.wavelength[0] < 3850 and 8900 < spectrum.wavelength[-1] < 9110
            counts[folder] += 1
    assert failures == []
    assert counts == {folder: n for folder, (_, n) in REAL_FOLDERS.items()}


def test_real_arrays_and_meta_equal_astropy(real_dir):
    sample = real_sample(real_dir)
    assert len(sample) >= 45
    for path in sample:
        spectrum = read_spectrum(path)
        header = assert_matches_astropy(spectrum, path)
        assert_meta_matches_header(spectrum.meta, header, path)
        assert spectrum.path == str(path)


def test_read_meta_equals_read_spectrum_meta(real_dir):
    for path in real_sample(real_dir):
        assert read_meta(path) == read_spectrum(path).meta


def test_dr1_wavelength_comes_from_coeff_not_the_normalised_flux_row(real_dir):
    path = spectrum_files(real_dir / "dr1-plate-B6212")[0]
    header, ref = astropy_reference(path)
    spectrum = read_spectrum(path)
    assert spectrum.layout == LAYOUT_DR1_IMAGE
    grid = 10.0 ** (header["COEFF0"] + header["COEFF1"] * np.arange(header["NAXIS1"]))
    np.testing.assert_array_equal(spectrum.wavelength, grid)
    assert np.nanmedian(ref["row3"]) < 10          # row 3 is normalised flux, ~1
    assert not np.array_equal(spectrum.wavelength, ref["row3"].astype(np.float64))
    meta = spectrum.meta
    assert meta["obsid"] is None and meta["data_version"] is None   # DR1 has neither keyword
    assert meta["snrg"] == header["SN_G"] and meta["snru"] == header["SN_U"]


def test_layout_detected_by_content_not_name(real_dir, tmp_path):
    """A plain FITS named .gz and a gzip named .fits both read: we look at the bytes."""
    plain = spectrum_files(real_dir / "dr7-plate-HD103621N361936B01")[0]
    compressed = spectrum_files(real_dir / "dr8-repeats")[0]
    fake_gz = tmp_path / "plain.fits.gz"
    fake_plain = tmp_path / "compressed.fits"
    shutil.copy(plain, fake_gz)
    shutil.copy(compressed, fake_plain)
    np.testing.assert_array_equal(read_spectrum(fake_gz).flux, read_spectrum(plain).flux)
    np.testing.assert_array_equal(read_spectrum(fake_plain).flux, read_spectrum(compressed).flux)


# --------------------------------------------------------------------------- simulated v2.0 tables

def test_simulated_files_equal_astropy_including_v2_tables(sim_dir):
    files = sim_files(sim_dir)
    layouts = Counter()
    for path in files:
        spectrum = read_spectrum(path)
        layouts[spectrum.layout] += 1
        with fits.open(path) as hdul:
            expected = LAYOUT_DR8_V2_TABLE if len(hdul) > 1 else LAYOUT_DR8_IMAGE
        assert spectrum.layout == expected
        header = assert_matches_astropy(spectrum, path)
        assert_meta_matches_header(spectrum.meta, header, path)
        assert read_meta(path) == spectrum.meta
    assert layouts[LAYOUT_DR8_V2_TABLE] >= 1 and layouts[LAYOUT_DR8_IMAGE] >= 1, layouts


# --------------------------------------------------------------------------- synthetic edge cases

def write_image(path, data, **cards):
    header = fits.Header()
    header["EXTEN0"] = "Flux, Inverse, Wavelength, Andmask, Ormask"
    for key, value in cards.items():
        header[key] = value
    fits.PrimaryHDU(data=data, header=header).writeto(path)


def synthetic_rows(npix=50):
    wavelength = 3700.0 + 0.25 * np.arange(npix)
    flux = np.linspace(-3, 97, npix).round()          # values exactly representable
    return np.vstack([flux, np.full(npix, 0.5), wavelength,
                      np.arange(npix) % 4, np.arange(npix) % 8]).astype(np.float32)


def test_scaled_integer_image_applies_bscale_bzero(tmp_path):
    path = tmp_path / "scaled.fits"
    hdu = fits.PrimaryHDU(data=synthetic_rows())
    hdu.header["EXTEN0"] = "Flux, Inverse, Wavelength, Andmask, Ormask"
    hdu.scale("int16", bscale=0.25, bzero=4000.0)
    hdu.writeto(path)
    assert fits.getheader(path)["BITPIX"] == 16
    spectrum = read_spectrum(path)
    assert spectrum.layout == LAYOUT_DR8_IMAGE
    assert_matches_astropy(spectrum, path)
    first, last = np.log10(3700.0), np.log10(3700.0 + 0.25 * 49)   # no COEFF0/1: from array
    assert spectrum.meta["loglam0"] == pytest.approx(first)
    assert spectrum.meta["dloglam"] == pytest.approx((last - first) / 49)
    assert spectrum.meta["filename"] == "scaled.fits"


def test_float64_image_reads(tmp_path):
    path = tmp_path / "double.fits"
    write_image(path, synthetic_rows().astype(np.float64))
    assert_matches_astropy(read_spectrum(path), path)


@pytest.mark.parametrize("field, expected", [
    ("'STAR    '           / Class of object", "STAR"),
    ("'O''Brien''s'  / quote escapes", "O'Brien's"),
    ("'a / b'  / slash inside a string", "a / b"),
    ("''", ""),
    ("                   T / logical", True),
    ("                   F", False),
    ("            740103002 / int", 740103002),
    ("          -0.00021205 / float", -0.00021205),
    ("              1.5D-03 / D exponent", 1.5e-3),
    ("               -2E+02", -200.0),
    ("                      / undefined", None),
])
def test_parse_card_value(field, expected):
    value = parse_card_value(field)
    assert value == expected and type(value) is type(expected)


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def plain_real_file(real_dir) -> Path:
    return spectrum_files(real_dir / "dr7-plate-HD103621N361936B01")[0]


@pytest.fixture
def gzip_real_file(real_dir) -> Path:
    return spectrum_files(real_dir / "dr8-repeats")[0]


def test_truncated_data(plain_real_file, tmp_path):
    raw = plain_real_file.read_bytes()
    header = fits.getheader(plain_real_file)
    data_bytes = 4 * header["NAXIS1"] * header["NAXIS2"]
    header_bytes = len(raw) - -(-data_bytes // 2880) * 2880
    path = tmp_path / "truncated.fits"
    path.write_bytes(raw[:header_bytes + 1000])
    assert_read_error(path, f"truncated: expected {data_bytes} bytes of data, found 1000")


def test_truncated_inside_header(plain_real_file, tmp_path):
    path = tmp_path / "cut-header.fits"
    path.write_bytes(plain_real_file.read_bytes()[:3000])
    assert_read_error(path, "truncated", "END")
    assert_read_error(path, "truncated", reader=read_meta)


def test_truncated_gzip(gzip_real_file, tmp_path):
    raw = gzip_real_file.read_bytes()
    path = tmp_path / "cut.fits.gz"
    path.write_bytes(raw[:len(raw) // 2])
    assert_read_error(path, "truncated gzip")


def test_gzip_of_truncated_fits(plain_real_file, tmp_path):
    path = tmp_path / "short-inside.fits.gz"
    path.write_bytes(gzip.compress(plain_real_file.read_bytes()[:20000]))
    assert_read_error(path, "truncated: expected")


def test_corrupt_gzip(gzip_real_file, tmp_path):
    raw = bytearray(gzip_real_file.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 200] = bytes(b ^ 0xFF for b in raw[middle:middle + 200])
    path = tmp_path / "corrupt.fits.gz"
    path.write_bytes(bytes(raw))
    assert_read_error(path, "gzip")


def test_corrupt_gzip_header_for_read_meta(tmp_path):
    path = tmp_path / "garbage.fits.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 4)
    assert_read_error(path, "gzip", reader=read_meta)
    assert_read_error(path, "gzip")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.fits"
    path.write_bytes(b"R" + np.random.default_rng(0).bytes(20000))
    assert_read_error(path, "not a FITS file")
    assert_read_error(path, "not a FITS file", reader=read_meta)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.fits"
    path.write_bytes(b"")
    assert_read_error(path, "empty file")
    assert_read_error(path, "empty file", reader=read_meta)


def test_missing_file(tmp_path):
    path = tmp_path / "no-such-spectrum.fits.gz"
    assert_read_error(path, "cannot read file")
    assert_read_error(path, "cannot read file", reader=read_meta)


def test_directory_is_not_a_spectrum(tmp_path):
    assert_read_error(tmp_path, "not a regular file")


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    """Opening a FIFO blocks until something writes to it: one named like a spectrum under
    the spectra root hung ingest for ever (found by review)."""
    import threading

    from etl.spectrum_files import inspect_file

    os.mkfifo(tmp_path / "spec-55000-X_sp01-001.fits")
    outcomes = []
    for reader in (read_spectrum, read_meta):
        thread = threading.Thread(target=lambda r=reader: outcomes.append(
            assert_read_error(tmp_path / "spec-55000-X_sp01-001.fits", "not a regular file",
                              reader=r)), daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive(), f"{reader.__name__} waits on a FIFO"
    assert len(outcomes) == 2
    info = inspect_file(str(tmp_path), "spec-55000-X_sp01-001.fits")
    assert info.problem == "unreadable spectrum file: not a regular file"


def test_a_huge_plain_file_is_refused_before_it_is_read(tmp_path):
    """gzip input was capped at 64 MiB, a plain file was read whole (1 GB of memory for a
    1 GB file, twice: once more for its hash)."""
    from models.readers import MAX_SPECTRUM_BYTES

    path = tmp_path / "huge.fits"
    header = fits.PrimaryHDU(data=np.zeros((5, 10), np.float32)).header.tostring().encode()
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(MAX_SPECTRUM_BYTES + 1)          # sparse: no disk used
    for reader in (read_spectrum, read_meta):
        assert_read_error(path, f"file of {MAX_SPECTRUM_BYTES + 1:,} bytes", reader=reader)


def test_wrong_image_shape(tmp_path):
    path = tmp_path / "three-rows.fits"
    write_image(path, synthetic_rows()[:3])
    assert_read_error(path, "expected a (5, N) primary image, found shape (3, 50)")


def test_one_dimensional_image(tmp_path):
    path = tmp_path / "vector.fits"
    write_image(path, synthetic_rows()[0])
    assert_read_error(path, "expected a (5, N) primary image")


def test_wavelength_not_increasing(tmp_path):
    rows = synthetic_rows()
    rows[2, 10] = rows[2, 9]
    path = tmp_path / "flat-step.fits"
    write_image(path, rows)
    assert_read_error(path, "wavelength not strictly increasing")


def test_gzip_bomb_is_unreadable_without_inflating_it(tmp_path):
    """A few hundred kB of gzip held gigabytes (found by review); one member or several."""
    from models.readers import MAX_SPECTRUM_BYTES

    header = fits.PrimaryHDU(data=np.zeros((5, 10), np.float32)).header.tostring().encode()
    zeros = b"\0" * (MAX_SPECTRUM_BYTES // 2 + 2**20)
    one = tmp_path / "bomb.fits.gz"
    one.write_bytes(gzip.compress(header + zeros + zeros, compresslevel=1))
    several = tmp_path / "bomb-members.fits.gz"
    several.write_bytes(gzip.compress(header + zeros, 1) + gzip.compress(zeros, 1))
    for path in (one, several):
        assert path.stat().st_size < MAX_SPECTRUM_BYTES // 100
        assert_read_error(path, "gzip data inflate to more than 64 MiB")


def test_wavelength_not_log_linear(tmp_path):
    """Preprocessing places pixels by the first and last wavelength: a linear grid over
    the LAMOST range was read as log-linear without a word (found by review)."""
    rows = np.vstack([synthetic_rows(4000)[:2], np.linspace(3700.0, 9100.0, 4000)[None],
                      synthetic_rows(4000)[3:]]).astype(np.float32)
    path = tmp_path / "linear-grid.fits"
    write_image(path, rows)
    assert_read_error(path, "wavelength not on a log-linear grid")
    rows[2] = np.geomspace(3700.0, 9100.0, 4000)                 # float32 rounding passes
    write_image(tmp_path / "log-grid.fits", rows)
    assert read_spectrum(tmp_path / "log-grid.fits").wavelength.size == 4000


def test_header_only_file_without_table(tmp_path):
    path = tmp_path / "header-only.fits"
    fits.PrimaryHDU().writeto(path)
    assert_read_error(path, "no data")


def test_v2_table_missing_column(tmp_path):
    npix = 20
    columns = [fits.Column(name=name, format=f"{npix}E", array=np.ones((1, npix), np.float32))
               for name in ("FLUX", "IVAR", "ANDMASK", "ORMASK")]
    path = tmp_path / "no-wavelength.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(columns, name="COADD")]).writeto(path)
    assert_read_error(path, "WAVELENGTH")


def test_v2_table_with_mixed_column_types(tmp_path):
    """J (int32), D (float64) and a scalar column before the spectrum: offsets must add up."""
    npix = 30
    wavelength = 4000.0 + np.arange(npix)
    columns = [fits.Column(name="OBJ", format="8A", array=["abc"]),
               fits.Column(name="FLUX", format=f"{npix}D", array=np.linspace(0, 1, npix)[None]),
               fits.Column(name="IVAR", format=f"{npix}E", array=np.full((1, npix), 2, np.float32)),
               fits.Column(name="WAVELENGTH", format=f"{npix}D", array=wavelength[None]),
               fits.Column(name="ANDMASK", format=f"{npix}J", array=np.arange(npix)[None]),
               fits.Column(name="ORMASK", format=f"{npix}I", array=np.arange(npix)[None] % 3)]
    path = tmp_path / "mixed.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(columns, name="COADD")]).writeto(path)
    spectrum = read_spectrum(path)
    assert spectrum.layout == LAYOUT_DR8_V2_TABLE
    assert_matches_astropy(spectrum, path)


def v2_spectrum_columns(npix=40):
    wavelength = 4000.0 * 10.0 ** (1e-4 * np.arange(npix))
    arrays = {"FLUX": np.linspace(1, 2, npix), "IVAR": np.ones(npix), "WAVELENGTH": wavelength,
              "ANDMASK": np.zeros(npix), "ORMASK": np.zeros(npix)}
    return [fits.Column(name=name, format=f"{npix}E" if name != "WAVELENGTH" else f"{npix}D",
                        array=values[None]) for name, values in arrays.items()]


@pytest.mark.parametrize("extname", ["FLUX_EXP1", None])
def test_v2_table_must_be_the_coadd_extension(tmp_path, extname):
    """DR8 v2.0 keeps the co-added spectrum in EXTNAME = 'COADD'; a first table of another
    name (a single exposure, an unnamed table) is refused with the extension named."""
    table = fits.BinTableHDU.from_columns(v2_spectrum_columns())
    if extname:
        table.header["EXTNAME"] = extname
    path = tmp_path / "not-coadd.fits"
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    assert_read_error(path, f"EXTNAME = {extname!r}", "'COADD'")
    # the same table named COADD (any case, FITS pads strings) reads
    table.header["EXTNAME"] = "coadd "
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(tmp_path / "coadd.fits")
    assert read_spectrum(tmp_path / "coadd.fits").layout == LAYOUT_DR8_V2_TABLE


def test_error_is_a_value_error_and_picklable(tmp_path):
    import pickle
    err = assert_read_error(tmp_path / "gone.fits", "cannot read file")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))
