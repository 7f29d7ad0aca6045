"""Training time and accuracy: lamost-vac's LASSO-MLPNet against the published recipe.

Both are trained on the same spectra of the reference set (../shared/data/README.md),
split by star 80/20, training spectra 10 < SNRg <= 20 as in the paper, wavelength range
3881-7400 A (MILES coverage), the same preprocessing; both are scored on the held-out
stars at every SNR. Prints one JSON document.

Stars: by default only the MILES stars with 3500 <= Teff <= 6500 K (610 of 808, 3,660
spectra), the range of the paper's training sample (LAMOST x APOGEE stars) and of the
method's valid domain; ``--teff-range 0,1e6`` takes every star (O to M).

The recipe: StandardScaler; per label sklearn LassoCV (50 alphas x 10 folds); sklearn
MLPRegressor with the published hidden sizes, logistic activation, early stopping, Teff as
log10(Teff). This project: ``LassoMLPNet`` with its defaults (LARS path with star-grouped
10-fold CV, an ensemble of ``--ensemble`` float32 networks per label).

    python ../shared/tools/lamost_sim.py --miles ../shared/data/miles --out /tmp/sim-ref \\
        --per-star "4x10-20,1x5-10,1x20-80" --seed 1
    python bench/train_vs_recipe.py --reference /tmp/sim-ref > bench-train.json
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
from astropy.table import Table, join

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models.lasso_mlpnet import LABELS, PUBLISHED_HIDDEN, LassoMLPNet  # noqa: E402
from models.metrics import accuracy_by_snr  # noqa: E402
from models.pipeline import featurise_files  # noqa: E402
from models.preprocess import PreprocessConfig  # noqa: E402
from models.splits import group_holdout  # noqa: E402


MILES_PREPROCESSING = PreprocessConfig(wave_min=3881.0, wave_max=7400.0)   # MILES' coverage


def load_reference(folder):
    catalogue = Table.read(os.path.join(folder, "lamost_catalog.csv"), format="ascii.csv")
    truth = Table.read(os.path.join(folder, "truth.csv"), format="ascii.csv")
    truth.rename_column("snrg", "snrg_measured")
    table = join(catalogue[["obsid", "filename", "z", "snrg"]],
                 truth[["obsid", "miles_id", "teff", "logg", "feh"]], keys="obsid")
    table["path"] = [os.path.join(folder, f) for f in table["filename"]]
    return table


def stars_in_range(table, teff_range):
    """The rows whose reference Teff lies in ``teff_range`` ("MIN,MAX", K), and the range."""
    teff_min, teff_max = (float(v) for v in teff_range.split(","))
    return table[(table["teff"] >= teff_min) & (table["teff"] <= teff_max)], [teff_min, teff_max]


def split_by_star(table, usable, seed):
    """Boolean (train, test) rows: 20% of the stars held out (drawn with ``seed``); the
    training spectra are the other stars' usable spectra with 10 < SNRg <= 20 (the paper's)."""
    train_idx, test_idx = group_holdout(len(table), np.asarray(table["miles_id"]), 0.2,
                                        np.random.default_rng(seed))
    snrg = np.asarray(table["snrg"], dtype=float)
    train = np.zeros(len(table), dtype=bool)
    train[train_idx] = True
    train &= usable & (snrg > 10) & (snrg <= 20)
    test = np.zeros(len(table), dtype=bool)
    test[test_idx] = True
    return train, test & usable


class PublishedRecipe:
    """StandardScaler + LassoCV + MLPRegressor per label, as the paper describes it."""

    def __init__(self, n_alphas=50, cv=10, learning_rate_init=1e-3, random_state=0):
        self.n_alphas = n_alphas
        self.cv = cv
        self.learning_rate_init = learning_rate_init
        self.random_state = random_state

    def fit(self, X, labels):
        from sklearn.linear_model import LassoCV
        from sklearn.neural_network import MLPRegressor
        from sklearn.preprocessing import StandardScaler

        self.scaler_ = StandardScaler().fit(X)
        X = self.scaler_.transform(X)
        self.support_, self.networks_ = {}, {}
        for label in LABELS:
            y = np.log10(labels[label]) if label == "teff" else labels[label]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")          # LassoCV convergence chatter
                lasso = LassoCV(alphas=self.n_alphas, cv=self.cv, n_jobs=-1,
                                random_state=self.random_state).fit(X, y)
            self.support_[label] = lasso.coef_ != 0
            self.networks_[label] = MLPRegressor(
                hidden_layer_sizes=PUBLISHED_HIDDEN[label], activation="logistic",
                learning_rate_init=self.learning_rate_init, early_stopping=True, max_iter=1000,
                random_state=self.random_state).fit(X[:, self.support_[label]], y)
        return self

    def predict(self, X):
        X = self.scaler_.transform(X)
        out = {}
        for label in LABELS:
            pred = self.networks_[label].predict(X[:, self.support_[label]])
            out[label] = 10**pred if label == "teff" else pred
        return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("LAMOST_VAC_REFERENCE_SET", "/tmp/sim-ref"),
                        help="output folder of lamost_sim.py (the reference set)")
    parser.add_argument("--ensemble", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1, help="seed of the star split")
    parser.add_argument("--skip-recipe", action="store_true", help="measure this project only")
    parser.add_argument("--teff-range", default="3500,6500",
                        help="keep the stars whose reference Teff (K) lies in this range")
    args = parser.parse_args()

    table, teff_range = stars_in_range(load_reference(args.reference), args.teff_range)
    start = time.perf_counter()
    features, _, errors = featurise_files(table["path"], table["z"], MILES_PREPROCESSING)
    preprocess_seconds = time.perf_counter() - start
    usable = np.isfinite(features).all(axis=1)
    train, test = split_by_star(table, usable, args.seed)
    snrg = np.asarray(table["snrg"], dtype=float)
    labels = {k: np.asarray(table[k], dtype=float) for k in LABELS}
    reference = {k: v[test] for k, v in labels.items()}

    result = {
        "reference_set": os.path.abspath(args.reference), "teff_range": teff_range,
        "n_spectra": len(table), "n_unreadable": len(errors), "n_unusable": int((~usable).sum()),
        "n_train": int(train.sum()), "n_train_stars": int(np.unique(table["miles_id"][train]).size),
        "n_test": int(test.sum()), "n_test_stars": int(np.unique(table["miles_id"][test]).size),
        "cores": os.cpu_count(),
        "preprocess_seconds": round(preprocess_seconds, 2),
        "preprocess_spectra_per_second": round(len(table) / preprocess_seconds, 1),
    }

    start = time.perf_counter()
    ours = LassoMLPNet(n_members=args.ensemble, random_state=0).fit(
        features[train], {k: v[train] for k, v in labels.items()}, groups=np.asarray(table["miles_id"])[train])
    result["ours_train_seconds"] = round(time.perf_counter() - start, 1)
    result["ours_ensemble"] = args.ensemble
    result["ours_selected_pixels"] = {k: int(e.support_.sum()) for k, e in ours.estimators_.items()}
    result["ours"] = accuracy_by_snr(ours.predict(features[test], snrg[test]), reference, snrg[test])
    print(json.dumps({k: v for k, v in result.items() if k != "recipe"}), file=sys.stderr, flush=True)

    if not args.skip_recipe:
        start = time.perf_counter()
        recipe = PublishedRecipe().fit(features[train], {k: v[train] for k, v in labels.items()})
        result["recipe_train_seconds"] = round(time.perf_counter() - start, 1)
        result["recipe_selected_pixels"] = {k: int(s.sum()) for k, s in recipe.support_.items()}
        result["recipe"] = accuracy_by_snr(recipe.predict(features[test]), reference, snrg[test])
        result["speedup"] = round(result["recipe_train_seconds"] / result["ours_train_seconds"], 2)
        result["mae_change_10_20"] = {
            k: round(result["ours"][k]["10-20"]["mae"] / result["recipe"][k]["10-20"]["mae"] - 1, 4)
            for k in LABELS}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
