"""The line-content part of the OUT_OF_DISTRIBUTION flag, measured (README, "Out-of-distribution flag").

Takes a model saved by ``bench/calibration.py --save-model PATH`` (trained on the training
stars of the ``bench/train_vs_recipe.py`` split of the reference set), fits its line
profile on the same training spectra, and prints JSON: the threshold, the share of the
held-out spectra of the training range flagged per SNRg bin, of the MILES stars hotter
than 6,500 K, of line-free spectra (constant flux plus noise at SNR 5, 10, 20), and of
the real LAMOST spectra of ``../shared/data/lamost-real``.

    python bench/calibration.py --reference /tmp/sim-ref --save-model /tmp/calib/model.joblib
    python bench/line_content.py --reference /tmp/sim-ref --model /tmp/calib/model.joblib
"""
import argparse
import glob
import json
import os
import sys

import joblib
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models.pipeline import featurise_files  # noqa: E402

from train_vs_recipe import MILES_PREPROCESSING, load_reference, split_by_star, stars_in_range  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("LAMOST_VAC_REFERENCE_SET", "/tmp/sim-ref"))
    parser.add_argument("--model", required=True,
                        help="a model saved by bench/calibration.py --save-model (made here: trusted)")
    parser.add_argument("--real", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                       "data", "lamost-real"))
    parser.add_argument("--seed", type=int, default=1, help="seed of the star split (as train_vs_recipe)")
    args = parser.parse_args()

    model = joblib.load(args.model)
    everything = load_reference(args.reference)
    table, _ = stars_in_range(everything, "3500,6500")
    features = featurise_files(table["path"], table["z"], MILES_PREPROCESSING).features
    usable = np.isfinite(features).all(axis=1)
    train, test = split_by_star(table, usable, args.seed, snr_range=None)
    model._fit_line_content(features[train])
    threshold = model.line_content_threshold_

    def flagged(X):
        return float(np.mean(model.line_content(X) < threshold))

    snrg = np.asarray(table["snrg"], dtype=float)
    content = model.line_content(np.where(usable[:, None], features, 1.0))
    report = {"threshold": threshold, "training_median": float(np.median(content[train])),
              "held_out_spectra": int(test.sum()),
              "held_out_flagged": {f"{low}-{high}": float(np.mean(content[test & (snrg > low) & (snrg <= high)]
                                                                  < threshold))
                                   for low, high in ((5, 10), (10, 20), (20, 80))}}
    hot = everything[np.asarray(everything["teff"], dtype=float) > 6500]
    hot_features = featurise_files(hot["path"], hot["z"], MILES_PREPROCESSING).features
    report["teff_above_6500_flagged"] = flagged(hot_features[np.isfinite(hot_features).all(axis=1)])
    rng = np.random.default_rng(0)
    report["line_free_flagged"] = {f"snr_{snr}": flagged(1.0 + rng.standard_normal((200, features.shape[1])) / snr)
                                   for snr in (5, 10, 20)}
    report["real_lamost"] = {}
    for folder in sorted(glob.glob(os.path.join(args.real, "*"))):
        paths = sorted(glob.glob(os.path.join(folder, "**", "*.fits*"), recursive=True))
        # no catalogue here: each file header's Z is used (models.pipeline.redshift_to_use)
        real = featurise_files(paths, np.full(len(paths), np.nan), MILES_PREPROCESSING).features
        real = real[np.isfinite(real).all(axis=1)]
        values = model.line_content(real)
        report["real_lamost"][os.path.basename(folder)] = {
            "spectra": len(real), "flagged": int(np.sum(values < threshold)),
            "median": float(np.median(values)), "min": float(values.min())}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
