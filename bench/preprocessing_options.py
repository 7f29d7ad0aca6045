"""Preprocessing options on the reference set: instrument-region mask and per-arm continuum.

Same data, star split and training spectra as ``bench/train_vs_recipe.py`` (MILES stars
with 3500 <= Teff <= 6500 K, 80/20 by star, training spectra 10 < SNRg <= 20, 3881-7400 A),
a reduced ensemble (``--ensemble``, default 3) per configuration:

- ``paper``: no instrument regions masked, one continuum polynomial;
- ``default``: this project's default (dichroic and O2 bands masked, one polynomial);
- ``per-arm``: the default regions, one polynomial per spectrograph arm.

For each: MAE on the held-out stars (all SNRg and per bin), the LASSO selections (pixels,
LARS steps, interior CV minimum), selected pixels per instrument region, and the flags:
OUT_OF_DISTRIBUTION and MASKED_SELECTED_PIXELS on held-out in-domain spectra and on the
spectra of the MILES stars outside 3500-6500 K (never trained on). Prints one JSON document.

    python bench/preprocessing_options.py --reference /tmp/sim-ref > bench-preprocessing.json
"""
import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from train_vs_recipe import MILES_PREPROCESSING, load_reference, split_by_star, stars_in_range  # noqa: E402

from models.flags import MASKED_SELECTED_PIXELS, OUT_OF_DISTRIBUTION  # noqa: E402
from models.lasso_mlpnet import LABELS, LassoMLPNet  # noqa: E402
from models.metrics import accuracy_by_snr  # noqa: E402
from models.pipeline import featurise_files, selected_pixels_by_region  # noqa: E402

CONFIGS = {
    "paper": dataclasses.replace(MILES_PREPROCESSING, masked_regions=()),
    "default": MILES_PREPROCESSING,
    "per-arm": dataclasses.replace(MILES_PREPROCESSING, continuum="per-arm"),
    "no-despike": dataclasses.replace(MILES_PREPROCESSING, despike_sigma=0.0),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("LAMOST_VAC_REFERENCE_SET", "/tmp/sim-ref"))
    parser.add_argument("--ensemble", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1, help="seed of the star split")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of "
                        + ", ".join(CONFIGS))
    parser.add_argument("--jobs", type=int, default=-1)
    args = parser.parse_args()

    table = load_reference(args.reference)
    in_range, _ = stars_in_range(table, "3500,6500")
    in_range_rows = np.isin(np.asarray(table["obsid"]), np.asarray(in_range["obsid"]))
    snrg = np.asarray(table["snrg"], dtype=float)
    labels = {k: np.asarray(table[k], dtype=float) for k in LABELS}
    results = {"reference_set": os.path.abspath(args.reference), "ensemble": args.ensemble,
               "seed": args.seed, "configs": {}}
    for name in args.configs.split(","):
        config = CONFIGS[name]
        start = time.perf_counter()
        feature_set = featurise_files(table["path"], table["z"], config, n_jobs=args.jobs)
        usable = np.isfinite(feature_set.features).all(axis=1)
        # the split of train_vs_recipe, over the in-range stars only
        train = np.zeros(len(table), dtype=bool)
        test = np.zeros(len(table), dtype=bool)
        part_train, part_test = split_by_star(in_range, usable[in_range_rows], args.seed)
        train[np.flatnonzero(in_range_rows)[part_train]] = True
        test[np.flatnonzero(in_range_rows)[part_test]] = True
        outside = usable & ~in_range_rows
        model = LassoMLPNet(n_members=args.ensemble, n_jobs=args.jobs, random_state=0).fit(
            feature_set.features[train], {k: v[train] for k, v in labels.items()},
            groups=np.asarray(table["miles_id"])[train])
        predicted = model.predict(feature_set.features, snrg, masked=feature_set.masked)
        flags = predicted["flags"]
        teff = labels["teff"]

        def rate(bit, rows):
            return round(float(np.mean(flags[rows] & bit > 0)), 4) if rows.any() else None

        results["configs"][name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "n_train": int(train.sum()), "n_test": int(test.sum()),
            "held_out": accuracy_by_snr({k: predicted[k][test] for k in LABELS},
                                        {k: v[test] for k, v in labels.items()}, snrg[test]),
            "lasso": {label: {"n_selected": int(e.selector_.n_selected_), "n_steps": int(e.selector_.n_steps_),
                              "interior_minimum": bool(e.selector_.interior_minimum_)}
                      for label, e in model.estimators_.items()},
            "selected_per_region": selected_pixels_by_region(model, config),
            "ood_threshold": model.ood_threshold_,
            "out_of_distribution_rate": {
                "held_out_in_domain": rate(OUT_OF_DISTRIBUTION, test),
                "outside_teff_6500_7000": rate(OUT_OF_DISTRIBUTION, outside & (teff > 6500) & (teff <= 7000)),
                "outside_teff_above_7000": rate(OUT_OF_DISTRIBUTION, outside & (teff > 7000)),
                "outside_teff_below_3500": rate(OUT_OF_DISTRIBUTION, outside & (teff < 3500))},
            "masked_selected_rate_held_out": rate(MASKED_SELECTED_PIXELS, test),
        }
        print(json.dumps({name: results["configs"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
