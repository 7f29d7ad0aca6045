"""Fast reader for LAMOST low-resolution spectrum FITS files (plain or gzip-compressed).

Why not astropy.io.fits: a catalogue build reads hundreds of thousands of ~80 kB files,
and astropy spends ~7 ms per file building generic HDU/Header objects we never use.
LAMOST spectra use a tiny, fixed corner of FITS (one small image or one one-row binary
table), so this module parses the 2880-byte header blocks itself and views the data
with ``np.frombuffer``; a file costs little more than its gzip decompression.

Three layouts are understood, told apart by structure (never by file name):

``dr1-image``
    Primary image (5, N): flux, ivar, *normalised flux*, andmask, ormask.  There is no
    wavelength row; wavelength = 10**(COEFF0 + COEFF1 * i).  S/N keywords SN_U..SN_Z.
``dr8-image`` (DR7/DR8 v1)
    Primary image (5, N): flux, ivar, wavelength, andmask, ormask.
``dr8-v2-table`` (DR8 v2.0)
    Header-only primary HDU, then a one-row BINTABLE named ``COADD`` (checked) with vector
    columns FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK (and others, ignored).

Every failure -- missing file, empty file, corrupt gzip, not FITS, truncated data,
unexpected shape, bad wavelengths -- is raised as :class:`SpectrumReadError`, so a bulk
ingest can catch one exception type, log ``str(err)`` and move on.
"""
from __future__ import annotations

import io
import math
import os
import re
import stat
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["SpectrumReadError", "Spectrum", "read_spectrum", "read_meta",
           "LAYOUT_DR1_IMAGE", "LAYOUT_DR8_IMAGE", "LAYOUT_DR8_V2_TABLE"]

LAYOUT_DR1_IMAGE = "dr1-image"
LAYOUT_DR8_IMAGE = "dr8-image"
LAYOUT_DR8_V2_TABLE = "dr8-v2-table"

BLOCK = 2880          # FITS logical record size
CARD = 80             # FITS header card size
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 16 + zlib.MAX_WBITS   # tell zlib to expect (and check) a gzip wrapper

# Big-endian numpy dtypes for FITS image BITPIX values.
IMAGE_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
# Binary-table TFORM type codes -> (bytes per element, numpy dtype or None if not numeric).
TFORM_TYPES = {"L": (1, None), "X": (1, None), "B": (1, ">u1"), "I": (2, ">i2"),
               "J": (4, ">i4"), "K": (8, ">i8"), "A": (1, None), "E": (4, ">f4"),
               "D": (8, ">f8"), "C": (8, None), "M": (16, None), "P": (8, None), "Q": (16, None)}
TFORM_PATTERN = re.compile(r"\s*(\d*)\s*([LXBIJKAEDCMPQ])")
TABLE_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK")
COADD_EXTNAME = "COADD"     # DR8 v2.0: the extension holding the co-added spectrum
IMAGE_ROWS = 5
# A DR8-style wavelength row holds Angstroms (3700-9100); DR1's normalised-flux row is ~1.
MIN_PLAUSIBLE_WAVELENGTH = 1000.0


class SpectrumReadError(ValueError):
    """A file that cannot be read as a LAMOST spectrum; str() names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = _path_str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):   # keep picklable (multiprocessing ingest workers send these back)
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True, eq=False)
class Spectrum:
    """One LAMOST spectrum, arrays in native byte order, own memory (writable copies).

    wavelength: float64 Angstrom (vacuum, observed frame, strictly increasing);
    flux, ivar: float32; andmask, ormask: int32; meta: see :func:`read_meta`.
    """
    path: str
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    andmask: np.ndarray
    ormask: np.ndarray
    meta: dict
    layout: str

    def __len__(self) -> int:
        return self.flux.shape[0]


# --------------------------------------------------------------------------- public API

def read_spectrum(path) -> Spectrum:
    """Read a LAMOST spectrum (``.fits`` or ``.fits.gz``, detected by content).

    Raises :class:`SpectrumReadError` (and nothing else) for any unreadable file.
    """
    return _guarded(path, _read_spectrum)


def read_meta(path) -> dict:
    """Normalised header metadata only, without decoding the spectrum arrays.

    Only the primary header is decompressed and parsed, so this is cheaper than
    :func:`read_spectrum`; it checks the header but not that the data are complete.
    Keys (always present, None when the header lacks them): obsid, designation, ra, dec,
    lmjd, mjd, planid, spid, fiberid, snru, snrg, snrr, snri, snrz, class, subclass,
    z, z_err, filename, data_version, loglam0, dloglam.

    loglam0/dloglam come from COEFF0/COEFF1 (the pipeline's declared log-linear grid;
    a few real DR8 files' wavelength rows start at 3700.000 A rather than
    10**3.5682 = 3699.986 A); only files without COEFF0/COEFF1 fall back to a full read
    to take them from the wavelength array.  read_spectrum(path).meta is the same dict.
    """
    return _guarded(path, _read_meta)


# --------------------------------------------------------------------------- orchestration

class _Unreadable(Exception):
    """Internal: carries just a reason; :func:`_guarded` attaches the path."""


def _guarded(path, reader):
    """Run ``reader(path_str)`` so that every failure surfaces as SpectrumReadError.

    Internal code raises _Unreadable with a precise reason; anything else escaping (a
    bug or a case nobody foresaw) is still converted, chained for debugging, because
    callers rely on one exception type when ingesting hundreds of thousands of files.
    """
    try:
        path_str = _path_str(path)
    except TypeError as exc:
        raise SpectrumReadError(repr(path), f"not a file path ({exc})") from None
    try:
        return reader(path_str)
    except SpectrumReadError:
        raise
    except _Unreadable as exc:
        raise SpectrumReadError(path_str, str(exc)) from None
    except OSError as exc:
        raise SpectrumReadError(path_str, f"cannot read file: {exc.strerror or exc}") from None
    except MemoryError:
        raise SpectrumReadError(path_str, "out of memory while reading") from None
    except Exception as exc:  # noqa: BLE001 -- the one-exception-type contract, see docstring
        raise SpectrumReadError(path_str, f"unreadable ({type(exc).__name__}: {exc})") from exc


def _read_spectrum(path: str) -> Spectrum:
    buf = _load_bytes(path)
    primary, data_start = _parse_header(buf, 0, expect_primary=True)
    data_size = _image_data_size(primary)
    if primary.get("NAXIS") == 0 or data_size == 0:
        layout = LAYOUT_DR8_V2_TABLE
        ext_start = data_start + _padded(data_size)
        arrays = _read_table_arrays(buf, ext_start)
    else:
        _require_bytes(buf, data_start, data_size)
        layout, arrays = _read_image_arrays(buf, primary, data_start)
    wavelength, flux, ivar, andmask, ormask = arrays
    _check_wavelength(wavelength)
    meta = _normalise_meta(primary, path, wavelength)
    return Spectrum(path=path, wavelength=wavelength, flux=flux, ivar=ivar,
                    andmask=andmask, ormask=ormask, meta=meta, layout=layout)


def _read_meta(path: str) -> dict:
    buf = _load_header_bytes(path)
    primary, _ = _parse_header(buf, 0, expect_primary=True)
    if _header_grid(primary) is None:
        return _read_spectrum(path).meta   # rare: grid only knowable from the data
    return _normalise_meta(primary, path, None)


# --------------------------------------------------------------------------- bytes in

def _path_str(path) -> str:
    return os.fsdecode(os.fspath(path))


# What a spectrum file may inflate to: a LAMOST spectrum is ~0.1-0.3 MB; 64 MiB holds a
# 3-million-pixel five-row image.
MAX_SPECTRUM_BYTES = 64 * 2**20


def open_spectrum_file(path):
    """:func:`_open_regular` for callers outside this module (``SpectrumReadError``)."""
    return _guarded(path, _open_regular)


def _open_regular(path: str):
    """The file opened for reading, refused unless it is a regular
    file of at most ``MAX_SPECTRUM_BYTES``: a FIFO or a device under the spectra root would
    block a reader for ever or never end, a huge file would be read into memory whole.
    Opened non-blocking, so that opening a FIFO does not wait for a writer."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable("not a regular file")
        if info.st_size > MAX_SPECTRUM_BYTES:
            raise _Unreadable(f"file of {info.st_size:,} bytes; a LAMOST spectrum is well under "
                              f"1 MiB (at most {MAX_SPECTRUM_BYTES // 2**20} MiB are read)")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _load_bytes(path: str) -> bytes:
    """Whole file, gunzipped when it starts with the gzip magic (whatever its name)."""
    with _open_regular(path) as fh:
        raw = fh.read(MAX_SPECTRUM_BYTES + 1)
    if not raw:
        raise _Unreadable("empty file")
    if raw[:2] == GZIP_MAGIC:
        return _gunzip(raw)
    return raw


def _gunzip(raw: bytes) -> bytes:
    """Decompress gzip with zlib directly (faster than the gzip module for one member).

    A decompressobj, unlike zlib.decompress, tells us whether the stream really ended
    (truncated .gz) and whether more members follow (then let gzip handle them all).
    """
    inflater = zlib.decompressobj(GZIP_WBITS)
    try:
        out = inflater.decompress(raw, MAX_SPECTRUM_BYTES + 1)
    except zlib.error as exc:
        raise _Unreadable(f"corrupt gzip data ({exc})") from None
    _check_inflated_size(out)
    if not inflater.eof:
        raise _Unreadable("truncated gzip stream (compressed data end early)")
    if inflater.unused_data.strip(b"\0"):
        import gzip   # multi-member gzip: rare, so the slower general path is fine
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as members:
                out = members.read(MAX_SPECTRUM_BYTES + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise _Unreadable(f"corrupt gzip data ({exc})") from None
        _check_inflated_size(out)
    return out


def _check_inflated_size(data: bytes) -> None:
    # A few hundred kB of gzip can hold gigabytes of zeros (a reader thread each).
    if len(data) > MAX_SPECTRUM_BYTES:
        raise _Unreadable(f"gzip data inflate to more than {MAX_SPECTRUM_BYTES // 2**20} MiB; "
                          f"a LAMOST spectrum is well under 1 MiB")


def _load_header_bytes(path: str, chunk: int = 4 * BLOCK) -> bytes:
    """Just enough leading bytes (decompressed) to hold the primary header."""
    with _open_regular(path) as fh:
        head = fh.read(2)
        if not head:
            raise _Unreadable("empty file")
        if head != GZIP_MAGIC:
            data = head + fh.read(chunk - 2)
            while not _header_complete(data):
                more = fh.read(chunk)
                if not more:
                    break
                data += more
            return data
        compressed = head + fh.read()
    inflater = zlib.decompressobj(GZIP_WBITS)
    data = b""
    pending = compressed
    try:
        while not _header_complete(data):
            piece = inflater.decompress(pending, chunk)
            pending = inflater.unconsumed_tail
            if not piece:
                break
            data += piece
    except zlib.error as exc:
        raise _Unreadable(f"corrupt gzip data ({exc})") from None
    return data


def _header_complete(data: bytes) -> bool:
    """True once ``data`` holds the END card, or once it is clearly not FITS at all
    (so a large non-FITS file is not read chunk by chunk to its end)."""
    if len(data) >= 10 and not data.startswith(b"SIMPLE  = "):
        return True
    return _find_end_card(data, 0) is not None


def _find_end_card(buf: bytes, start: int):
    """Offset of the END card of the header starting at ``start``, or None."""
    for offset in range(start, len(buf) - CARD + 1, CARD):
        if buf[offset:offset + 8] == b"END     ":
            return offset
    return None


def _padded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


def _require_bytes(buf: bytes, start: int, nbytes: int) -> None:
    found = max(len(buf) - start, 0)
    if found < nbytes:
        raise _Unreadable(f"truncated: expected {nbytes} bytes of data, found {found}")


# --------------------------------------------------------------------------- FITS headers

class FitsHeader:
    """Keyword -> value for one header; values are parsed on first access.

    A LAMOST header has ~130 cards of which we use ~30, so raw value fields are kept
    and only parsed when asked for.  The first occurrence of a repeated keyword wins.
    """
    __slots__ = ("_raw", "_parsed")

    def __init__(self, raw_fields: dict):
        self._raw = raw_fields
        self._parsed = {}

    def __contains__(self, key) -> bool:
        return key in self._raw

    def get(self, key: str, default=None):
        if key in self._parsed:
            return self._parsed[key]
        field = self._raw.get(key)
        if field is None:
            return default
        value = parse_card_value(field)
        self._parsed[key] = value
        return value


def _parse_header(buf: bytes, start: int, expect_primary: bool):
    """Parse the header at ``start``; return (FitsHeader, offset where its data begin)."""
    if len(buf) - start < CARD:
        raise _Unreadable("truncated: no header where one was expected" if start else
                          "not a FITS file (shorter than one header card)")
    first = buf[start:start + 10]
    if expect_primary and first != b"SIMPLE  = ":
        raise _Unreadable("not a FITS file (does not start with SIMPLE =)")
    if not expect_primary and first != b"XTENSION= ":
        raise _Unreadable(f"expected an extension header at byte {start}")
    end = _find_end_card(buf, start)
    if end is None:
        raise _Unreadable("truncated: header has no END card")
    text = buf[start:end].decode("latin-1")
    cards = [text[offset:offset + CARD] for offset in range(0, len(text), CARD)]
    # Walk the cards backwards so that, for a repeated keyword, the first one wins.
    raw_fields = {card[:8].rstrip(): card[10:] for card in reversed(cards) if card[8:10] == "= "}
    header = FitsHeader(raw_fields)
    if expect_primary and header.get("SIMPLE") is not True:
        raise _Unreadable("not a standard FITS file (SIMPLE is not T)")
    return header, start + _padded(end + CARD - start)


def parse_card_value(field: str):
    """Value of a FITS card from its value field (card columns 11-80).

    Strings: quoted, '' is an embedded quote, trailing blanks dropped (FITS rule).
    Logicals T/F -> bool; integers -> int; reals (E or D exponent) -> float; empty
    (undefined) -> None; anything else (complex, non-standard) -> the raw text.
    Everything after an unquoted '/' is a comment.
    """
    text = field.lstrip()
    if text.startswith("'"):
        return _parse_string_value(text)
    token = text.split("/", 1)[0].strip()
    if not token:
        return None
    if token == "T":
        return True
    if token == "F":
        return False
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token.replace("D", "E").replace("d", "e"))
    except ValueError:
        return token


def _parse_string_value(text: str) -> str:
    pieces = []
    pos = 1
    while True:
        quote = text.find("'", pos)
        if quote < 0:
            raise _Unreadable(f"unterminated string in header card: {text.strip()[:40]!r}")
        if text.startswith("''", quote):
            pieces.append(text[pos:quote + 1])
            pos = quote + 2
            continue
        pieces.append(text[pos:quote])
        return "".join(pieces).rstrip()


def _header_int(header: FitsHeader, key: str, minimum: int = 0) -> int:
    """A structural integer keyword that must be present and valid."""
    value = header.get(key)
    if type(value) is not int or value < minimum:
        raise _Unreadable(f"bad or missing {key} in header ({value!r})")
    return value


def _header_number(header: FitsHeader, key: str, default: float) -> float:
    value = header.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unreadable(f"{key} is not a number ({value!r})")
    return value


def _image_axes(header: FitsHeader):
    naxis = _header_int(header, "NAXIS")
    if naxis > 999:
        raise _Unreadable(f"bad NAXIS {naxis}")
    return [_header_int(header, f"NAXIS{i}") for i in range(1, naxis + 1)]


def _image_data_size(header: FitsHeader) -> int:
    bitpix = header.get("BITPIX")
    if bitpix not in IMAGE_DTYPES or isinstance(bitpix, bool):
        raise _Unreadable(f"unsupported BITPIX {bitpix!r}")
    axes = _image_axes(header)
    return abs(bitpix) // 8 * math.prod(axes) if axes else 0


# --------------------------------------------------------------------------- primary image

def _read_image_arrays(buf: bytes, header: FitsHeader, data_start: int):
    """(layout, (wavelength, flux, ivar, andmask, ormask)) from a (5, N) primary image."""
    axes = _image_axes(header)
    if len(axes) != 2 or axes[1] != IMAGE_ROWS or axes[0] < 2:
        shape = tuple(reversed(axes))
        raise _Unreadable(f"expected a ({IMAGE_ROWS}, N) primary image, found shape {shape}")
    npix = axes[0]
    dtype = IMAGE_DTYPES[header.get("BITPIX")]
    image = np.frombuffer(buf, dtype=dtype, count=IMAGE_ROWS * npix, offset=data_start)
    image = image.reshape(IMAGE_ROWS, npix)
    scale = _header_number(header, "BSCALE", 1)
    zero = _header_number(header, "BZERO", 0)

    def row(i, out_dtype):
        return _scaled(image[i], scale, zero, out_dtype)

    flux, ivar = row(0, np.float32), row(1, np.float32)
    andmask, ormask = _mask(image[3], scale, zero, "andmask"), _mask(image[4], scale, zero, "ormask")
    if _third_row_is_wavelength(header, image[2]):
        return LAYOUT_DR8_IMAGE, (row(2, np.float64), flux, ivar, andmask, ormask)
    grid = _header_grid(header)
    if grid is None:
        raise _Unreadable("no wavelength row (third row is normalised flux) and no COEFF0/COEFF1")
    loglam0, dloglam = grid
    wavelength = 10.0 ** (loglam0 + dloglam * np.arange(npix))
    return LAYOUT_DR1_IMAGE, (wavelength, flux, ivar, andmask, ormask)


def _third_row_is_wavelength(header: FitsHeader, third_row: np.ndarray) -> bool:
    """DR7/DR8 store wavelength in row 3; DR1 stores normalised flux there.

    The pipeline says which in EXTEN0 ('Flux, Inverse, Wavelength, ...' vs
    'Flux Inverse Subcontinuum ...'); trusting it means a corrupt wavelength row is
    reported rather than silently replaced by the COEFF grid.  Without a usable EXTEN0,
    decide from the values: wavelengths are thousands of Angstrom, normalised flux ~1.
    """
    description = str(header.get("EXTEN0") or "").upper()
    if "WAVELENGTH" in description:
        return True
    if "SUBCONTINUUM" in description or "NORMALI" in description:
        return False
    first = float(third_row[0])
    return math.isfinite(first) and first > MIN_PLAUSIBLE_WAVELENGTH


def _scaled(values: np.ndarray, scale, zero, out_dtype) -> np.ndarray:
    """Native-order copy in ``out_dtype``, applying BSCALE/BZERO (TSCAL/TZERO) if set."""
    if scale == 1 and zero == 0:
        return values.astype(out_dtype)
    return (values * np.float64(scale) + np.float64(zero)).astype(out_dtype)


def _mask(values: np.ndarray, scale, zero, name: str) -> np.ndarray:
    """Bit masks as int32; LAMOST stores them as float32, so refuse non-finite values."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise _Unreadable(f"{name} has non-finite values")
    return _scaled(values, scale, zero, np.int32)


# --------------------------------------------------------------------------- v2.0 binary table

@dataclass(frozen=True)
class _TableColumn:
    name: str
    offset: int        # byte offset within a row
    repeat: int        # elements per row
    dtype: str | None  # big-endian numpy dtype, None for non-numeric types
    scale: float
    zero: float


def _read_table_arrays(buf: bytes, ext_start: int):
    """(wavelength, flux, ivar, andmask, ormask) from the first row of the COADD BINTABLE.

    DR8 v2.0 puts the co-added spectrum in the first extension, ``EXTNAME = 'COADD'``; an
    extension of another name (e.g. a single exposure) is refused rather than read as if it
    were the co-add.
    """
    if ext_start >= len(buf):
        raise _Unreadable("no data: primary HDU is empty and no extension follows")
    header, data_start = _parse_header(buf, ext_start, expect_primary=False)
    if header.get("XTENSION") != "BINTABLE":
        raise _Unreadable(f"first extension is {header.get('XTENSION')!r}, not BINTABLE")
    extname = header.get("EXTNAME")
    if not isinstance(extname, str) or extname.strip().upper() != COADD_EXTNAME:
        raise _Unreadable(f"first extension is EXTNAME = {extname!r}, expected "
                          f"{COADD_EXTNAME!r} (the DR8 v2.0 co-added spectrum)")
    row_bytes = _header_int(header, "NAXIS1")
    nrows = _header_int(header, "NAXIS2")
    if nrows != 1:
        raise _Unreadable(f"expected a one-row spectrum table, found {nrows} rows")
    _require_bytes(buf, data_start, row_bytes * nrows)
    columns = _table_columns(header, row_bytes)
    missing = [name for name in TABLE_COLUMNS if name not in columns]
    if missing:
        raise _Unreadable(f"table lacks column(s) {', '.join(missing)}")
    wanted = [columns[name] for name in TABLE_COLUMNS]
    npix = wanted[0].repeat
    for column in wanted:
        if column.dtype is None:
            raise _Unreadable(f"column {column.name} is not numeric")
        if column.repeat != npix or npix < 2:
            raise _Unreadable(f"column {column.name} has {column.repeat} elements, FLUX has {npix}")

    def values(column):
        return np.frombuffer(buf, dtype=column.dtype, count=npix, offset=data_start + column.offset)

    flux_col, ivar_col, wave_col, and_col, or_col = wanted
    return (_scaled(values(wave_col), wave_col.scale, wave_col.zero, np.float64),
            _scaled(values(flux_col), flux_col.scale, flux_col.zero, np.float32),
            _scaled(values(ivar_col), ivar_col.scale, ivar_col.zero, np.float32),
            _mask(values(and_col), and_col.scale, and_col.zero, "andmask"),
            _mask(values(or_col), or_col.scale, or_col.zero, "ormask"))


def _table_columns(header: FitsHeader, row_bytes: int) -> dict:
    """Column name (upper case) -> _TableColumn, with byte offsets laid out from TFORMn."""
    nfields = _header_int(header, "TFIELDS")
    columns = {}
    offset = 0
    for i in range(1, nfields + 1):
        tform = header.get(f"TFORM{i}")
        match = TFORM_PATTERN.match(tform) if isinstance(tform, str) else None
        if match is None:
            raise _Unreadable(f"bad TFORM{i} {tform!r}")
        repeat = int(match.group(1)) if match.group(1) else 1
        code = match.group(2)
        size, dtype = TFORM_TYPES[code]
        width = (repeat + 7) // 8 if code == "X" else repeat * size
        name = str(header.get(f"TTYPE{i}") or f"COL{i}").strip().upper()
        if name not in columns:
            columns[name] = _TableColumn(name, offset, repeat, dtype,
                                         _header_number(header, f"TSCAL{i}", 1),
                                         _header_number(header, f"TZERO{i}", 0))
        offset += width
    if offset != row_bytes:
        raise _Unreadable(f"table columns take {offset} bytes per row but NAXIS1 = {row_bytes}")
    return columns


# --------------------------------------------------------------------------- checks and metadata

MAX_LOG_STEP_DEVIATION = 0.01


def _check_wavelength(wavelength: np.ndarray) -> None:
    if not (wavelength[0] > 0 and np.isfinite(wavelength[-1])):
        raise _Unreadable(f"wavelength not positive and finite (first {float(wavelength[0])!r}, "
                          f"last {float(wavelength[-1])!r})")
    ratios = wavelength[1:] / wavelength[:-1]
    if not (ratios > 1).all():
        bad = int(np.argmin(ratios > 1))
        raise _Unreadable(f"wavelength not strictly increasing (pixel {bad + 1}: "
                          f"{float(wavelength[bad])!r} -> {float(wavelength[bad + 1])!r})")
    # LAMOST pixels are equal steps of log10(wavelength), and preprocessing places them by
    # the first and last wavelength alone: any other grid would be read at wrong
    # wavelengths. For steps this small, ratio - 1 is the step times ln 10 to 0.03%:
    # compared with the mean step without a logarithm per pixel. (Real DR7/DR8 files keep
    # the step within 0.06%: float32 rounding.)
    if ratios.size:
        mean = (wavelength[-1] / wavelength[0]) ** (1.0 / ratios.size) - 1.0
        deviation = max(ratios.max() - 1.0 - mean, mean - (ratios.min() - 1.0)) / mean
        if deviation > MAX_LOG_STEP_DEVIATION:
            bad = int(np.argmax(np.abs(ratios - 1.0 - mean)))
            raise _Unreadable(f"wavelength not on a log-linear grid: the log10 step at pixel "
                              f"{bad + 1} differs from the mean by {100 * deviation:.1f}% "
                              f"(at most {100 * MAX_LOG_STEP_DEVIATION:g}%)")


def _header_grid(header: FitsHeader):
    """(log10 first wavelength, log10 step) declared by COEFF0/COEFF1, or None."""
    coeff0, coeff1 = header.get("COEFF0"), header.get("COEFF1")
    if _is_number(coeff0) and _is_number(coeff1) and coeff1 > 0:
        return float(coeff0), float(coeff1)
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_int(value):
    """Integer metadata; tolerates '123' strings and integral floats, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value):
    """Float metadata; tolerates numeric strings (some pipelines quote numbers), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip().replace("D", "E"))
    except ValueError:
        return None


def _as_str(value):
    return None if value is None else str(value)


def _first_present(header: FitsHeader, *keys):
    for key in keys:
        value = header.get(key)
        if value is not None:
            return value
    return None


def _default_filename(path: str) -> str:
    name = os.path.basename(path)
    return name[:-3] if name.endswith(".gz") else name


def _normalise_meta(header: FitsHeader, path: str, wavelength) -> dict:
    """The catalogue's view of a header: fixed lower-case keys, None when absent."""
    grid = _header_grid(header)
    if grid is None and wavelength is not None:
        first, last = math.log10(wavelength[0]), math.log10(wavelength[-1])
        grid = (first, (last - first) / (len(wavelength) - 1))
    meta = {
        "obsid": _as_int(header.get("OBSID")),
        "designation": _as_str(header.get("DESIG")),
        "ra": _as_float(header.get("RA")),
        "dec": _as_float(header.get("DEC")),
        "lmjd": _as_int(header.get("LMJD")),
        "mjd": _as_int(header.get("MJD")),
        "planid": _as_str(header.get("PLANID")),
        "spid": _as_int(header.get("SPID")),
        "fiberid": _as_int(header.get("FIBERID")),
    }
    for band in "ugriz":   # DR7/DR8: SNRG; DR1: SN_G
        meta["snr" + band] = _as_float(_first_present(header, "SNR" + band.upper(),
                                                      "SN_" + band.upper()))
    meta.update({
        "class": _as_str(header.get("CLASS")),
        "subclass": _as_str(header.get("SUBCLASS")),
        "z": _as_float(header.get("Z")),
        "z_err": _as_float(header.get("Z_ERR")),
        "filename": _as_str(header.get("FILENAME")) or _default_filename(path),
        "data_version": _as_str(header.get("DATA_V")),
        "loglam0": grid[0] if grid else None,
        "dloglam": grid[1] if grid else None,
    })
    return meta
