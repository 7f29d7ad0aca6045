"""Are the quoted uncertainties honest? Coverage of ``<label>_err`` on held-out stars.

The reference set (../shared/data/README.md) is restricted and split by star exactly as in
``bench/train_vs_recipe.py`` (3500 <= Teff <= 6500 K, 20% of the stars held out with seed
1). The model is trained with ``models.training.train_lasso_mlpnet`` -- the recipe of
``train-files`` -- on the other stars' spectra in ``--snr-range`` (default: the project's
default, every SNRg of the valid range; ``10,20`` is the paper's); its uncertainties are calibrated on out-of-sample predictions of
those training stars at every SNRg (cross-fitting by default, ``--holdout 0.15`` for the
older hold-out calibration). The held-out stars are then predicted at every SNRg and, per
label and SNRg bin, the bench reports MAE, mu, sigma, the rms z-score and the fractions of
residuals within +-1 and +-2 ``_err``. Criteria, for every label and every bin with at
least 30 held-out spectra: 62-74% within +-1, 92-98% within +-2.

The held-out split has 122 stars, so its small bins (about 60 spectra at 20-40 and 40-80)
pass or miss the 12-point window largely by chance: ``pass_probability_if_calibrated`` gives,
per bin, the chance that a perfectly calibrated Gaussian error passes. ``every_star`` repeats
the criteria on every star of the split, five times the spectra: the training stars'
cross-fitted predictions (each from networks trained without the star's fold) with errors
from the error model re-fitted without the star's fold (``cross_validated_sigma``), pooled
with the held-out stars.

``every_star.residual_tails`` (and the second markdown table) says, per label and bin,
whether any level could meet both windows (``quantile_ratio``: q92/q74 of |z| at most 2)
and how much of the error belongs to the star (``same_star_correlation`` with the same
stars' residuals at 10 < SNRg <= 20).

"before" is the per-bin residual std of the same calibration predictions (the integrated
uncertainty this project quoted until now) applied to the same held-out residuals.

Repeats: the held-out stars have four spectra at 10 < SNRg <= 20; the rms z-score of their
pairs with ``_err_model`` (and with the unscaled ensemble std, "before") tests the model
uncertainty the way ``lamost-vac validate`` does on real repeats.

    python ../shared/tools/lamost_sim.py --miles ../shared/data/miles --out /tmp/sim-ref \\
        --per-star "4x10-20,1x5-10,1x20-80" --seed 1
    python bench/calibration.py --reference /tmp/sim-ref > bench-calibration.json
"""
import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models.lasso_mlpnet import LABELS, SNR_BINS, star_parameters  # noqa: E402
from models.calibration import LEVEL_RULES, WITHIN_1, WITHIN_2, cross_validated_sigma, snr_bin_index  # noqa: E402
from models.metrics import accuracy_by_snr, coverage_by_snr, snr_bin_names  # noqa: E402
from models.pipeline import featurise_files  # noqa: E402
from models.training import (DEFAULT_CALIBRATION_FOLDS, DEFAULT_TRAINING_SNR,  # noqa: E402
                             calibration_summary, train_lasso_mlpnet)
from models.validation import GAUSS_WITHIN_1, GAUSS_WITHIN_2, pairwise_z, z_summary  # noqa: E402

from train_vs_recipe import MILES_PREPROCESSING, load_reference, split_by_star, stars_in_range  # noqa: E402

MIN_SPECTRA = 30


def pass_probability(n):
    """Probability that a perfectly calibrated Gaussian error passes the criteria in a bin of
    ``n`` spectra: the counts within +-1 and within 1-2 sigma are multinomial
    (0.683, 0.271, 0.046), so a bin of a few dozen spectra misses the windows by chance
    alone. What the number of bins that pass should be compared with."""
    from scipy.stats import binom

    p1, p2 = GAUSS_WITHIN_1, GAUSS_WITHIN_2
    k1 = np.arange(n + 1)
    inside_1 = (k1 >= WITHIN_1[0] * n) & (k1 <= WITHIN_1[1] * n)
    total = 0.0
    for k in k1[inside_1]:
        # within 2 sigma = k + those of the other n - k that fall between 1 and 2 sigma
        low, high = np.ceil(WITHIN_2[0] * n - k), np.floor(WITHIN_2[1] * n - k)
        between = binom(n - k, (p2 - p1) / (1 - p1))
        total += binom.pmf(k, n, p1) * (between.cdf(high) - between.cdf(low - 1))
    return float(total)


def criteria(coverage):
    """{label: {bin: True/False (None: fewer than MIN_SPECTRA spectra)}} and overall pass."""
    verdict, passed = {}, True
    for label in LABELS:
        verdict[label] = {}
        for name in snr_bin_names(SNR_BINS):
            s = coverage[label][name]
            n = s["n"] - s["n_without_error"]
            if n < MIN_SPECTRA:
                verdict[label][name] = None
                continue
            ok = (s["within_1"] is not None and WITHIN_1[0] <= s["within_1"] <= WITHIN_1[1]
                  and WITHIN_2[0] <= s["within_2"] <= WITHIN_2[1])
            verdict[label][name] = bool(ok)
            passed &= bool(ok)
    return verdict, passed


def quantile_ratio(z):
    """q(92%) / q(74%) of |z|: the acceptance windows are met by some level s (one factor
    for the bin) only if this is at most 2 -- within +-1 err <= 74% needs s <= q(74%), within
    +-2 err >= 92% needs 2 s >= q(92%). It does not depend on the level (a Gaussian: 1.56)."""
    a = np.abs(np.asarray(z, dtype=float))
    a = a[np.isfinite(a)]
    return float(np.quantile(a, 0.92) / np.quantile(a, 0.74)) if a.size >= MIN_SPECTRA else None


def same_star_correlation(residuals, stars, inside, reference_bin):
    """Correlation of the residual of each spectrum ``inside`` a bin with the mean residual of
    its star's *other* spectra in ``reference_bin`` (boolean masks): near 1 when the error
    belongs to the star (a label or a peculiarity that the spectrum at any S/N carries),
    near 0 when it is noise. None with fewer than ``MIN_SPECTRA`` such spectra."""
    residuals, stars = np.asarray(residuals, dtype=float), np.asarray(stars)
    usable = reference_bin & np.isfinite(residuals)
    names, index = np.unique(stars, return_inverse=True)
    total = np.bincount(index, weights=np.where(usable, residuals, 0.0), minlength=names.size)
    count = np.bincount(index, weights=usable.astype(float), minlength=names.size)
    # leave the spectrum itself out of its star's mean (it may lie in reference_bin)
    own = usable & inside
    others = count[index] - own
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_of_others = (total[index] - np.where(own, residuals, 0.0)) / others
    pick = inside & np.isfinite(residuals) & (others > 0)
    if pick.sum() < MIN_SPECTRA:
        return None
    return float(np.corrcoef(residuals[pick], mean_of_others[pick])[0, 1])


def residual_tails(predicted, reference, snrg, stars):
    """Per label and SNRg bin, why a bin can or cannot meet both windows: ``quantile_ratio``
    of residual / err, and ``same_star_correlation`` of the residuals with the same stars'
    residuals at 10 < SNRg <= 20."""
    snrg = np.asarray(snrg, dtype=float)
    reference_bin = (snrg > 10) & (snrg <= 20)
    out = {}
    for label in LABELS:
        residuals = np.asarray(predicted[label], dtype=float) - np.asarray(reference[label], dtype=float)
        z = residuals / np.asarray(predicted[label + "_err"], dtype=float)
        out[label] = {}
        for name, low, high in zip(snr_bin_names(SNR_BINS), SNR_BINS[:-1], SNR_BINS[1:]):
            inside = (snrg > low) & (snrg <= high)
            out[label][name] = {"quantile_ratio_92_74": quantile_ratio(z[inside]),
                                "same_star_correlation": same_star_correlation(residuals, stars, inside,
                                                                               reference_bin)}
    return out


def judged(coverage):
    """The criteria applied to ``coverage_by_snr`` output: verdict per bin, bins passed and
    judged, and what a perfectly calibrated Gaussian error would score on bins of these sizes."""
    verdict, passed = criteria(coverage)
    chance = {label: {name: round(pass_probability(coverage[label][name]["n"] - coverage[label][name]["n_without_error"]), 3)
                      for name, ok in verdict[label].items() if ok is not None} for label in LABELS}
    return {"passed": passed, "verdict": verdict,
            "bins_passed": sum(bool(ok) for per in verdict.values() for ok in per.values()),
            "bins_judged": sum(ok is not None for per in verdict.values() for ok in per.values()),
            "pass_probability_if_calibrated": chance,
            "bins_expected_to_pass_if_calibrated": round(sum(v for per in chance.values() for v in per.values()), 2)}


def cross_validated_errors(model, folds=5):
    """The model's calibration spectra (cross-fitted predictions of the training stars) with
    ``<label>_err`` from each label's error model re-fitted without the spectrum's star: the
    networks and the calibration of every spectrum have not seen its star."""
    calibration = model.calibration_set_
    raw, reference, snrg = calibration["raw"], calibration["reference"], calibration["snrg"]
    out = {}
    for label in LABELS:
        out[label] = raw[label]
        out[label + "_err"] = cross_validated_sigma(
            model.error_models_[label], raw[label] - reference[label], snrg, raw[label + "_spread"],
            star_parameters(raw), calibration["groups"], folds=folds,
            isolation=model.isolation(raw, exclude=calibration["groups"]))
    return out


def markdown_table(result):
    """The README's table: per label and bin, the held-out split before -> after and every
    star of the split (training stars cross-validated), with the chance a calibrated error
    passes each."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = ["| label | SNRg | held-out N | within +-1 err: before -> after | within +-2 err: before -> after "
             "| criteria (P if calibrated) | every star N | within +-1 | within +-2 | criteria (P if calibrated) |",
             "|---|---|---:|---|---|---|---:|---|---|---|"]
    names = {"teff": "Teff", "logg": "log g", "feh": "[Fe/H]"}
    every = result["every_star"]
    for label in LABELS:
        for name in snr_bin_names(SNR_BINS):
            before, after, pooled = (c[label][name] for c in (result["coverage_before"], result["coverage"],
                                                                every["coverage"]))

            def verdict(ok, chance):
                if ok is None:
                    return "too few"
                return f"{'met' if ok else 'missed'} ({chance:.2f})"

            lines.append(
                f"| {names[label]} | {name} | {after['n']} | {pct(before['within_1'])} -> {pct(after['within_1'])} "
                f"| {pct(before['within_2'])} -> {pct(after['within_2'])} "
                f"| {verdict(result['verdict'][label][name], result['pass_probability_if_calibrated'][label].get(name, 0))} "
                f"| {pooled['n']} | {pct(pooled['within_1'])} | {pct(pooled['within_2'])} "
                f"| {verdict(every['verdict'][label][name], every['pass_probability_if_calibrated'][label].get(name, 0))} |")
    return "\n".join(lines)


def tails_table(tails):
    """The README's second table: per label and bin, whether any level could meet both
    windows (quantile ratio <= 2) and how much of the error belongs to the star."""
    def number(value):
        return "-" if value is None else f"{value:.2f}"

    names = {"teff": "Teff", "logg": "log g", "feh": "[Fe/H]"}
    lines = ["| label | " + " | ".join(f"SNRg {name}: q92/q74, same-star r" for name in snr_bin_names(SNR_BINS)) + " |",
             "|---|" + "---|" * (len(SNR_BINS) - 1)]
    for label in LABELS:
        cells = [f"{number(t['quantile_ratio_92_74'])}, {number(t['same_star_correlation'])}"
                 for t in tails[label].values()]
        lines.append(f"| {names[label]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rounded(value, digits=4):
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    if isinstance(value, float):
        return round(value, digits)
    return value


def train(args, snr_range):
    """Train on the split's training stars; returns the model, its description, the seconds
    it took, the warnings, and the held-out spectra's raw predictions, references, SNRg
    and stars."""
    table, _ = stars_in_range(load_reference(args.reference), args.teff_range)
    features, _, _ = featurise_files(table["path"], table["z"], MILES_PREPROCESSING)
    usable = np.isfinite(features).all(axis=1)
    _, test = split_by_star(table, usable, args.seed)
    stars = np.asarray(table["miles_id"])
    pool = ~np.isin(stars, np.unique(stars[test]))       # every spectrum of the training stars
    snrg = np.asarray(table["snrg"], dtype=float)
    obsids = np.asarray(table["obsid"], dtype=np.int64)
    labels = {k: np.asarray(table[k], dtype=float) for k in LABELS}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, training, _ = train_lasso_mlpnet(
            features[pool], {k: v[pool] for k, v in labels.items()}, snrg[pool], stars[pool], obsids[pool],
            snr_range=snr_range, holdout_fraction=args.holdout, calibration_folds=args.folds,
            random_state=0, n_members=args.ensemble)
    seconds = time.perf_counter() - start
    test_raw = model.predict_raw(features[test])
    reference = {k: v[test] for k, v in labels.items()}
    if args.save_model:
        import joblib
        joblib.dump(model, args.save_model, compress=3)
        np.savez(args.save_model + ".test.npz", snrg=snrg[test], stars=stars[test],
                 **{"raw_" + k: v for k, v in test_raw.items()}, **{"ref_" + k: v for k, v in reference.items()})
    return model, training, seconds, list(caught), test_raw, reference, snrg[test], stars[test]


def load_saved(path):
    """A model saved with --save-model and its held-out predictions."""
    import joblib
    model = joblib.load(path)
    saved = np.load(path + ".test.npz")
    raw = {key[4:]: saved[key] for key in saved.files if key.startswith("raw_")}
    reference = {key[4:]: saved[key] for key in saved.files if key.startswith("ref_")}
    return model, raw, reference, saved["snrg"], saved["stars"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default=os.environ.get("LAMOST_VAC_REFERENCE_SET", "/tmp/sim-ref"),
                        help="output folder of lamost_sim.py (the reference set)")
    parser.add_argument("--ensemble", type=int, default=10, help="networks per label (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the star split (as train_vs_recipe)")
    parser.add_argument("--teff-range", default="3500,6500",
                        help="keep the stars whose reference Teff (K) lies in this range")
    parser.add_argument("--snr-range", default=",".join(f"{v:g}" for v in DEFAULT_TRAINING_SNR),
                        help="SNRg range of the training spectra (default: train's, %(default)s)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="fraction of the training stars held out for calibration; 0 (default) "
                             "calibrates by cross-fitting instead")
    parser.add_argument("--folds", type=int, default=DEFAULT_CALIBRATION_FOLDS,
                        help="cross-fitting folds (default %(default)s)")
    parser.add_argument("--save-model", default=None, metavar="PATH",
                        help="also write the trained LassoMLPNet (joblib; it keeps its calibration "
                             "predictions) and, beside it, PATH.test.npz: its raw predictions, "
                             "references, SNRg and stars of the held-out spectra, for further checks")
    parser.add_argument("--recalibrate", default=None, metavar="PATH",
                        help="do not train: load a model saved with --save-model (and PATH.test.npz), "
                             "re-fit its uncertainties on its stored calibration predictions with the "
                             "current code, and report (the networks are those of the saved run)")
    parser.add_argument("--level-rules", default=",".join(LEVEL_RULES),
                        help="with --recalibrate: the level rules the error models choose from "
                             "(default %(default)s; one rule: no choice)")
    args = parser.parse_args()
    snr_range = tuple(float(v) for v in args.snr_range.split(","))

    caught = []
    if args.recalibrate:
        model, test_raw, reference, test_snrg, test_stars_of = load_saved(args.recalibrate)
        calibration = model.calibration_set_
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.calibrate_predictions(calibration["raw"], calibration["reference"], calibration["snrg"],
                                        groups=calibration["groups"], level_rules=tuple(args.level_rules.split(",")))
        training, train_seconds = {"calibration": "re-fitted on " + os.path.abspath(args.recalibrate),
                                   "calibration_folds": None, "n_spectra": len(model.training_obsids_),
                                   "n_stars": len(model.training_stars_)}, None
    else:
        model, training, train_seconds, caught, test_raw, reference, test_snrg, test_stars_of = train(args, snr_range)
    calibration = model.calibration_set_
    calibration_accuracy = accuracy_by_snr(calibration["raw"], calibration["reference"], calibration["snrg"])

    predicted = {label: test_raw[label] for label in LABELS}
    predicted.update(model.uncertainties(test_raw, test_snrg))
    after = coverage_by_snr(predicted, reference, test_snrg)
    # before: the per-bin residual std of the same calibration predictions, as quoted until now
    before_errors = dict(predicted)
    which = snr_bin_index(test_snrg, SNR_BINS)
    for label in LABELS:
        table_sigma = np.array([calibration_accuracy[label][name]["sigma"] or np.nan
                                for name in snr_bin_names(SNR_BINS)], dtype=float)
        before_errors[label + "_err"] = np.where(which >= 0, table_sigma[np.clip(which, 0, None)], np.nan)
    before = coverage_by_snr(before_errors, reference, test_snrg)
    verdict_before, passed_before = criteria(before)

    # every star held out: the training stars' cross-fitted predictions with errors from an
    # error model fitted without their star, pooled with the held-out stars
    cross = cross_validated_errors(model)
    pooled_snrg = np.r_[calibration["snrg"], test_snrg]
    pooled = {k: np.r_[cross[k], predicted[k]] for k in cross}
    pooled_reference = {k: np.r_[calibration["reference"][k], reference[k]] for k in LABELS}
    every_star = coverage_by_snr(pooled, pooled_reference, pooled_snrg)
    tails = residual_tails(pooled, pooled_reference, pooled_snrg, np.r_[calibration["groups"], test_stars_of])
    training_stars = coverage_by_snr(cross, calibration["reference"], calibration["snrg"])

    # repeats of the held-out stars: pairs at 10 < SNRg <= 20 (four spectra per star)
    in_range = (test_snrg > 10) & (test_snrg <= 20)
    repeats = {}
    for label in LABELS:
        values, stars_in = test_raw[label][in_range], test_stars_of[in_range]
        repeats[label] = {
            "after": z_summary(pairwise_z(values, predicted[label + "_err_model"][in_range], stars_in)[0]),
            "before": z_summary(pairwise_z(values, test_raw[label + "_spread"][in_range], stars_in)[0]),
        }

    result = {
        "reference_set": os.path.abspath(args.reference),
        "teff_range": [float(v) for v in args.teff_range.split(",")],
        "split_seed": args.seed, "snr_range": list(snr_range),
        "calibration": training["calibration"], "calibration_folds": training["calibration_folds"],
        "holdout_fraction": args.holdout, "ensemble": args.ensemble,
        "n_train_spectra": training["n_spectra"], "n_train_stars": training["n_stars"],
        "n_calibration_spectra": int(np.isfinite(calibration["raw"]["teff"]).sum()),
        "n_calibration_stars": int(np.unique(calibration["groups"]).size),
        "n_test_spectra": int(test_snrg.size), "n_test_stars": int(np.unique(test_stars_of).size),
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "load_average": list(os.getloadavg()),
        "criteria": {"within_1": WITHIN_1, "within_2": WITHIN_2, "min_spectra": MIN_SPECTRA},
        **judged(after), "passed_before": passed_before, "verdict_before": verdict_before,
        "coverage": after, "coverage_before": before,
        # the same criteria on every star of the split (training stars cross-validated)
        "every_star": {
            "n_spectra": int(np.sum(np.isfinite(pooled_snrg))),
            "n_stars": int(np.unique(np.r_[calibration["groups"], test_stars_of]).size),
            **judged(every_star), "coverage": every_star,
            # the training stars alone: what the choices (form, level rule) could have seen
            "training_stars": {**judged(training_stars), "coverage": training_stars},
            "residual_tails": tails,
        },
        "repeat_z": repeats,
        "calibration_model": calibration_summary(model),
        "calibration_accuracy": calibration_accuracy,
        "warnings": sorted({str(w.message) for w in caught}),
    }
    print(json.dumps(rounded(result), indent=2))
    print("--- markdown ---")
    print(markdown_table(result))
    print()
    print(tails_table(tails))


if __name__ == "__main__":
    main()
