"""Choose LassoMLPNet hyperparameters by cross-validation on the training stars only.

The reference set is restricted and split exactly as in ``bench/train_vs_recipe.py``
(same Teff range, same star split); the held-out stars of that split are never read here.
The training stars are divided into ``--folds`` star-grouped folds; for every point of
``--grid`` a ``LassoMLPNet`` is trained on the other folds and scored (MAE per label) on
the fold's 10 < SNRg <= 20 spectra (``cv_mae``, what chooses) and 5 < SNRg <= 10 spectra
(``cv_mae_5_10``). Grid keys are ``LassoMLPNet`` parameters, plus ``train_snr``: the
training spectra, ``"10-20"`` (the paper's, the default) or ``"all"`` (every SNR of the
fitting folds' stars), and ``degraded_copies``: how many low-S/N copies
(``models.augment``, S/N 5-20) of each of the fitting stars' spectra above that range
join the training spectra (default ``DEFAULT_DEGRADED_COPIES``). Prints one JSON document:
the mean CV MAE of every grid point and the best point per label.

    python bench/tune_lasso_mlpnet.py --reference /tmp/sim-ref \\
        --grid '{"input_noise": [0, 0.5, 1, 1.5, 2, 3]}' > bench-tune.json
    python bench/tune_lasso_mlpnet.py --reference /tmp/sim-ref --grid '{"train_snr": ["10-20", "all"]}'
"""
import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models.augment import DEFAULT_DEGRADED_COPIES, featurise_degraded_copies  # noqa: E402
from models.lasso_mlpnet import LABELS, LassoMLPNet  # noqa: E402
from models.pipeline import featurise_files  # noqa: E402
from models.splits import group_kfold_indices  # noqa: E402
from models.training import training_rows  # noqa: E402

from train_vs_recipe import MILES_PREPROCESSING, load_reference, split_by_star, stars_in_range  # noqa: E402


def grid_points(grid):
    names = sorted(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        yield dict(zip(names, values))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("LAMOST_VAC_REFERENCE_SET", "/tmp/sim-ref"))
    parser.add_argument("--grid", default='{"input_noise": [0, 0.5, 1, 1.5, 2, 3]}',
                        help="JSON: LassoMLPNet parameter -> list of values")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--ensemble", type=int, default=5, help="networks per label while tuning")
    parser.add_argument("--seed", type=int, default=1, help="seed of the star split (as train_vs_recipe)")
    parser.add_argument("--teff-range", default="3500,6500")
    args = parser.parse_args()
    grid = json.loads(args.grid)

    table, teff_range = stars_in_range(load_reference(args.reference), args.teff_range)
    feature_set = featurise_files(table["path"], table["z"], MILES_PREPROCESSING)
    features = feature_set.features
    train, _ = split_by_star(table, np.isfinite(features).all(axis=1), args.seed, snr_range=None)
    train_idx = np.flatnonzero(train)        # every usable spectrum of train_vs_recipe's training stars
    stars = np.asarray(table["miles_id"])
    X, groups = features[train_idx], stars[train_idx]
    snrg = np.asarray(table["snrg"], dtype=float)[train_idx]
    labels = {k: np.asarray(table[k], dtype=float)[train_idx] for k in LABELS}
    folds = list(group_kfold_indices(groups, args.folds, np.random.default_rng(args.seed + 100)))
    paper_snr = (snrg > 10) & (snrg <= 20)
    low_snr = (snrg > 5) & (snrg <= 10)

    copies = featurise_degraded_copies(np.asarray(table["path"])[train_idx], feature_set.z[train_idx],
                                       snrg, max(grid.get("degraded_copies", [DEFAULT_DEGRADED_COPIES])),
                                       MILES_PREPROCESSING, seed=args.seed + 200)

    results = []
    for point in grid_points(grid):
        started = time.perf_counter()
        params = {k: v for k, v in point.items() if k not in ("train_snr", "degraded_copies")}
        point_copies = copies.first(point.get("degraded_copies", DEFAULT_DEGRADED_COPIES))
        trains_on = {"10-20": paper_snr, "all": np.ones(snrg.size, dtype=bool)}[point.get("train_snr", "10-20")]
        errors = {k: [] for k in LABELS}
        errors_low = {k: [] for k in LABELS}
        for fold_rows, score_rows in folds:
            fit = np.zeros(snrg.size, dtype=bool)
            fit[fold_rows] = trains_on[fold_rows]
            # copies of the fitting stars' spectra only, as in training (models.training)
            X_fit, y_fit, groups_fit, observed = training_rows(X, labels, groups, fit, point_copies)
            model = LassoMLPNet(n_members=args.ensemble, **{"random_state": 0, **params}).fit(
                X_fit, y_fit, groups=groups_fit, observed=observed)
            for rows, into in ((score_rows[paper_snr[score_rows]], errors),
                               (score_rows[low_snr[score_rows]], errors_low)):
                if rows.size == 0:
                    continue
                predicted = model.predict(X[rows])
                for k in LABELS:
                    into[k].append(np.abs(predicted[k] - labels[k][rows]))
        mae, mae_low = ({k: round(float(np.mean(np.concatenate(v))), 4) if v else None for k, v in e.items()}
                        for e in (errors, errors_low))
        results.append({"params": point, "cv_mae": mae, "cv_mae_5_10": mae_low,
                        "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    best = {k: min(results, key=lambda r: r["cv_mae"][k])["params"] for k in LABELS}
    print(json.dumps({"reference_set": os.path.abspath(args.reference), "teff_range": teff_range,
                      "n_train_spectra_10_20": int(paper_snr.sum()), "n_train_spectra_all": len(train_idx), "n_train_stars": int(np.unique(groups).size),
                      "folds": args.folds, "ensemble": args.ensemble, "grid": grid,
                      "results": results, "best_per_label": best}, indent=2))


if __name__ == "__main__":
    main()
