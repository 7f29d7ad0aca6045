"""Throughput from spectrum files on disk to predictions, per core and on all cores.

Side by side in one run:
- this project: the fast FITS reader, batched vectorised preprocessing, batched ensemble
  prediction (``featurise_files`` + ``LassoMLPNet.predict``), on 1 process and on all;
- the straightforward way: astropy.io.fits per file, then per spectrum np.interp,
  scipy.signal.medfilt, an iterative np.polyfit continuum, and prediction spectrum by
  spectrum with the same model.

    python bench/predict_throughput.py --model model.joblib --reference /tmp/sim-ref [--limit 2000]
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy.signal import medfilt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models.artifact import load_model  # noqa: E402
from models.pipeline import featurise_files  # noqa: E402


def naive_features(path, z, config):
    """One spectrum, the way a first script would do it (same science, no batching)."""
    with fits.open(path) as hdus:
        if hdus[0].data is not None:
            flux, ivar, wave = (hdus[0].data[i].astype(float) for i in (0, 1, 2))
        else:
            row = hdus[1].data
            flux, ivar, wave = (row[c][0].astype(float) for c in ("FLUX", "IVAR", "WAVELENGTH"))
    rest = wave / (1 + z)
    grid = config.wavelength
    good = np.interp(np.log10(grid), np.log10(rest), (ivar > 0).astype(float)) > 0.999
    f = medfilt(np.interp(np.log10(grid), np.log10(rest), flux), 3)
    x = np.linspace(-1, 1, grid.size)
    keep = good.copy()
    for _ in range(config.continuum_iterations):
        coef = np.polyfit(x[keep], f[keep], config.continuum_order)
        cont = np.polyval(coef, x)
        resid = f - cont
        sigma = resid[keep].std()
        keep = good & (resid > -config.clip_low * sigma) & (resid < config.clip_high * sigma)
    return np.where(good, f / cont, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", default="/tmp/sim-ref")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--naive-limit", type=int, default=300)
    args = parser.parse_args()

    artifact = load_model(args.model)
    model, config = artifact["model"], artifact["preprocess"]
    catalogue = Table.read(os.path.join(args.reference, "lamost_catalog.csv"), format="ascii.csv")[:args.limit]
    paths = [os.path.join(args.reference, f) for f in catalogue["filename"]]
    z, snrg = np.asarray(catalogue["z"], float), np.asarray(catalogue["snrg"], float)
    for path in paths:                     # warm the page cache so every method reads from memory
        with open(path, "rb") as handle:
            handle.read()

    result = {"n_spectra": len(paths), "cores": os.cpu_count(), "model": artifact["version"]}
    for label, jobs in (("ours_1_process", 1), ("ours_all_cores", -1)):
        start = time.perf_counter()
        features, _, _ = featurise_files(paths, z, config, n_jobs=jobs)
        featurised = time.perf_counter()
        model.predict(features, snrg)
        done = time.perf_counter()
        result[label] = {"seconds": round(done - start, 2),
                         "spectra_per_second": round(len(paths) / (done - start), 1),
                         "featurise_ms_per_spectrum": round(1e3 * (featurised - start) / len(paths), 3),
                         "predict_ms_per_spectrum": round(1e3 * (done - featurised) / len(paths), 3)}

    n = min(args.naive_limit, len(paths))
    start = time.perf_counter()
    for i in range(n):
        row = naive_features(paths[i], z[i], config)[None, :]
        model.predict(row, snrg[i:i + 1])
    seconds = time.perf_counter() - start
    result["naive_1_process"] = {"n_spectra": n, "seconds": round(seconds, 2),
                                 "spectra_per_second": round(n / seconds, 1)}
    result["speedup_per_core"] = round(result["ours_1_process"]["spectra_per_second"]
                                       / result["naive_1_process"]["spectra_per_second"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
