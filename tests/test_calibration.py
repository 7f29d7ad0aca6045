"""The calibrated uncertainty (``models.calibration.ErrorModel``), the repeat scale of the
ensemble std and the cross-fitted calibration of ``models.training``.

Synthetic residuals with a known, star-dependent standard deviation stand in for a
model's out-of-sample residuals; fitting and checking use different stars.
"""
import warnings

import numpy as np
import pytest

from models.calibration import ErrorModel, RepeatScale, coverage, cross_validated_sigma, snr_bin_index
from models.lasso_mlpnet import LABELS, SNR_BINS, LassoMLPNet
from models.splits import group_kfold_indices
from models.training import DEFAULT_CALIBRATION_FOLDS, cross_fitted_predictions, train_lasso_mlpnet
from test_model import SMALL_HIDDEN, synthetic_spectra

BIN_CENTRES = (7.0, 14.0, 28.0, 56.0)


def heteroscedastic(rng, n_stars, per_bin=1):
    """Residuals whose std depends on SNRg, on the ensemble spread and on the star (metal-poor
    and cool stars 2-2.5x worse), as a model's residuals do."""
    stars = np.repeat(np.arange(n_stars), len(BIN_CENTRES) * per_bin)
    snrg = np.tile(np.repeat(BIN_CENTRES, per_bin), n_stars) * rng.uniform(0.8, 1.2, stars.size)
    teff = rng.uniform(3800, 6500, n_stars)[stars]
    feh = rng.uniform(-2.0, 0.4, n_stars)[stars]
    spread = 20.0 * np.exp(rng.normal(0, 0.5, stars.size)) * (teff < 4500) + \
        10.0 * np.exp(rng.normal(0, 0.5, stars.size))
    sigma = (1500.0 / snrg + 3.0 * spread) * np.where(feh < -1.0, 2.5, 1.0)
    residuals = sigma * rng.standard_normal(stars.size)
    return residuals, snrg, spread, np.column_stack([np.log10(teff), feh]), stars, sigma


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    train = heteroscedastic(rng, 800)
    test = heteroscedastic(rng, 800)
    model = ErrorModel(bins=SNR_BINS, random_state=0).fit(*train[:4], groups=train[4])
    return model, train, test


def test_snr_bin_index_uses_low_high_bins_and_rejects_the_outside():
    snrg = np.array([5.0, 5.01, 10.0, 10.01, 80.0, 80.01, np.nan, -9999.0, 2.0])
    assert list(snr_bin_index(snrg, SNR_BINS)) == [-1, 0, 0, 1, 3, -1, -1, -1, -1]


def test_error_model_covers_68_and_95_percent_in_every_bin_on_other_stars(fitted):
    model, _, test = fitted
    residuals, snrg, spread, stars, _, _ = test
    sigma = model.predict(snrg, spread, stars)
    assert np.all(np.isfinite(sigma)) and np.all(sigma > 0)
    which = snr_bin_index(snrg, SNR_BINS)
    for k in range(len(SNR_BINS) - 1):
        inside = which == k
        assert 0.62 <= coverage(residuals[inside], sigma[inside], 1) <= 0.74, k
        assert 0.92 <= coverage(residuals[inside], sigma[inside], 2) <= 0.98, k


def test_cross_validated_sigma_covers_and_never_sees_the_star(fitted):
    """Each star's sigma comes from an error model fitted without it: the coverage on the
    calibration set itself is that of new stars, and changing one star's residuals changes no
    sigma of that star."""
    model, train, _ = fitted
    residuals, snrg, spread, stars, groups, _ = train
    sigma = cross_validated_sigma(model, residuals, snrg, spread, stars, groups, folds=5)
    assert np.all(np.isfinite(sigma))
    assert 0.64 <= coverage(residuals, sigma, 1) <= 0.72
    assert 0.93 <= coverage(residuals, sigma, 2) <= 0.97
    star = groups == groups[0]
    changed = np.where(star, residuals * 50.0, residuals)
    again = cross_validated_sigma(model, changed, snrg, spread, stars, groups, folds=5)
    assert np.allclose(again[star], sigma[star])
    assert not np.allclose(again[~star], sigma[~star])


def test_error_model_follows_the_spread_and_the_star(fitted):
    """Cross-validation picks the form that uses the spread and the star's parameters, and
    the coverage then holds for hard and easy stars alike -- a constant per SNRg bin (the old
    integrated uncertainty) over-covers the easy stars and under-covers the hard ones."""
    model, train, test = fitted
    assert model.form_ == "bin+snr+spread+stars"
    assert model.cv_scores_[model.form_] < model.cv_scores_["bin"]
    residuals, snrg, spread, stars, _, true_sigma = test
    sigma = model.predict(snrg, spread, stars)
    per_bin = ErrorModel(bins=SNR_BINS, forms=("bin",)).fit(*train[:4], groups=train[4])
    constant = per_bin.predict(snrg, spread, stars)
    metal_poor = stars[:, 1] < -1.0
    for subset in (metal_poor, ~metal_poor):
        assert 0.62 <= coverage(residuals[subset], sigma[subset], 1) <= 0.74
    assert coverage(residuals[metal_poor], constant[metal_poor], 1) < 0.55
    assert coverage(residuals[~metal_poor], constant[~metal_poor], 1) > 0.80
    # and the fitted sigma tracks the true one
    assert np.corrcoef(np.log(sigma), np.log(true_sigma))[0, 1] > 0.9


def test_error_model_follows_the_isolation_of_the_estimate():
    """Errors that grow where the training stars are few (``LassoMLPNet.isolation``): given
    the isolation, cross-validation takes a form with it and both the isolated and the
    well-surrounded stars are covered; without it, the isolated stars are under-covered."""
    rng = np.random.default_rng(3)

    def draw(n_stars):
        residuals, snrg, spread, params, stars, _ = heteroscedastic(rng, n_stars)
        isolation = np.exp(rng.normal(0.0, 0.6, n_stars))[stars]
        return residuals * isolation, snrg, spread, params, stars, isolation

    train, test = draw(800), draw(800)
    model = ErrorModel(bins=SNR_BINS).fit(*train[:4], groups=train[4], isolation=train[5])
    assert "isolation" in model.form_.split("+")
    without = ErrorModel(bins=SNR_BINS).fit(*train[:4], groups=train[4])
    assert "isolation" not in without.form_.split("+")
    residuals, snrg, spread, params, _, isolation = test
    sigma = model.predict(snrg, spread, params, isolation)
    sigma_without = without.predict(snrg, spread, params)
    isolated = isolation > np.quantile(isolation, 0.75)
    for subset in (isolated, ~isolated):
        assert 0.62 <= coverage(residuals[subset], sigma[subset], 1) <= 0.74
    assert coverage(residuals[isolated], sigma_without[isolated], 1) < 0.55
    # an input the chosen form needs, missing: no error is quoted
    assert np.all(np.isnan(model.predict(snrg[:3], spread[:3], params[:3])))


def test_error_model_gives_nan_and_warns_for_sparse_bins_and_outside():
    rng = np.random.default_rng(1)
    residuals, snrg, spread, params, stars, _ = heteroscedastic(rng, 200)
    keep = ~((snrg > 40) & (stars >= 25))             # 25 spectra left in 40-80
    with pytest.warns(UserWarning, match=r"fewer than 30 .* 40-80 \(25\)"):
        model = ErrorModel(bins=SNR_BINS).fit(residuals[keep], snrg[keep], spread[keep], params[keep],
                                              groups=stars[keep])
    assert list(model.counts_) == [200, 200, 200, 25]
    assert np.isnan(model.scale_[3]) and np.all(np.isfinite(model.scale_[:3]))
    sigma = model.predict([7.0, 60.0, 4.0, 120.0, np.nan], 10.0, [np.log10(5000.0), 0.0])
    assert np.isfinite(sigma[0]) and np.all(np.isnan(sigma[1:]))


def test_error_model_without_a_spread_uses_the_other_forms():
    rng = np.random.default_rng(2)
    residuals, snrg, _, params, stars, _ = heteroscedastic(rng, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ErrorModel(bins=SNR_BINS).fit(residuals, snrg, np.full(residuals.size, np.nan), params,
                                              groups=stars)
    assert "spread" not in model.form_
    assert np.all(np.isfinite(model.predict(snrg, np.nan, params)))


def test_repeat_scale_recovers_an_snr_dependent_factor():
    """Repeats differ by k(SNRg) times the spread, k = exp(0.8 - 0.5 ln(SNRg / 15)): the fit
    finds k, keeps it flat outside the fitted SNRg range and is conservative without SNRg."""
    rng = np.random.default_rng(3)
    stars = np.repeat(np.arange(400), 6)
    snrg = np.exp(rng.uniform(np.log(5), np.log(80), stars.size))
    spread = rng.uniform(0.5, 2.0, stars.size)
    k = np.exp(0.8 - 0.5 * np.log(snrg / 15))
    values = rng.normal(0, 10, 400)[stars] + k * spread * rng.standard_normal(stars.size)
    scale = RepeatScale().fit(values, spread, snrg, stars)
    assert scale.n_pairs_ == 400 * 15
    assert scale.intercept_ == pytest.approx(0.8, abs=0.05) and scale.slope_ == pytest.approx(-0.5, abs=0.05)
    assert scale.z_rms_ == pytest.approx(1.0, abs=1e-3)
    low, high = scale.snr_range_
    assert 5 <= low < 5.1 and 79 < high <= 80
    np.testing.assert_allclose(scale.predict([2.0, 200.0]), scale.predict([low, high]))
    assert scale.predict([np.nan])[0] == pytest.approx(scale.predict([low])[0])      # the largest k


def test_repeat_scale_needs_pairs():
    rng = np.random.default_rng(4)
    values, spread, snrg = rng.normal(size=40), np.ones(40), np.full(40, 15.0)
    scale = RepeatScale().fit(values, spread, snrg, np.arange(40))        # one spectrum per star
    assert scale.n_pairs_ == 0 and np.all(scale.predict([7.0, 50.0]) == 1.0)
    scale = RepeatScale().fit(values, spread, snrg, np.arange(40) // 2)   # 20 pairs < 30
    assert scale.n_pairs_ == 20 and np.all(scale.predict([7.0, 50.0]) == 1.0)


# -- cross-fitted calibration in the training recipe ---------------------------------------
MODEL = dict(hidden=SMALL_HIDDEN, n_members=2, cv=3, max_epochs=40, max_lasso_steps=60, n_jobs=1)


@pytest.fixture(scope="module")
def synthetic_set():
    rng = np.random.default_rng(4)
    X, labels, stars = synthetic_spectra(rng, 90, 4)
    snrg = np.tile([7.0, 15.0, 16.0, 50.0], 90)
    X = X + (0.2 / snrg)[:, None] * rng.standard_normal(X.shape)
    return X, labels, stars, snrg, np.arange(X.shape[0]) + 500000000


def test_cross_fitted_predictions_come_from_models_without_the_star(synthetic_set):
    X, labels, stars, snrg, _ = synthetic_set
    usable = np.ones(len(stars), dtype=bool)
    train = (snrg > 10) & (snrg <= 20)
    raw, rows = cross_fitted_predictions(X, labels, stars, train, usable, 3, 0, MODEL)
    assert rows.all()                                  # every spectrum of a training star, any SNRg
    assert all(np.isfinite(v).all() for v in raw.values())
    # redo one fold by hand: the fold's stars are predicted by a model fitted without them
    folds = list(group_kfold_indices(stars, 3, np.random.default_rng(0 + 7919)))
    _, fold_rows = folds[1]
    fit = train & ~np.isin(stars, stars[fold_rows])
    assert not set(stars[fit]) & set(stars[fold_rows])
    by_hand = LassoMLPNet(random_state=0, **MODEL).fit(X[fit], {k: v[fit] for k, v in labels.items()},
                                                       groups=stars[fit]).predict_raw(X[fold_rows])
    for key, values in by_hand.items():
        np.testing.assert_array_equal(raw[key][fold_rows], values)


def test_training_calibrates_on_cross_fitted_predictions_and_keeps_every_star(synthetic_set):
    X, labels, stars, snrg, obsids = synthetic_set
    assert DEFAULT_CALIBRATION_FOLDS >= 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                # tiny set: bins below 30 spectra warn
        model, description, metrics = train_lasso_mlpnet(X, labels, snrg, stars, obsids, calibration_folds=3,
                                                         snr_range=(10.0, 20.0), **MODEL)
    train = (snrg > 10) & (snrg <= 20)                  # training on part of the SNRg range
    assert description["calibration"] == "cross-fitting" and description["holdout_fraction"] == 0
    assert description["n_spectra"] == train.sum() and description["n_stars"] == 90   # every star trains
    np.testing.assert_array_equal(model.training_obsids_, np.sort(obsids[train]))
    np.testing.assert_array_equal(model.training_stars_, np.arange(90))
    # every spectrum of every star, at every SNRg, was predicted out of sample
    assert list(model.calibration_counts_) == [90, 180, 0, 90]
    assert metrics["cross_fitted"]["teff"]["all"]["n"] == 360 and metrics["cross_fitted_stars"] == 90
    assert np.all(np.isfinite(model.predict(X, snrg)["teff_err"]))
    assert np.all(np.isnan(model.predict(X[:5], np.full(5, 30.0))["teff_err"]))   # no 20-40 spectra
    for label in LABELS:
        summary = metrics["calibration"][label]
        assert summary["form"] in summary["cv_interval_score"]
        assert summary["model_err_scale"]["n_pairs"] == model.repeat_scales_[label].n_pairs_ > 0


def test_training_with_a_hold_out_keeps_those_stars_out(synthetic_set):
    X, labels, stars, snrg, obsids = synthetic_set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, description, metrics = train_lasso_mlpnet(X, labels, snrg, stars, obsids,
                                                         holdout_fraction=0.5, **MODEL)
    assert description["calibration"] == "hold-out"
    assert description["n_stars"] == 45 and metrics["held_out_stars"] == 45
    held = ~np.isin(stars, model.training_stars_)
    assert np.unique(stars[held]).size == 45
    assert not np.isin(obsids[held], model.training_obsids_).any()
    assert sum(model.calibration_counts_) == held.sum() == 180


def test_pass_probability_of_a_calibrated_error_matches_simulation():
    """bench/calibration.py's chance that a perfect Gaussian error passes a bin's windows
    (62-74% within 1 sigma, 92-98% within 2) equals the fraction of simulated bins that do."""
    bench = _bench_calibration()
    WITHIN_1, WITHIN_2, pass_probability = bench.WITHIN_1, bench.WITHIN_2, bench.pass_probability

    rng = np.random.default_rng(3)
    for n in (37, 120):
        z = np.abs(rng.standard_normal((20000, n)))
        within_1, within_2 = (z < 1).mean(axis=1), (z < 2).mean(axis=1)
        simulated = np.mean((within_1 >= WITHIN_1[0]) & (within_1 <= WITHIN_1[1]) &
                            (within_2 >= WITHIN_2[0]) & (within_2 <= WITHIN_2[1]))
        assert pass_probability(n) == pytest.approx(simulated, abs=0.015)
    assert pass_probability(2000) > 0.999


def _bench_calibration():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import calibration
    return calibration


def test_quantile_ratio_tells_which_bins_no_level_can_calibrate():
    """q92/q74 of |z| <= 2 exactly when some level meets both windows: checked against a
    search over levels, for a Gaussian (1.55), a heavy-tailed Student t and scaled copies."""
    bench = _bench_calibration()
    rng = np.random.default_rng(8)
    levels = np.geomspace(0.2, 5, 2001)
    for z, some_level_passes in ((rng.standard_normal(4000), True),
                                 (rng.standard_t(1.5, 4000), False)):
        ratio = bench.quantile_ratio(z)
        assert bench.quantile_ratio(7.0 * z) == pytest.approx(ratio)      # the level drops out
        a = np.abs(z)
        within_1 = (a[:, None] < levels).mean(axis=0)
        within_2 = (a[:, None] < 2 * levels).mean(axis=0)
        passes = ((within_1 <= bench.WITHIN_1[1]) & (within_2 >= bench.WITHIN_2[0])).any()
        assert passes == some_level_passes == (ratio <= 2)
    assert bench.quantile_ratio(rng.standard_normal(200_000)) == pytest.approx(1.554, abs=0.01)
    assert bench.quantile_ratio(np.ones(bench.MIN_SPECTRA - 1)) is None


def test_same_star_correlation_separates_errors_of_the_star_from_noise():
    bench = _bench_calibration()
    rng = np.random.default_rng(9)
    stars = np.repeat(np.arange(300), 5)
    snrg = np.tile([15.0, 15.0, 15.0, 15.0, 50.0], 300)
    inside, reference_bin = snrg > 20, (snrg > 10) & (snrg <= 20)
    offsets = rng.standard_normal(300)[stars]
    of_the_star = offsets + 0.2 * rng.standard_normal(stars.size)
    assert bench.same_star_correlation(of_the_star, stars, inside, reference_bin) > 0.9
    noise = rng.standard_normal(stars.size)
    assert abs(bench.same_star_correlation(noise, stars, inside, reference_bin)) < 0.2
    # within the reference bin a spectrum is compared with its star's *other* spectra only:
    # with one spectrum per star there are none (a mean including itself would give r = 1)
    single = np.arange(100)
    assert bench.same_star_correlation(noise[:100], single, np.ones(100, bool), np.ones(100, bool)) is None
    assert abs(bench.same_star_correlation(noise, stars, reference_bin, reference_bin)) < 0.2


def test_repeat_level_recovers_an_underestimated_error_and_carries_over_to_other_stars():
    from models.calibration import repeat_level, repeat_level_cross_validated

    rng = np.random.default_rng(4)
    stars = np.repeat(np.arange(400), 3)
    quoted = rng.uniform(0.05, 0.2, stars.size)             # errors 1.5x too small
    values = rng.normal(0, 1, 400)[stars] + rng.standard_normal(stars.size) * 1.5 * quoted
    groups = list(stars)
    level, n_pairs = repeat_level(values, quoted, groups)
    assert n_pairs == 400 * 3 and level == pytest.approx(1.5, rel=0.05)
    held_out, n_scored = repeat_level_cross_validated(values, quoted, groups)
    assert n_scored == n_pairs and held_out == pytest.approx(1.0, abs=0.06)
    # spectra in no group and non-finite values are left out
    assert repeat_level(values, quoted, [None] * stars.size) == (pytest.approx(np.nan, nan_ok=True), 0)
    spoiled = values.copy()
    spoiled[::3] = np.nan                                   # one spectrum of every star
    assert repeat_level(spoiled, quoted, groups)[1] == 400


def test_level_rule_chosen_by_cv_puts_heavy_tailed_residuals_inside_both_windows():
    """Residuals with Student-t (2.7 degrees of freedom) tails: no level gives a Gaussian's
    68.3% and 95.4% at once, and the Gaussian compromise over-covers +-1 sigma beyond 74%.
    The "windows" rule meets both windows (in every bin of the calibration spectra, where
    the level is fitted); star-grouped CV picks it; on other stars its coverages lie closer
    to the windows' centres."""
    from models.calibration import WITHIN_1, WITHIN_2, window_distance

    rng = np.random.default_rng(3)

    def draw(n_stars):
        stars = np.repeat(np.arange(n_stars), len(BIN_CENTRES))
        snrg = np.tile(BIN_CENTRES, n_stars)
        residuals = 500.0 / snrg * rng.standard_t(2.7, stars.size)
        return residuals, snrg, np.ones(stars.size), np.zeros((stars.size, 1)), stars

    train, test = draw(20000), draw(20000)
    gaussian = ErrorModel(bins=SNR_BINS, forms=("bin",), level_rules=("gaussian",)).fit(*train[:4], groups=train[4])
    chosen = ErrorModel(bins=SNR_BINS, forms=("bin",)).fit(*train[:4], groups=train[4])
    assert gaussian.level_rule_ == "gaussian" and chosen.level_rule_ == "windows"
    assert chosen.level_cv_scores_["windows"] < chosen.level_cv_scores_["gaussian"]
    assert sum(c > WITHIN_1[1] for c in gaussian.coverage_["within_1"]) >= 3
    assert all(WITHIN_1[0] <= a <= WITHIN_1[1] and WITHIN_2[0] <= b <= WITHIN_2[1]
               for a, b in zip(chosen.coverage_["within_1"], chosen.coverage_["within_2"]))
    residuals, snrg, spread, stars, _ = test
    which = snr_bin_index(snrg, SNR_BINS)

    def distance(model):
        sigma = model.predict(snrg, spread, stars)
        return np.mean([window_distance(coverage(residuals[which == k], sigma[which == k], 1),
                                        coverage(residuals[which == k], sigma[which == k], 2)) for k in range(4)])
    assert distance(chosen) < 1.0 < distance(gaussian), (distance(chosen), distance(gaussian))


def test_unknown_level_rule_is_refused():
    residuals, snrg, spread, stars, groups, _ = heteroscedastic(np.random.default_rng(0), 100)
    with pytest.raises(ValueError, match="level rule"):
        ErrorModel(bins=SNR_BINS, level_rules=("median",)).fit(residuals, snrg, spread, stars, groups=groups)
