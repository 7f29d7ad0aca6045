"""Benchmark: models.readers.read_spectrum against astropy.io.fits on the same files.

Reads every real LAMOST file under <shared>/data/lamost-real plus every spectrum in an
optional simulated folder (lamost_sim.py output), once with our reader and once with
astropy (gzip-decompressing in memory first, as a pipeline would), and prints JSON:

    {"files": ..., "ms_per_file_ours": ..., "ms_per_file_astropy": ..., "ratio": ...}

ratio = astropy time / our time (how many times faster ours is).  Each reader is timed
as the best of --repeat passes over all files, after one warm-up pass that puts the
files in the OS page cache, so both sides pay for decompression and parsing, not disk.

Usage:  python bench/read_speed.py [SIM_DIR] [--shared DIR] [--repeat N]
"""
import argparse
import gzip
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))   # run from a checkout without installing

from models.readers import SpectrumReadError, read_spectrum  # noqa: E402

SPECTRUM_SUFFIXES = (".fits", ".fits.gz")


def spectrum_files(root: Path):
    return sorted(p for p in root.rglob("*") if p.name.endswith(SPECTRUM_SUFFIXES)
                  and p.is_file() and p.name.startswith("spec-"))


def read_with_ours(path):
    """Arrays and normalised meta, as the catalogue ingest uses them; False if unreadable."""
    try:
        read_spectrum(path)
    except SpectrumReadError:
        return False
    return True


def read_with_astropy(path):
    """The equivalent work with astropy: native arrays out, a few header values read."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    with fits.open(io.BytesIO(raw), memmap=False) as hdul:
        header = hdul[0].header
        if len(hdul) > 1:
            row = hdul[1].data[0]
            columns = [row[name] for name in ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK")]
        else:
            columns = list(hdul[0].data)
        arrays = [np.asarray(c).astype(t) for c, t in
                  zip(columns, (np.float32, np.float32, np.float64, np.int32, np.int32))]
        meta = [header.get(k) for k in ("OBSID", "RA", "DEC", "SNRG", "Z", "CLASS")]
    return bool(arrays) and meta is not None


def best_ms_per_file(reader, files, repeat):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for path in files:
            reader(path)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / len(files)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sim_dir", nargs="?", type=Path, help="lamost_sim.py output folder")
    parser.add_argument("--shared", type=Path,
                        default=Path(os.environ.get("LAMOST_VAC_SHARED", REPO_ROOT.parent / "shared")))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)

    files = spectrum_files(args.shared / "data" / "lamost-real")
    if args.sim_dir:
        files += spectrum_files(args.sim_dir)
    if not files:
        sys.exit(f"no spectra found under {args.shared / 'data' / 'lamost-real'} or {args.sim_dir}")
    for path in files:          # warm the page cache so neither side pays for disk
        path.read_bytes()

    unreadable = sum(not read_with_ours(path) for path in files)
    ours = best_ms_per_file(read_with_ours, files, args.repeat)
    theirs = best_ms_per_file(read_with_astropy, files, args.repeat)
    print(json.dumps({"files": len(files),
                      "ms_per_file_ours": round(ours, 3),
                      "ms_per_file_astropy": round(theirs, 3),
                      "ratio": round(theirs / ours, 2),
                      "unreadable_ours": unreadable,
                      "repeat": args.repeat}))


if __name__ == "__main__":
    main()
