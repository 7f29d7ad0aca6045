"""Training time and accuracy: lamost-vac's LASSO-MLPNet against the published recipe, fairly.

Both are trained on the same stars of the reference set (../shared/data/README.md), split by
star 80/20, wavelength range 3881-7400 A (MILES coverage), the same preprocessing; both are
scored on the held-out stars at every SNR. Prints one JSON document, then (after a line
``--- markdown ---``) the table that goes in the README.

Stars: by default only the MILES stars with 3500 <= Teff <= 6500 K (610 of 808, 3,660
spectra), the range of the paper's training sample and of the method's valid domain;
``--teff-range 0,1e6`` takes every star (O to M).

The recipe exactly as published (``PublishedRecipe``): StandardScaler; per label sklearn
LassoCV (50 alphas x 10 folds); sklearn MLPRegressor with the published hidden sizes
(models/lasso_mlpnet.py PUBLISHED_HIDDEN) and the authors' notebook's learning rates
(Teff 9e-4, log g 2e-5, [Fe/H] 3e-4), logistic activation, early stopping (sklearn's 10%
validation split), max_iter 2000, Teff as log10(Teff). Convergence warnings are counted and
reported, not silenced. It runs in every configuration of ``--configurations`` (default:
all eight):

    10-20 / all-snr   training spectra: 10 < SNRg <= 20 as in the paper (``10-20`` alone
                      is the recipe as published) / every SNR of the training stars
    +std              the target standardised (zero mean, unit variance) for the network
    +star-folds       LassoCV folds grouped by star (sklearn GroupKFold), not by spectrum

The recipe's best configuration per label is chosen by star-grouped ``--select-folds``-fold
cross-validation on the TRAINING stars only (MAE on the fold's 10 < SNRg <= 20 spectra);
the held-out stars never take part in the choice. ``--select-folds 0`` skips that CV and
compares with the configuration that is best on the held-out stars: a choice that favours
the recipe, at a sixth of the cost. Every configuration is then trained on
all training stars and scored on the held-out stars; the report gives the best-by-CV
configuration per label and, for transparency, the best on the held-out stars.

This project: ``LassoMLPNet`` with its defaults (training spectra: ``--ours-train-snr``),
as an ensemble of ``--ensemble`` networks per label and as a single network
(``n_members=1``), so the gain of the ensemble is visible. The training times of every
configuration and of ours come from the same run.

Real numbers (quiet machine; hours: the published networks are large and every recipe
configuration is trained select-folds + 1 times):

    python ../shared/tools/lamost_sim.py --miles ../shared/data/miles --out /tmp/sim-ref \\
        --per-star "4x10-20,1x5-10,1x20-80" --seed 1
    python bench/train_vs_recipe.py --reference /tmp/sim-ref > bench-train.txt

Smoke run (minutes): ``--max-stars 60 --n-alphas 5 --cv 3 --select-folds 2 --max-iter 50
--ensemble 2``.
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

from models.augment import DEFAULT_DEGRADED_COPIES, featurise_degraded_copies  # noqa: E402
from models.lasso_mlpnet import (LABELS, PAPER_SNR_RANGE, PUBLISHED_HIDDEN,  # noqa: E402
                                 PUBLISHED_LEARNING_RATE, LassoMLPNet)
from models.metrics import accuracy_by_snr  # noqa: E402
from models.pipeline import featurise_files  # noqa: E402
from models.preprocess import PreprocessConfig  # noqa: E402
from models.splits import group_holdout, group_kfold_indices  # noqa: E402
from models.training import training_rows  # noqa: E402


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


def split_by_star(table, usable, seed, snr_range=(10.0, 20.0)):
    """Boolean (train, test) rows: 20% of the stars held out (drawn with ``seed``); the
    training spectra are the other stars' usable spectra with ``snr_range[0] < SNRg <=
    snr_range[1]`` (default the paper's 10-20; None: every SNR)."""
    train_idx, test_idx = group_holdout(len(table), np.asarray(table["miles_id"]), 0.2,
                                        np.random.default_rng(seed))
    snrg = np.asarray(table["snrg"], dtype=float)
    train = np.zeros(len(table), dtype=bool)
    train[train_idx] = True
    train &= usable
    if snr_range is not None:
        train &= (snrg > snr_range[0]) & (snrg <= snr_range[1])
    test = np.zeros(len(table), dtype=bool)
    test[test_idx] = True
    return train, test & usable


def limit_stars(table, max_stars, seed):
    """At most ``max_stars`` stars of ``table`` (drawn with ``seed``), all of their rows."""
    stars = np.unique(np.asarray(table["miles_id"]))
    if max_stars is None or stars.size <= max_stars:
        return table
    keep = np.random.default_rng(seed).choice(stars, size=max_stars, replace=False)
    return table[np.isin(np.asarray(table["miles_id"]), keep)]


class PublishedRecipe:
    """StandardScaler + LassoCV + MLPRegressor per label, as the paper and the authors'
    notebook give it (the defaults); ``standardise_target`` and ``group_folds`` (LassoCV
    folds by star, needs ``groups`` in ``fit``) are the bench's variations in its favour.

    After ``fit``: ``support_`` (selected pixels), ``networks_``, ``fit_seconds_`` and
    ``convergence_warnings_`` ({label: {"lasso": n, "mlp": n}}) per label.
    """

    def __init__(self, n_alphas=50, cv=10, learning_rate_init=None, max_iter=2000,
                 hidden_layer_sizes=None, standardise_target=False, group_folds=False,
                 n_jobs=-1, random_state=0):
        self.n_alphas = n_alphas
        self.cv = cv
        self.learning_rate_init = learning_rate_init      # None: PUBLISHED_LEARNING_RATE
        self.max_iter = max_iter
        self.hidden_layer_sizes = hidden_layer_sizes      # None: PUBLISHED_HIDDEN
        self.standardise_target = standardise_target
        self.group_folds = group_folds
        self.n_jobs = n_jobs
        self.random_state = random_state

    def learning_rate(self, label):
        if self.learning_rate_init is None:
            return PUBLISHED_LEARNING_RATE[label]
        return self.learning_rate_init

    def fit(self, X, labels, groups=None, labels_to_fit=LABELS):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LassoCV
        from sklearn.model_selection import GroupKFold
        from sklearn.neural_network import MLPRegressor
        from sklearn.preprocessing import StandardScaler

        if self.group_folds and groups is None:
            raise ValueError("group_folds=True needs the star of every spectrum (groups)")
        started = time.perf_counter()
        self.scaler_ = StandardScaler().fit(X)
        X = self.scaler_.transform(X)
        scaler_seconds = time.perf_counter() - started
        self.support_, self.networks_, self.target_scale_ = {}, {}, {}
        self.fit_seconds_, self.convergence_warnings_, self.n_iter_ = {}, {}, {}
        hidden = self.hidden_layer_sizes or PUBLISHED_HIDDEN
        for label in labels_to_fit:
            started = time.perf_counter()
            y = np.log10(labels[label]) if label == "teff" else np.asarray(labels[label], dtype=float)
            centre, scale = (y.mean(), y.std()) if self.standardise_target else (0.0, 1.0)
            self.target_scale_[label] = (centre, scale or 1.0)
            y = (y - centre) / (scale or 1.0)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                if self.group_folds:      # the splits themselves: no metadata routing needed
                    folds = list(GroupKFold(n_splits=self.cv).split(X, y, groups))
                    lasso = LassoCV(alphas=self.n_alphas, cv=folds, n_jobs=self.n_jobs).fit(X, y)
                else:
                    lasso = LassoCV(alphas=self.n_alphas, cv=self.cv, n_jobs=self.n_jobs,
                                    random_state=self.random_state).fit(X, y)
                n_lasso = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
                support = lasso.coef_ != 0
                if not support.any():                  # an all-zero LASSO: keep the best pixel
                    support[np.argmax(np.abs(X.T @ (y - y.mean())))] = True
                network = MLPRegressor(
                    hidden_layer_sizes=hidden[label], activation="logistic",
                    learning_rate_init=self.learning_rate(label), early_stopping=True,
                    max_iter=self.max_iter, random_state=self.random_state).fit(X[:, support], y)
                n_mlp = sum(issubclass(w.category, ConvergenceWarning) for w in caught) - n_lasso
            self.support_[label], self.networks_[label] = support, network
            self.n_iter_[label] = int(network.n_iter_)
            self.convergence_warnings_[label] = {"lasso": int(n_lasso), "mlp": int(n_mlp)}
            self.fit_seconds_[label] = time.perf_counter() - started + scaler_seconds / len(labels_to_fit)
        return self

    def predict(self, X):
        X = self.scaler_.transform(X)
        out = {}
        for label, network in self.networks_.items():
            centre, scale = self.target_scale_[label]
            pred = network.predict(X[:, self.support_[label]]) * scale + centre
            out[label] = 10**pred if label == "teff" else pred
        return out


def recipe_configurations():
    """name -> (training SNR range or None for all, PublishedRecipe keyword arguments)."""
    out = {}
    for snr_name, snr in (("10-20", PAPER_SNR_RANGE), ("all-snr", None)):
        for std in (False, True):
            for star_folds in (False, True):
                name = snr_name + ("+std" if std else "") + ("+star-folds" if star_folds else "")
                out[name] = (snr, {"standardise_target": std, "group_folds": star_folds})
    return out


CONFIGURATIONS = recipe_configurations()
AS_PUBLISHED = "10-20"


def in_snr(snrg, snr_range):
    if snr_range is None:
        return np.ones(len(snrg), dtype=bool)
    return (snrg > snr_range[0]) & (snrg <= snr_range[1])


def cross_validated_mae(features, labels, snrg, stars, rows, snr_range, recipe_params, folds, seed):
    """{label: MAE} of the recipe on star-grouped folds of ``rows`` (the training stars):
    fitted on the other folds' spectra in ``snr_range``, scored on the fold's 10-20 spectra."""
    rows = np.flatnonzero(rows)
    errors = {k: [] for k in LABELS}
    for fit, score in group_kfold_indices(stars[rows], folds, np.random.default_rng(seed + 100)):
        fit_rows = rows[fit][in_snr(snrg[rows[fit]], snr_range)]
        score_rows = rows[score][in_snr(snrg[rows[score]], PAPER_SNR_RANGE)]
        recipe = PublishedRecipe(**recipe_params).fit(
            features[fit_rows], {k: v[fit_rows] for k, v in labels.items()}, groups=stars[fit_rows])
        predicted = recipe.predict(features[score_rows])
        for k in LABELS:
            errors[k].append(np.abs(predicted[k] - labels[k][score_rows]))
    return {k: float(np.mean(np.concatenate(v))) for k, v in errors.items()}


def _mae(accuracy, label, snr_bin):
    return accuracy[label][snr_bin]["mae"]


def markdown_table(result):
    """The README's table: MAE per label at 5-10, 10-20 and all SNRs on held-out stars."""
    bins = ("5-10", "10-20", "all")
    head = ["Method (configuration)"] + [f"{k} MAE {b}" for k in LABELS for b in bins] + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, accuracy, seconds):
        cells = [f"{_mae(accuracy, k, b):.4g}" if _mae(accuracy, k, b) is not None else "-"
                 for k in LABELS for b in bins]
        lines.append("| " + " | ".join([name, *cells, f"{seconds:.0f}"]) + " |")

    row(f"lamost-vac, {result['ours_ensemble']} networks per label, trained on {result['ours_train_snr']}, "
        f"{result['ours_degraded_copies']['per_spectrum']} degraded copies per spectrum above SNRg 20",
        result["ours"], result["ours_train_seconds"])
    row("lamost-vac, 1 network per label", result["ours_single"], result["ours_single_train_seconds"])
    for name, other in result.get("ours_other_train_snr", {}).items():
        row(f"lamost-vac, {result['ours_ensemble']} networks per label, trained on {name}",
            other["accuracy"], other["train_seconds"])
    if "recipe_best" in result:
        best = result["recipe_best"]
        row(f"recipe, best configuration per label by {best['chosen_by']} ("
            + ", ".join(f"{k}: {best['configuration'][k]}" for k in LABELS) + ")",
            best["held_out"], best["train_seconds"])
        for name, config in result["recipe_configurations"].items():
            row(f"recipe {name}" + (" (as published)" if name == AS_PUBLISHED else ""),
                config["held_out"], config["train_seconds"])
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("LAMOST_VAC_REFERENCE_SET", "/tmp/sim-ref"),
                        help="output folder of lamost_sim.py (the reference set)")
    parser.add_argument("--ensemble", type=int, default=10, help="our networks per label")
    parser.add_argument("--also-ours-train-snr", choices=("10-20", "all-snr"), default=None,
                        help="also train our ensemble on these spectra (another row)")
    parser.add_argument("--ours-train-snr", choices=("10-20", "all-snr"), default="all-snr",
                        help="our training spectra (default all-snr, as train's default)")
    parser.add_argument("--ours-degraded-copies", type=int, default=DEFAULT_DEGRADED_COPIES,
                        help="low-S/N copies of each of our training stars' spectra above SNRg 20 "
                             "(default %(default)s, as train's; models.augment)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the star split")
    parser.add_argument("--skip-recipe", action="store_true", help="measure this project only")
    parser.add_argument("--teff-range", default="3500,6500",
                        help="keep the stars whose reference Teff (K) lies in this range")
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS),
                        help="comma-separated recipe configurations (default: all): "
                             + ", ".join(CONFIGURATIONS))
    parser.add_argument("--select-folds", type=int, default=5,
                        help="star-grouped CV folds on the training stars choosing the recipe's "
                             "configuration per label (default 5); 0: no CV, the recipe is "
                             "compared in its best configuration on the held-out stars (its "
                             "most favourable pick, at 1/(select-folds + 1) of the cost)")
    shrink = parser.add_argument_group("shrinking for a smoke run (defaults: as published)")
    shrink.add_argument("--max-stars", type=int, default=None, help="use at most this many stars")
    shrink.add_argument("--n-alphas", type=int, default=50, help="LassoCV alphas (published 50)")
    shrink.add_argument("--cv", type=int, default=10, help="LassoCV folds (published 10)")
    shrink.add_argument("--max-iter", type=int, default=2000, help="MLPRegressor max_iter (published 2000)")
    args = parser.parse_args(argv)
    if args.select_folds < 0 or args.select_folds == 1:
        parser.error("--select-folds: 0 (no CV) or at least 2 folds")
    names = [n.strip() for n in args.configurations.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGURATIONS]
    if unknown or not names:
        parser.error(f"--configurations: unknown {', '.join(unknown) or '(none given)'}; "
                     f"choose among {', '.join(CONFIGURATIONS)}")

    table, teff_range = stars_in_range(load_reference(args.reference), args.teff_range)
    table = limit_stars(table, args.max_stars, args.seed)
    start = time.perf_counter()
    feature_set = featurise_files(table["path"], table["z"], MILES_PREPROCESSING)
    features, errors = feature_set.features, feature_set.errors
    preprocess_seconds = time.perf_counter() - start
    usable = np.isfinite(features).all(axis=1)
    train_all, test = split_by_star(table, usable, args.seed, snr_range=None)
    snrg = np.asarray(table["snrg"], dtype=float)
    stars = np.asarray(table["miles_id"])
    labels = {k: np.asarray(table[k], dtype=float) for k in LABELS}
    reference = {k: v[test] for k, v in labels.items()}

    result = {
        "reference_set": os.path.abspath(args.reference), "teff_range": teff_range,
        "n_spectra": len(table), "n_unreadable": len(errors), "n_unusable": int((~usable).sum()),
        "n_train_stars": int(np.unique(stars[train_all]).size),
        "n_train_10_20": int((train_all & in_snr(snrg, PAPER_SNR_RANGE)).sum()),
        "n_train_all_snr": int(train_all.sum()),
        "n_test": int(test.sum()), "n_test_stars": int(np.unique(stars[test]).size),
        "cores": os.cpu_count(),
        "preprocess_seconds": round(preprocess_seconds, 2),
        "preprocess_spectra_per_second": round(len(table) / preprocess_seconds, 1),
        "shrunk": {k: getattr(args, k) for k in ("max_stars", "n_alphas", "cv", "max_iter")},
    }

    ours_rows = train_all & in_snr(snrg, PAPER_SNR_RANGE if args.ours_train_snr == "10-20" else None)
    result["ours_train_snr"] = args.ours_train_snr
    start = time.perf_counter()
    # copies of the training stars' spectra only: the held-out stars are never read
    copies = featurise_degraded_copies(table["path"], feature_set.z, snrg, args.ours_degraded_copies,
                                       MILES_PREPROCESSING, usable=train_all, seed=args.seed)
    copy_seconds = time.perf_counter() - start      # part of our training time
    result["ours_degraded_copies"] = {"per_spectrum": args.ours_degraded_copies, "n": int(copies.source.size),
                                      "seconds": round(copy_seconds, 1)}
    for key, members in (("ours", args.ensemble), ("ours_single", 1)):
        start = time.perf_counter()
        X, y, groups, observed = training_rows(features, labels, stars, ours_rows, copies)
        ours = LassoMLPNet(n_members=members, random_state=0).fit(X, y, groups=groups, observed=observed)
        result[f"{key}_train_seconds"] = round(time.perf_counter() - start + copy_seconds, 1)
        result[key] = accuracy_by_snr(ours.predict(features[test], snrg[test]), reference, snrg[test])
        if key == "ours":
            result["ours_ensemble"] = members
            result["ours_selected_pixels"] = {k: int(e.support_.sum()) for k, e in ours.estimators_.items()}
        print(json.dumps({key: result[key], "seconds": result[f"{key}_train_seconds"]}),
              file=sys.stderr, flush=True)
    if args.also_ours_train_snr and args.also_ours_train_snr != args.ours_train_snr:
        rows = train_all & in_snr(snrg, PAPER_SNR_RANGE if args.also_ours_train_snr == "10-20" else None)
        start = time.perf_counter()
        X, y, groups, observed = training_rows(features, labels, stars, rows, copies)
        ours = LassoMLPNet(n_members=args.ensemble, random_state=0).fit(X, y, groups=groups, observed=observed)
        result["ours_other_train_snr"] = {args.also_ours_train_snr: {
            "train_seconds": round(time.perf_counter() - start, 1),
            "accuracy": accuracy_by_snr(ours.predict(features[test], snrg[test]), reference, snrg[test])}}

    if not args.skip_recipe:
        shrunk = {"n_alphas": args.n_alphas, "cv": args.cv, "max_iter": args.max_iter}
        configs = {}
        for name in names:
            snr_range, params = CONFIGURATIONS[name]
            params = {**params, **shrunk}
            start = time.perf_counter()
            cv_mae = cross_validated_mae(features, labels, snrg, stars, train_all, snr_range, params,
                                         args.select_folds, args.seed) if args.select_folds else None
            cv_seconds = time.perf_counter() - start
            rows = train_all & in_snr(snrg, snr_range)
            recipe = PublishedRecipe(**params).fit(
                features[rows], {k: v[rows] for k, v in labels.items()}, groups=stars[rows])
            configs[name] = {
                "train_snr": "10-20" if snr_range else "all", **{k: params[k] for k in sorted(params)},
                "n_train": int(rows.sum()),
                "train_seconds": round(sum(recipe.fit_seconds_.values()), 1),
                "train_seconds_per_label": {k: round(v, 1) for k, v in recipe.fit_seconds_.items()},
                "cv_seconds": round(cv_seconds, 1),
                "cv_mae_10_20": cv_mae and {k: round(v, 5) for k, v in cv_mae.items()},
                "selected_pixels": {k: int(s.sum()) for k, s in recipe.support_.items()},
                "n_iter": recipe.n_iter_, "convergence_warnings": recipe.convergence_warnings_,
                "learning_rate": {k: recipe.learning_rate(k) for k in LABELS},
                "held_out": accuracy_by_snr(recipe.predict(features[test]), reference, snrg[test]),
            }
            # held-out MAE too: a run stopped early still tells what it measured
            print(json.dumps({name: {**{k: v for k, v in configs[name].items() if k != "held_out"},
                                     "held_out_mae": {k: {b: _mae(configs[name]["held_out"], k, b)
                                                          for b in ("5-10", "10-20", "all")} for k in LABELS}}}),
                  file=sys.stderr, flush=True)
        result["recipe_configurations"] = configs
        result["recipe_best_on_held_out_10_20"] = {
            k: min(configs, key=lambda n: configs[n]["held_out"][k]["10-20"]["mae"] or np.inf) for k in LABELS}
        if args.select_folds:
            chosen_by = "star-grouped CV on the training stars"
            choice = {k: min(configs, key=lambda n: configs[n]["cv_mae_10_20"][k]) for k in LABELS}
        else:       # no CV: the recipe gets its most favourable pick, the best on the held-out stars
            chosen_by = "held-out MAE at 10-20 (no CV: the recipe's most favourable pick)"
            choice = result["recipe_best_on_held_out_10_20"]
        result["recipe_best"] = best = {
            "chosen_by": chosen_by, "configuration": choice,
            "held_out": {k: configs[choice[k]]["held_out"][k] for k in LABELS},
            "train_seconds": round(sum(configs[choice[k]]["train_seconds_per_label"][k] for k in LABELS), 1),
        }
        result["mae_change_vs_recipe_best"] = {
            b: {k: round(_mae(result["ours"], k, b) / _mae(best["held_out"], k, b) - 1, 4)
                if _mae(result["ours"], k, b) and _mae(best["held_out"], k, b) else None for k in LABELS}
            for b in ("5-10", "10-20")}
        result["speedup_vs_recipe_best"] = round(best["train_seconds"] / result["ours_train_seconds"], 2)
    print(json.dumps(result, indent=2))
    print("--- markdown ---")
    print(markdown_table(result))
    return result

if __name__ == "__main__":
    main()
