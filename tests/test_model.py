"""LASSO selection, splits by star, the sigmoid MLP, the LASSO-MLPNet ensemble, its
uncertainties and flags, and the model artifact.

Synthetic data with a known answer throughout; scikit-learn's coordinate-descent Lasso is
the independent reference for the LARS-based selection.
"""
import copy
import itertools
import warnings
import json
from pathlib import Path

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.linear_model import Lasso

from models.artifact import (ARTIFACT_FORMAT, ArtifactVersionWarning, IncompatibleArtifactError,
                             file_sha256, library_versions, load_model, save_model,
                             sidecar_path, training_set_description, write_sidecar)
from models.flags import (CATALOGUE_OUT_OF_DOMAIN, FEH_OUT_OF_DOMAIN, MASKED_SELECTED_PIXELS,
                          MAX_MASKED_SELECTED_FRACTION, NO_USABLE_REDSHIFT, NOT_A_STAR,
                          OUT_OF_DISTRIBUTION, SNR_OUT_OF_DOMAIN, SUSPICIOUS_REDSHIFT,
                          TEFF_OUT_OF_DOMAIN, UNUSABLE_SPECTRUM, catalogue_flags, describe_flags,
                          domain_flags, redshift_flags)
from models.augment import DEFAULT_DEGRADED_COPIES
from models.labels import ESTIMATE_SUFFIXES, LABELS
from models.lasso_mlpnet import (DEFAULT_HUBER_DELTA, PAPER_PARAMETERS, PUBLISHED_HIDDEN, PUBLISHED_LEARNING_RATE, LassoMLPNet,
                                 star_parameters)
from models.networks import SigmoidMLPRegressor
from models.preprocess import PreprocessConfig
from models.selection import LassoFeatureSelector
from models.splits import group_holdout, group_kfold_indices

SMALL_HIDDEN = {label: (32, 16) for label in LABELS}


# --------------------------------------------------------------------------- splits by star

def test_group_kfold_never_puts_a_group_on_both_sides():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 37, 400)                    # uneven group sizes
    folds = list(group_kfold_indices(groups, 5, np.random.default_rng(1)))
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert np.array_equal(np.sort(tested), np.arange(groups.size))        # each sample once
    groups_per_fold = []
    for train, test in folds:
        assert np.intersect1d(train, test).size == 0
        assert np.union1d(train, test).size == groups.size
        assert not set(groups[train]) & set(groups[test])
        groups_per_fold.append(np.unique(groups[test]).size)
    assert max(groups_per_fold) - min(groups_per_fold) <= 1               # groups spread evenly


def test_group_kfold_is_reproducible_and_shuffled():
    groups = np.repeat(np.arange(30), 2)
    a = [test for _, test in group_kfold_indices(groups, 3, np.random.default_rng(5))]
    b = [test for _, test in group_kfold_indices(groups, 3, np.random.default_rng(5))]
    c = [test for _, test in group_kfold_indices(groups, 3, np.random.default_rng(6))]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_group_holdout_holds_out_whole_groups(fraction):
    rng = np.random.default_rng(2)
    groups = np.array([f"star{g}" for g in rng.integers(0, 60, 500)])
    train, held = group_holdout(groups.size, groups, fraction, np.random.default_rng(3))
    assert np.intersect1d(train, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(groups.size))
    held_groups = set(groups[held])
    assert not held_groups & set(groups[train])
    # every spectrum of a held-out star is held out
    assert set(np.flatnonzero(np.isin(groups, list(held_groups)))) == set(held)
    assert len(held_groups) == max(1, round(fraction * np.unique(groups).size))


def test_group_holdout_without_groups_holds_out_samples():
    train, held = group_holdout(200, None, 0.2, np.random.default_rng(0))
    assert held.size == 40 and train.size == 160
    assert np.intersect1d(train, held).size == 0


# --------------------------------------------------------------------------- LASSO selection

@pytest.fixture(scope="module")
def sparse_problem():
    """y depends on 5 of 200 correlated, offset, unequally scaled columns, plus noise."""
    rng = np.random.default_rng(0)
    n, p = 300, 200
    z = rng.standard_normal((n, p))
    X = np.empty_like(z)
    X[:, 0] = z[:, 0]
    for j in range(1, p):                                 # AR(1) along the columns, rho 0.6
        X[:, j] = 0.6 * X[:, j - 1] + 0.8 * z[:, j]
    X = X * rng.uniform(0.5, 2.0, p) + rng.uniform(-5.0, 5.0, p)
    informative = np.array([7, 40, 95, 130, 171])
    beta = np.array([1.5, -2.0, 1.0, -1.2, 0.8])
    xs = X[:, informative]
    y = 3.0 + ((xs - xs.mean(0)) / xs.std(0)) @ beta + 0.2 * rng.standard_normal(n)
    groups = np.repeat(np.arange(n // 3), 3)             # three "spectra" per "star"
    selector = LassoFeatureSelector(cv=5, max_steps=150, n_jobs=1, random_state=1)
    selector.fit(X, y, groups=groups)
    return X, y, groups, informative, selector


def test_lasso_selects_the_informative_columns(sparse_problem):
    X, _, _, informative, selector = sparse_problem
    support = selector.get_support()
    assert support.shape == (X.shape[1],)
    assert support[informative].all()
    others = np.delete(np.arange(X.shape[1]), informative)
    assert support[others].sum() < 0.25 * others.size
    assert selector.n_selected_ == support.sum()
    # the strongest coefficients are the informative ones
    strongest = np.argsort(-np.abs(selector.coef_ * X.std(axis=0)))[:informative.size]
    assert set(strongest) == set(informative)
    assert selector.transform(X).shape == (X.shape[0], support.sum())


def test_lasso_coefficients_equal_coordinate_descent_at_the_chosen_alpha(sparse_problem):
    X, y, _, _, selector = sparse_problem
    reference = Lasso(alpha=selector.alpha_, tol=1e-12, max_iter=100_000).fit(X, y)
    np.testing.assert_allclose(selector.coef_, reference.coef_, rtol=0, atol=1e-6)
    assert selector.intercept_ == pytest.approx(reference.intercept_, abs=1e-6)


def test_lasso_cv_errors_are_the_held_out_group_fold_errors(sparse_problem):
    """mse_path_[a, k] is the held-out MSE of a Lasso fitted on the other folds at alphas_[a]."""
    X, y, groups, _, selector = sparse_problem
    assert selector.mse_path_.shape == (selector.n_alphas, selector.cv)
    assert np.all(np.diff(selector.alphas_) < 0)
    assert selector.alpha_ == selector.alphas_[np.argmin(selector.mse_path_.mean(axis=1))]
    folds = list(group_kfold_indices(groups, selector.cv, np.random.default_rng(selector.random_state)))
    for k, (train, test) in enumerate(folds):
        for a in (5, 40, 80):
            fitted = Lasso(alpha=selector.alphas_[a], tol=1e-12, max_iter=100_000).fit(X[train], y[train])
            mse = np.mean((y[test] - fitted.predict(X[test])) ** 2)
            assert selector.mse_path_[a, k] == pytest.approx(mse, rel=1e-6)
    # the chosen alpha is not at either end of the grid on this problem
    assert selector.alphas_[-1] < selector.alpha_ < selector.alphas_[0]


@pytest.fixture(scope="module")
def dense_problem():
    """~70% of 200 correlated columns matter: the CV-best LASSO keeps well over 100 of them
    (the paper's selections, 643-930 pixels, are dense like this)."""
    rng = np.random.default_rng(0)
    n, p = 400, 200
    z = rng.standard_normal((n, p))
    X = np.empty_like(z)
    X[:, 0] = z[:, 0]
    for j in range(1, p):
        X[:, j] = 0.5 * X[:, j - 1] + np.sqrt(0.75) * z[:, j]
    beta = rng.normal(0, 1, p) * (rng.random(p) < 0.7)
    y = X @ beta + 3.0 * rng.standard_normal(n)
    return X, y, np.repeat(np.arange(n // 2), 2)


def test_lasso_step_budget_does_not_bind(dense_problem):
    """A first pass of 30 LARS steps used to cut the path and pick ~30 pixels at the edge
    of the alpha grid; the path is now extended until the CV minimum is interior, giving
    the selection of an uncapped path and of scikit-learn's LassoCV on the same folds."""
    from sklearn.linear_model import LassoCV

    X, y, groups = dense_problem
    capped = LassoFeatureSelector(cv=5, max_steps=30, n_jobs=1, random_state=0).fit(X, y, groups=groups)
    uncapped = LassoFeatureSelector(cv=5, max_steps=5000, n_jobs=1, random_state=0).fit(X, y, groups=groups)
    assert capped.n_steps_ > 30 and capped.interior_minimum_
    assert uncapped.n_steps_ == 5000 and uncapped.interior_minimum_
    folds = list(group_kfold_indices(groups, 5, np.random.default_rng(0)))
    reference = LassoCV(cv=folds, alphas=100, max_iter=100_000, tol=1e-8).fit(X, y)
    n_reference = np.count_nonzero(reference.coef_)
    assert n_reference > 100
    for selector in (capped, uncapped):
        assert abs(selector.n_selected_ - n_reference) <= 0.1 * n_reference
        assert selector.alpha_ == pytest.approx(reference.alpha_, rel=0.25)
    # the final coefficients are the exact LASSO solution at the chosen alpha
    exact = Lasso(alpha=capped.alpha_, tol=1e-12, max_iter=100_000).fit(X, y)
    np.testing.assert_allclose(capped.coef_, exact.coef_, rtol=0, atol=1e-6)


def test_lasso_warns_when_the_cv_minimum_is_at_an_end_of_the_grid():
    from models.selection import LassoPathWarning

    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 20))
    # noiseless: every step down in alpha helps, the minimum is the grid's smallest alpha
    exact = X @ rng.normal(0, 1, 20)
    with pytest.warns(LassoPathWarning, match="LASSO feh: .* smallest alpha of the complete path"):
        selector = LassoFeatureSelector(cv=4, label="feh", n_jobs=1).fit(X, exact)
    assert not selector.interior_minimum_
    # pure noise and more columns than rows: nothing beats the mean, the minimum is the
    # largest alpha (true for this seed; some noise draws favour a pixel or two)
    rng = np.random.default_rng(0)
    X, noise = rng.standard_normal((60, 100)), rng.standard_normal(60)
    with pytest.warns(LassoPathWarning, match="largest alpha of the grid"):
        LassoFeatureSelector(cv=4, n_jobs=1).fit(X, noise)


# --------------------------------------------------------------------------- the network

def smooth_function(X):
    return np.sin(2 * X[:, 0] + X[:, 1]) + 0.5 * np.tanh(3 * X[:, 2]) + np.exp(X[:, 3])


def test_mlp_fits_a_smooth_nonlinear_function():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (1000, 8))                     # three inputs are irrelevant
    y = smooth_function(X) + 0.05 * rng.standard_normal(len(X))
    X_test = rng.uniform(-1, 1, (400, 8))
    y_test = smooth_function(X_test)
    # (sigmoid networks, scikit-learn's too, can sit on a plateau for tens of epochs early
    # on; a patience of 40 epochs rides it out)
    model = SigmoidMLPRegressor(hidden_layer_sizes=(32, 16), learning_rate_init=1e-2, max_epochs=300,
                                n_iter_no_change=40, random_state=0).fit(X, y)
    r2 = 1 - np.mean((model.predict(X_test) - y_test) ** 2) / np.var(y_test)
    assert r2 > 0.95
    # a linear model cannot do this: the network learnt the nonlinearity
    linear = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)[0]
    r2_linear = 1 - np.mean((np.column_stack([X_test, np.ones(len(X_test))]) @ linear - y_test) ** 2) / np.var(y_test)
    assert (1 - r2) < 0.2 * (1 - r2_linear)
    assert model.predict(X_test).dtype == np.float64


def test_mlp_early_stopping_on_noise_keeps_the_best_epoch():
    rng = np.random.default_rng(1)
    X = rng.uniform(-1, 1, (600, 8))
    y = rng.standard_normal(len(X))                      # nothing to learn
    patience = 10
    model = SigmoidMLPRegressor(hidden_layer_sizes=(32, 16), learning_rate_init=1e-2, max_epochs=500,
                                n_iter_no_change=patience, random_state=0).fit(X, y)
    assert model.n_epochs_ < 200
    assert len(model.validation_curve_) == model.n_epochs_
    best_epoch = int(np.argmin(model.validation_curve_))
    assert model.n_epochs_ - 1 - best_epoch == patience
    assert model.best_validation_loss_ == pytest.approx(min(model.validation_curve_))
    # the kept weights are the best epoch's: recompute the validation loss from predictions
    _, valid = group_holdout(len(y), None, model.validation_fraction, np.random.default_rng(0))
    standardised = (model.predict(X[valid]) - model.y_mean_) / model.y_scale_
    target = (y[valid] - model.y_mean_) / model.y_scale_
    assert np.mean((standardised - target) ** 2) == pytest.approx(model.best_validation_loss_, rel=1e-4)


def test_mlp_huber_loss_is_not_pulled_by_outlying_labels():
    """10% of the training labels off by 4 standard deviations (a reference catalogue's
    wrong labels): squared error bends the network towards them, Huber (``huber_delta``)
    hardly; early stopping reads the Huber loss too."""
    rng = np.random.default_rng(7)
    X, X_test = rng.uniform(-1, 1, (800, 5)), rng.uniform(-1, 1, (2000, 5))
    y, y_test = smooth_function(X), smooth_function(X_test)
    wrong = rng.random(y.size) < 0.1
    y_labelled = y + np.where(wrong, 4 * y.std() * np.sign(rng.standard_normal(y.size)), 0.0)
    params = dict(hidden_layer_sizes=(32, 16), learning_rate_init=1e-2, max_epochs=300,
                  n_iter_no_change=40, random_state=0)
    squared = SigmoidMLPRegressor(**params).fit(X, y_labelled)
    huber = SigmoidMLPRegressor(huber_delta=0.3, **params).fit(X, y_labelled)
    mae = {name: np.mean(np.abs(m.predict(X_test) - y_test)) for name, m in (("squared", squared), ("huber", huber))}
    assert mae["huber"] < 0.5 * mae["squared"], mae
    _, valid = group_holdout(y.size, None, huber.validation_fraction, np.random.default_rng(0))
    residual = np.abs((huber.predict(X[valid]) - y_labelled[valid]) / huber.y_scale_)
    loss = np.where(residual <= 0.3, 0.5 * residual ** 2, 0.3 * (residual - 0.15))
    assert np.mean(loss) == pytest.approx(huber.best_validation_loss_, rel=1e-4)
    with pytest.raises(ValueError, match="huber_delta"):
        SigmoidMLPRegressor(huber_delta=-1.0).fit(X, y)


def test_huber_delta_reaches_the_networks():
    rng = np.random.default_rng(6)
    X, labels, stars = synthetic_spectra(rng, 20, 2)
    model = LassoMLPNet(hidden=SMALL_HIDDEN, n_members=2, max_epochs=5, cv=3, n_jobs=1,
                        huber_delta={"logg": 0.3}).fit(X, labels, groups=stars)
    for label, estimator in model.estimators_.items():
        expected = 0.3 if label == "logg" else DEFAULT_HUBER_DELTA
        assert estimator.huber_delta == expected
        assert all(member.huber_delta == expected for member in estimator.members_)


def test_standard_normal_float32_is_a_standard_normal_stream():
    """The networks' input noise: N(0, 1) by the Kolmogorov-Smirnov test and its moments,
    fresh at every call, reproducible from the seed, any shape (sizes not a multiple of 4)."""
    from scipy import stats
    from models.networks import standard_normal_float32
    first = standard_normal_float32(np.random.default_rng(7), np.empty((1001, 999), np.float32))
    assert first.dtype == np.float32 and first.shape == (1001, 999)
    assert abs(first.mean()) < 0.005 and abs(first.var() - 1) < 0.005
    assert abs(stats.skew(first, axis=None)) < 0.01 and abs(stats.kurtosis(first, axis=None)) < 0.02
    assert stats.kstest(first.ravel()[:200_000], "norm").pvalue > 1e-3
    rng = np.random.default_rng(7)
    again = standard_normal_float32(rng, np.empty((1001, 999), np.float32))
    np.testing.assert_array_equal(first, again)
    following = standard_normal_float32(rng, np.empty((1001, 999), np.float32))
    assert abs(np.corrcoef(first.ravel(), following.ravel())[0, 1]) < 0.005


def test_mlp_is_deterministic_for_a_fixed_random_state():
    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (300, 5))
    y = smooth_function(X)
    params = dict(hidden_layer_sizes=(16, 8), learning_rate_init=1e-2, max_epochs=40)
    a = SigmoidMLPRegressor(random_state=7, **params).fit(X, y).predict(X)
    b = SigmoidMLPRegressor(random_state=7, **params).fit(X, y).predict(X)
    c = SigmoidMLPRegressor(random_state=8, **params).fit(X, y).predict(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_mlp_input_noise_shrinks_like_its_tikhonov_equivalent():
    # y = x1 + ... + x5 with x ~ N(0, 1): trained on inputs x + N(0, s^2), the best
    # predictor of y is sum(x) / (1 + s^2), so with s = 1 the fitted slope on clean inputs
    # is ~0.5 (~1 without noise). Checks the noise scale and that prediction is noise-free.
    rng = np.random.default_rng(4)
    X = rng.standard_normal((3000, 5))
    y = X.sum(axis=1)
    params = dict(hidden_layer_sizes=(16, 8), learning_rate_init=1e-2, max_epochs=200,
                  n_iter_no_change=20, random_state=0)
    X_test = rng.standard_normal((500, 5))
    y_test = X_test.sum(axis=1)
    slopes = {}
    for noise in (0.0, 1.0):
        model = SigmoidMLPRegressor(input_noise=noise, **params).fit(X, y)
        predicted = model.predict(X_test)
        np.testing.assert_array_equal(predicted, model.predict(X_test))
        slopes[noise] = np.polyfit(y_test, predicted, 1)[0]
    assert slopes[0.0] == pytest.approx(1.0, abs=0.1)
    assert slopes[1.0] == pytest.approx(0.5, abs=0.1)


def test_mlp_input_noise_per_feature_shrinks_only_the_noisy_feature():
    # y = x1 + x2: with noise of std 1 on x1 only, the best predictor is x1 / 2 + x2 --
    # what one noise level per feature (the flux noise of LassoMLPNet) must give.
    rng = np.random.default_rng(4)
    X = rng.standard_normal((3000, 2))
    y = X.sum(axis=1)
    model = SigmoidMLPRegressor(hidden_layer_sizes=(16, 8), learning_rate_init=1e-2, max_epochs=200,
                                n_iter_no_change=20, input_noise=np.array([1.0, 0.0]),
                                random_state=0).fit(X, y)
    X_test = rng.standard_normal((500, 2))
    slopes = np.linalg.lstsq(np.column_stack([X_test, np.ones(500)]), model.predict(X_test),
                             rcond=None)[0][:2]
    np.testing.assert_allclose(slopes, [0.5, 1.0], atol=0.1)
    with pytest.raises(ValueError, match="input_noise has 3 values for 2 features"):
        SigmoidMLPRegressor(input_noise=np.ones(3)).fit(X, y)


def test_adam_step_matches_scikit_learn():
    from sklearn.neural_network._stochastic_optimizers import AdamOptimizer as SkAdam

    from models.networks import AdamOptimizer

    rng = np.random.default_rng(5)
    ours = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
    theirs = [p.copy() for p in ours]
    mine, reference = AdamOptimizer(ours, 1e-2), SkAdam(theirs, learning_rate_init=1e-2)
    for _ in range(5):
        grads = [rng.standard_normal((4, 3)), rng.standard_normal(3)]
        mine.update_params(grads)
        reference.update_params(theirs, grads)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_mlp_whose_validation_loss_is_never_finite_warns_instead_of_crashing():
    rng = np.random.default_rng(6)
    X = rng.uniform(-1, 1, (200, 4))
    y = smooth_function(np.column_stack([X, X[:, :1]]))
    X[::7] = np.nan                  # NaN inputs on training and validation stars alike
    with pytest.warns(RuntimeWarning, match="never finite"):
        model = SigmoidMLPRegressor(hidden_layer_sizes=(8,), max_epochs=5, n_iter_no_change=2,
                                    random_state=0).fit(X, y)
    assert model.best_validation_loss_ == np.inf
    assert len(model.coefs_) == 2 and model.n_epochs_ <= 5


@pytest.mark.parametrize("param, value", [
    ("hidden_layer_sizes", (0, 5)), ("hidden_layer_sizes", ()), ("alpha", -1.0),
    ("learning_rate_init", 0.0), ("batch_size", 0), ("max_epochs", 0),
    ("validation_fraction", 1.0), ("n_iter_no_change", 0), ("input_noise", -0.5),
    ("input_noise", np.array([0.5, -0.1, 0.0]))])
def test_mlp_refuses_invalid_parameters_by_name(param, value):
    X, y = np.zeros((10, 3)), np.arange(10.0)
    with pytest.raises(ValueError, match=param):
        SigmoidMLPRegressor(**{param: value}).fit(X, y)


# --------------------------------------------------------------------------- LASSO-MLPNet

def synthetic_spectra(rng, n_stars, per_star, n_pixels=150, teff_range=(3800, 6500)):
    """Features from three latent labels through fixed random smooth nonlinear maps + noise.

    Each pixel responds (through tanh curves) to a random subset of the labels, like
    spectral lines that depend on temperature, gravity and metallicity.
    """
    teff = rng.uniform(*teff_range, n_stars)
    logg = rng.uniform(1.0, 5.0, n_stars)
    feh = rng.uniform(-1.5, 0.4, n_stars)
    latent = np.column_stack([(teff - 5150) / 1350, (logg - 3) / 2, (feh + 0.55) / 0.95])
    maps = np.random.default_rng(42)                     # the same "physics" for every set
    amplitude = maps.normal(0, 1, (3, n_pixels)) * (maps.random((3, n_pixels)) < 0.3)
    slope = maps.uniform(0.5, 2.0, (3, n_pixels))
    offset = maps.uniform(-1.0, 1.0, (3, n_pixels))
    depth = np.einsum("kp,nkp->np", amplitude, np.tanh(slope[None] * latent[:, :, None] + offset[None]))
    star = np.repeat(np.arange(n_stars), per_star)
    X = 1.0 - 0.1 * depth[star] + 0.01 * rng.standard_normal((star.size, n_pixels))
    labels = {"teff": teff[star], "logg": logg[star], "feh": feh[star]}
    return X, labels, star


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(1)
    X, labels, stars = synthetic_spectra(rng, 150, 2)
    X_test, labels_test, _ = synthetic_spectra(rng, 80, 1)
    model = LassoMLPNet(hidden=SMALL_HIDDEN, n_members=3, cv=3, max_epochs=150, max_lasso_steps=100,
                        n_jobs=1, random_state=0)
    model.fit(X, labels, groups=stars)
    return model, X, labels, X_test, labels_test


def test_lasso_mlpnet_recovers_the_labels(trained):
    model, X, labels, X_test, labels_test = trained
    predicted = model.predict(X_test, snrg=np.full(len(X_test), 15.0))
    for label in LABELS:
        mae = np.mean(np.abs(predicted[label] - labels_test[label]))
        mae_mean_predictor = np.mean(np.abs(labels_test[label] - labels[label].mean()))
        assert mae < 0.5 * mae_mean_predictor, label
        assert np.all(np.isfinite(predicted[label]))
    assert model.estimators_["teff"].log_target and not model.estimators_["feh"].log_target
    # each label selected a subset of the pixels
    for estimator in model.estimators_.values():
        assert 0 < estimator.support_.sum() < X.shape[1]


def test_every_label_networks_see_every_label_selection(trained):
    """shared_pixels (the default): the networks of each label read the pixels LASSO kept
    for any label, and nothing else; a pixel only another label selected moves the
    estimate. The paper's configuration keeps each label's own selection."""
    model, X, _, X_test, _ = trained
    selected = np.any([e.support_ for e in model.estimators_.values()], axis=0)
    teff = model.estimators_["teff"]
    assert not np.array_equal(selected, teff.support_)
    for estimator in model.estimators_.values():
        assert np.array_equal(estimator.input_pixels_, selected)
        assert estimator.members_[0].coefs_[0].shape[0] == selected.sum()
    other = np.flatnonzero(selected & ~teff.support_)[0]
    changed = X_test.copy()
    changed[:, other] += 3.0
    assert not np.allclose(teff.predict(model.scaler_.transform(changed)),
                           teff.predict(model.scaler_.transform(X_test)))
    changed = X_test.copy()
    changed[:, np.flatnonzero(~selected)] += 3.0          # pixels nobody selected: no effect
    assert np.allclose(teff.predict(model.scaler_.transform(changed)),
                       teff.predict(model.scaler_.transform(X_test)))


def test_all_labels_networks_in_one_pool_equal_each_labels_own_fit():
    """LassoMLPNet.fit trains every label's networks in one pool, in order, reporting each
    finished network to ``progress``; each label gets exactly the networks its own
    fit_networks would train, in the same order."""
    import copy
    rng = np.random.default_rng(3)
    X, labels, stars = synthetic_spectra(rng, 40, 2)
    seen = []

    def progress(networks, total):
        seen.append(total)
        for network in networks:
            seen.append(network)
            yield network

    model = LassoMLPNet(hidden=SMALL_HIDDEN, n_members=2, cv=3, max_epochs=15, max_lasso_steps=50,
                        n_jobs=2, random_state=4).fit(X, labels, groups=stars, progress=progress)
    assert seen[0] == 6 and len(seen) == 7
    scaled = model.scaler_.transform(X)
    for label in LABELS:
        pooled = model.estimators_[label]
        alone = copy.deepcopy(pooled).fit_networks(scaled, labels[label], groups=stars,
                                                   pixels=model.selected_pixels())
        assert len(pooled.members_) == 2
        for a, b in zip(pooled.members_, alone.members_):
            for wa, wb in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
                np.testing.assert_array_equal(wa, wb)
        assert not np.array_equal(pooled.members_[0].coefs_[0], pooled.members_[1].coefs_[0])


def test_model_uncertainty_is_the_std_of_the_members(trained):
    model, _, _, X_test, _ = trained                 # not calibrated (``calibrated`` is a copy)
    predicted = model.predict(X_test, snrg=np.full(len(X_test), 15.0))
    scaled = model.scaler_.transform(X_test)
    for label in LABELS:
        members = model.estimators_[label].predict_members(scaled)
        assert members.shape == (3, len(X_test))
        np.testing.assert_allclose(predicted[label], members.mean(axis=0))
        np.testing.assert_allclose(predicted[label + "_err_model"], members.std(axis=0, ddof=1))
        assert np.median(predicted[label + "_err_model"]) > 0          # the members differ
        # the calibrated uncertainty exists only once calibrated
        assert np.all(np.isnan(predicted[label + "_err"]))
    assert set(predicted) == {label + suffix for label in LABELS for suffix in ESTIMATE_SUFFIXES} \
        | {"flags", "ood_score"}


def test_a_one_network_ensemble_has_no_spread_and_bad_sizes_are_refused():
    """One network estimates (what bench/train_vs_recipe.py reports as one member) but has
    no spread: its model uncertainty is NaN, never 0, which would claim a perfect model."""
    rng = np.random.default_rng(5)
    X, labels, stars = synthetic_spectra(rng, 20, 2)
    model = LassoMLPNet(hidden=SMALL_HIDDEN, n_members=1, n_jobs=1, max_epochs=20, cv=3).fit(
        X, labels, groups=stars)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)         # no degrees-of-freedom warning
        predicted = model.predict(X[:5], np.full(5, 15.0))
    for label in LABELS:
        assert np.all(np.isfinite(predicted[label]))
        assert np.all(np.isnan(predicted[label + "_err_model"]))
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="n_members"):
            LassoMLPNet(hidden=SMALL_HIDDEN, n_members=bad, n_jobs=1).fit(X, labels, groups=stars)


def test_flux_noise_is_per_pixel_in_units_of_the_normalised_flux():
    """``flux_noise`` 0.06 for log g: each log g network's inputs get 0.06 in units of the
    normalised flux, i.e. 0.06 / (the pixel's std over the training spectra) once
    standardised, added in quadrature to ``input_noise``; the other labels keep theirs."""
    rng = np.random.default_rng(6)
    X, labels, stars = synthetic_spectra(rng, 20, 2)
    model = LassoMLPNet(n_members=2, cv=3, max_epochs=3, input_noise={"feh": 0.5},
                        flux_noise={"logg": 0.06}, n_jobs=1).fit(X, labels, groups=stars)
    for label, estimator in model.estimators_.items():
        scale = model.scaler_.scale_[estimator.input_pixels_]
        expected = {"teff": np.full(scale.size, 1.0), "feh": np.full(scale.size, 0.5),
                    "logg": np.hypot(1.0, 0.06 / scale)}[label]
        for member in estimator.members_:
            np.testing.assert_allclose(np.broadcast_to(member.input_noise, expected.shape), expected,
                                       rtol=1e-6)
    with pytest.raises(ValueError, match=r"unknown labels \['mass'\]"):
        LassoMLPNet(flux_noise={"mass": 0.1}).fit(X, labels)


def test_paper_configuration_reaches_every_network():
    """``train --paper``: the published sizes, the notebook's per-label learning rates and
    the MLPRegressor defaults the authors ran with reach each label's networks."""
    from etl.cli import build_parser
    from etl.commands.files import degraded_copies_per_spectrum, model_parameters, training_snr_range

    parse = build_parser().parse_args
    assert degraded_copies_per_spectrum(parse(["train", "--paper"])) == 0           # the paper's: none
    assert degraded_copies_per_spectrum(parse(["train"])) == DEFAULT_DEGRADED_COPIES
    assert degraded_copies_per_spectrum(parse(["train", "--paper", "--degraded-copies", "3"])) == 3
    assert training_snr_range(parse(["train", "--paper"])) == (10.0, 20.0)       # the paper's spectra
    assert training_snr_range(parse(["train"])) == (5.0, 80.0)                   # the default
    assert training_snr_range(parse(["train-files", "--catalog", "c", "--spectra-root", "s",
                                     "--labels", "l", "--out", "o", "--paper",
                                     "--snr-range", "8,30"])) == (8.0, 30.0)   # explicit wins
    args = parse(["train", "--paper", "--max-epochs", "3"])
    params = model_parameters(args)
    assert params["max_epochs"] == 3                          # an explicit option still applies
    assert {k: v for k, v in params.items() if k != "max_epochs"} == \
        {k: v for k, v in PAPER_PARAMETERS.items() if k not in ("n_members", "max_epochs")}
    assert model_parameters(build_parser().parse_args(["train"])) == {}    # the defaults
    rng = np.random.default_rng(6)
    X, labels, stars = synthetic_spectra(rng, 20, 2)
    model = LassoMLPNet(**{**params, "n_members": 2}, cv=3, n_jobs=1).fit(X, labels, groups=stars)
    for label, estimator in model.estimators_.items():
        assert estimator.learning_rate_init == PUBLISHED_LEARNING_RATE[label]
        assert tuple(estimator.hidden_layer_sizes) == PUBLISHED_HIDDEN[label]
        assert (estimator.alpha, estimator.batch_size, estimator.n_iter_no_change,
                estimator.input_noise, estimator.flux_noise, estimator.huber_delta) == (1e-4, 200, 10, 0.0, 0.0, 0.0)
        assert np.array_equal(estimator.input_pixels_, estimator.support_)    # its own pixels
        for member in estimator.members_:
            assert member.input_noise == 0.0
            assert member.learning_rate_init == PUBLISHED_LEARNING_RATE[label]
            assert [w.shape[1] for w in member.coefs_[:2]] == list(PUBLISHED_HIDDEN[label])


def test_predict_gives_nan_and_unusable_flag_for_nan_rows(trained, calibrated):
    model = calibrated
    _, _, _, X_test, _ = trained
    X = X_test[:12].copy()
    X[[3, 7]] = np.nan
    X[9, 5] = np.nan                                           # one NaN pixel is enough
    snrg = np.full(len(X), 15.0)
    predicted = model.predict(X, snrg)
    reference = model.predict(X_test[:12], snrg)
    unusable = np.zeros(len(X), dtype=bool)
    unusable[[3, 7, 9]] = True
    for key in ("teff", "teff_err", "teff_err_model", "logg", "logg_err", "feh", "feh_err_model"):
        assert np.all(np.isnan(predicted[key][unusable])), key
        assert np.all(np.isfinite(predicted[key][~unusable])), key
        np.testing.assert_array_equal(predicted[key][~unusable], reference[key][~unusable])
    assert np.all(predicted["flags"][unusable] & UNUSABLE_SPECTRUM)
    assert not np.any(predicted["flags"][~unusable] & UNUSABLE_SPECTRUM)
    assert predicted["flags"].dtype.kind == "i"


def test_out_of_distribution_flag_catches_stars_hotter_than_the_training_set(trained):
    """Stars at 7000-9000 K (training: 3800-6500 K) come out of the networks at ~6200 K,
    inside the domain, with no Teff flag; the out-of-distribution score flags them, and
    not the held-out stars of the training range. The threshold was chosen on the
    training spectra predicted out of fold."""
    model, _, _, X_test, _ = trained
    rng = np.random.default_rng(7)
    X_hot, labels_hot, _ = synthetic_spectra(rng, 60, 1, teff_range=(7000, 9000))
    hot = model.predict(X_hot, np.full(len(X_hot), 15.0))
    assert np.median(hot["teff"]) < 6500                        # the network saturates...
    assert np.mean(hot["flags"] & TEFF_OUT_OF_DOMAIN > 0) < 0.5  # ...so its own flag misses them
    assert np.mean(hot["flags"] & OUT_OF_DISTRIBUTION > 0) > 0.8
    held_out = model.predict(X_test, np.full(len(X_test), 15.0))
    assert np.mean(held_out["flags"] & OUT_OF_DISTRIBUTION > 0) < 0.05
    assert np.all(held_out["ood_score"] >= 0) and np.all(np.isfinite(held_out["ood_score"]))
    # the threshold is a quantile of out-of-fold scores, one per training spectrum
    for estimator in model.estimators_.values():
        assert estimator.selector_.cv_predictions_.shape == (300,)
    assert np.isfinite(model.ood_threshold_) and model.ood_threshold_ >= 0


def test_masked_selected_pixels_flag(trained):
    """A spectrum is flagged when more than MAX_MASKED_SELECTED_FRACTION of one label's
    LASSO-selected pixels were masked (filled); masked pixels no label selected do not count."""
    model, _, _, X_test, _ = trained
    n, p = 4, X_test.shape[1]
    support = model.estimators_["feh"].support_
    selected = np.flatnonzero(support)
    unselected = np.flatnonzero(~np.any([e.support_ for e in model.estimators_.values()], axis=0))
    masked = np.zeros((n, p), dtype=bool)
    just_below = int(np.floor(MAX_MASKED_SELECTED_FRACTION * selected.size))
    masked[1, selected[:just_below]] = True                         # at most the limit: fine
    masked[2, selected[:just_below + 1]] = True                     # above it: flagged
    masked[3, unselected] = True                                    # many, none selected
    out = model.predict(X_test[:n], np.full(n, 15.0), masked=masked)
    assert [bool(f & MASKED_SELECTED_PIXELS) for f in out["flags"]] == [False, False, True, False]
    np.testing.assert_allclose(model.masked_selected_fraction(masked)[2],
                               max((just_below + 1) / selected.size,
                                   *(masked[2, e.support_].mean() for e in model.estimators_.values())))


def test_isolation_is_the_distance_to_the_third_nearest_training_star(trained):
    """In units of each parameter's spread over the training stars (one point per star, its
    mean labels); ``exclude`` leaves a spectrum's own star out of its neighbours, as for the
    cross-fitted predictions of training stars; far beyond the training stars it is large."""
    model, X, labels, _, _ = trained
    stars = np.repeat(np.arange(150), 2)
    points = np.column_stack([np.log10(labels["teff"]), labels["logg"], labels["feh"]])[::2]
    scale = points.std(axis=0)
    raw = {"teff": np.array([labels["teff"][0], 9000.0, np.nan]), "logg": np.array([labels["logg"][0], 0.2, 4.0]),
           "feh": np.array([labels["feh"][0], -3.0, 0.0])}
    query = np.column_stack([np.log10(raw["teff"]), raw["logg"], raw["feh"]])
    distances = np.sort(np.linalg.norm((points[None] - query[:, None]) / scale, axis=2), axis=1)
    isolation = model.isolation(raw)
    # the first spectrum's own star is at distance 0: the third nearest is the second other star
    assert isolation[0] == pytest.approx(distances[0, 2])
    assert model.isolation(raw, exclude=np.array([stars[0], -1, -1]))[0] == pytest.approx(distances[0, 3])
    assert isolation[1] == pytest.approx(distances[1, 2]) and isolation[1] > 5 * isolation[0]
    assert np.isnan(isolation[2])
    older = copy.copy(model)            # an artifact from before the isolation: NaN, no error
    del older.isolation_points_
    assert np.all(np.isnan(older.isolation(raw)))


@pytest.fixture(scope="module")
def calibrated(trained):
    """The trained model calibrated on 150 other stars, four spectra each, at SNRg 6-70."""
    model = copy.deepcopy(trained[0])
    rng = np.random.default_rng(11)
    X, labels, stars = synthetic_spectra(rng, 150, 4)
    snrg = np.tile([7.0, 15.0, 30.0, 60.0], 150)
    model.calibrate(X, labels, snrg, groups=stars)
    return model


def test_calibrate_fits_an_error_model_and_the_repeat_scale(trained, calibrated):
    model = calibrated
    assert list(model.calibration_counts_) == [150, 150, 150, 150]
    rng = np.random.default_rng(11)
    X, labels, stars = synthetic_spectra(rng, 150, 4)
    snrg = np.tile([7.0, 15.0, 30.0, 60.0], 150)
    raw = model.predict_raw(X)
    predicted = model.predict(X, snrg)


    for label in LABELS:
        error_model = model.error_models_[label]
        np.testing.assert_allclose(predicted[label + "_err"],
                                   error_model.predict(snrg, raw[label + "_spread"], star_parameters(raw),
                                                       model.isolation(raw)))
        # the ensemble std is scaled so that repeat pairs of one star have unit rms z-score
        scale = model.repeat_scales_[label]
        assert scale.n_pairs_ == 150 * 6
        np.testing.assert_allclose(predicted[label + "_err_model"], raw[label + "_spread"] * scale.predict(snrg))
        value, err = predicted[label], predicted[label + "_err_model"]
        z = [(value[i] - value[j]) / np.hypot(err[i], err[j])
             for first in range(0, len(X), 4) for i, j in itertools.combinations(range(first, first + 4), 2)]
        assert np.sqrt(np.mean(np.square(z))) == pytest.approx(1.0, rel=1e-3)
    # SNRg below the calibrated bins, or unknown: no calibrated uncertainty is quoted
    out = model.predict(X[:2], np.array([4.0, np.nan]))
    for label in LABELS:
        assert np.all(np.isnan(out[label + "_err"])) and np.all(np.isfinite(out[label + "_err_model"]))


@pytest.mark.parametrize("snrg", [5.0, 2.0, np.nan])
def test_uncertainty_below_or_without_snr_is_nan_and_flagged(calibrated, snrg):
    """Not the smallest (40-80) value as before: at or below SNRg 5, or without SNRg, nothing
    bounds the error, so none is quoted; the estimate itself is kept, and flagged."""
    rng = np.random.default_rng(12)
    X, _, _ = synthetic_spectra(rng, 3, 1)
    out = calibrated.predict(X, np.full(3, snrg))
    for label in LABELS:
        assert np.all(np.isnan(out[label + "_err"]))
        assert np.all(np.isfinite(out[label]))
    assert np.all(out["flags"] & SNR_OUT_OF_DOMAIN)


@pytest.mark.parametrize("snrg", [80.5, 500.0])
def test_uncertainty_above_80_is_the_error_at_the_calibrated_edge(calibrated, snrg):
    """Above the calibrated range the error model is evaluated at SNRg 80: errors fall with
    SNRg, so it bounds the error from above (conservative); the spectrum is flagged."""
    rng = np.random.default_rng(12)
    X, _, _ = synthetic_spectra(rng, 3, 1)
    above, edge = calibrated.predict(X, np.full(3, snrg)), calibrated.predict(X, np.full(3, 80.0))
    for label in LABELS:
        assert np.all(np.isfinite(above[label + "_err"]))
        np.testing.assert_allclose(above[label + "_err"], edge[label + "_err"])
    assert np.all(above["flags"] & SNR_OUT_OF_DOMAIN)


# --------------------------------------------------------------------------- flags

@pytest.mark.parametrize("teff, flagged", [(3499.999, True), (3500.0, False), (5000.0, False),
                                           (6500.0, False), (6500.001, True), (np.nan, False)])
def test_teff_domain_flag(teff, flagged):
    flags = domain_flags([teff], [0.0], [20.0])
    assert bool(flags[0] & TEFF_OUT_OF_DOMAIN) is flagged
    assert flags[0] & ~TEFF_OUT_OF_DOMAIN == 0


@pytest.mark.parametrize("feh, flagged", [(-1.5000001, True), (-1.5, False), (0.5, False), (-3.0, True)])
def test_feh_domain_flag(feh, flagged):
    flags = domain_flags([5000.0], [feh], [20.0])
    assert bool(flags[0] & FEH_OUT_OF_DOMAIN) is flagged
    assert flags[0] & ~FEH_OUT_OF_DOMAIN == 0


@pytest.mark.parametrize("snrg, flagged", [(5.0, True), (5.0001, False), (20.0, False), (80.0, False),
                                           (80.0001, True), (-9999.0, True), (np.nan, True)])
def test_snr_domain_flag(snrg, flagged):
    flags = domain_flags([5000.0], [0.0], [snrg])
    assert bool(flags[0] & SNR_OUT_OF_DOMAIN) is flagged
    assert flags[0] & ~SNR_OUT_OF_DOMAIN == 0


def test_flags_combine_and_describe():
    flags = domain_flags([3000.0, 5000.0, np.nan], [-2.0, 0.0, np.nan], None, usable=[True, True, False])
    assert flags[0] == TEFF_OUT_OF_DOMAIN | FEH_OUT_OF_DOMAIN | SNR_OUT_OF_DOMAIN   # no SNRg: flagged
    assert flags[1] == SNR_OUT_OF_DOMAIN
    assert flags[2] == SNR_OUT_OF_DOMAIN | UNUSABLE_SPECTRUM
    assert len({TEFF_OUT_OF_DOMAIN, FEH_OUT_OF_DOMAIN, SNR_OUT_OF_DOMAIN, NOT_A_STAR, UNUSABLE_SPECTRUM}) == 5
    assert len(describe_flags(int(flags[0]))) == 3
    assert describe_flags(0) == []


def test_flag_bits_are_distinct_and_all_described():
    from models import flags

    assert list(flags.FLAG_DESCRIPTIONS) == [1 << k for k in range(10)]
    assert flags.NOT_ESTIMATED == NOT_A_STAR | UNUSABLE_SPECTRUM | NO_USABLE_REDSHIFT
    text = flags.flag_table_text()
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for bit, description in flags.FLAG_DESCRIPTIONS.items():
        assert f"{bit} = {description}" in text
        assert f"| {bit} | {description} |" in readme, "README flag table out of date"
        assert "|" not in description                # would break markdown tables


@pytest.mark.parametrize("z, expected", [
    (np.nan, NO_USABLE_REDSHIFT), (-9999.0, NO_USABLE_REDSHIFT), (np.inf, NO_USABLE_REDSHIFT),
    (-1.0, NO_USABLE_REDSHIFT), (-2.0, NO_USABLE_REDSHIFT), (0.0, 0), (1e-4, 0),
    (599.0 / 299792.458, 0), (-599.0 / 299792.458, 0), (601.0 / 299792.458, SUSPICIOUS_REDSHIFT),
    (-1205.0 / 299792.458, SUSPICIOUS_REDSHIFT), (0.15, SUSPICIOUS_REDSHIFT)])
def test_redshift_flags(z, expected):
    flags = redshift_flags([0.0, z])
    assert flags[0] == 0 and flags[1] == expected
    assert redshift_flags(z) == expected


@pytest.mark.parametrize("subclass, outside", [
    ("A1", True), ("A0 V", True), ("B9", True), ("O", True), ("F0", True), ("WD", True),
    ("DA", True), ("Carbon", True), ("dM4", True), ("gM3", True), ("M5 III", True),
    ("F2", False), ("F5 V", False), ("G8", False), ("K3", False), ("dM0", False), ("gM2", False),
    ("Non", False), ("", False), (None, False)])
def test_subclass_domain(subclass, outside):
    assert bool(catalogue_flags(1, subclass=[subclass])[0]) is outside


def test_catalogue_flags_from_lasp_teff_and_feh_where_present():
    teff = [5000.0, 7200.0, 3400.0, np.nan, -9999.0, 5000.0, 5000.0]
    feh = [0.0, 0.0, 0.0, 0.0, 0.0, -2.0, -9999.0]
    flags = catalogue_flags(7, teff=teff, feh=feh)
    assert [bool(f) for f in flags] == [False, True, True, False, False, True, False]
    assert set(flags) <= {0, CATALOGUE_OUT_OF_DOMAIN}
    assert not catalogue_flags(3).any()


# --------------------------------------------------------------------------- artifact

@pytest.fixture()
def artifact(tmp_path, trained):
    model, X, labels, _, _ = trained
    config = PreprocessConfig(wave_min=3881.0, wave_max=7400.0)
    training = training_set_description(np.arange(len(X)) + 900000001, np.full(len(X), 15.0), labels)
    path = tmp_path / "models" / "model.joblib"
    version, sha = save_model(path, model, config, training, metrics={"mae": 1.0})
    return path, version, sha, config, training


def test_artifact_round_trip_gives_identical_predictions(artifact, trained):
    model, _, _, X_test, _ = trained
    path, version, sha, config, training = artifact
    loaded = load_model(path)
    assert loaded["format"] == ARTIFACT_FORMAT
    assert loaded["version"] == version and version.startswith("lmn-")
    assert training["obsid_sha256"][:8] in version
    assert sha == file_sha256(path)
    assert loaded["preprocess"] == config and loaded["preprocess_hash"] == config.digest()
    assert loaded["training"] == training and loaded["metrics"] == {"mae": 1.0}
    assert loaded["libraries"]["scikit-learn"] == sklearn.__version__
    snrg = np.linspace(6, 70, len(X_test))
    before, after = model.predict(X_test, snrg), loaded["model"].predict(X_test, snrg)
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def tamper(path, **changes):
    """Rewrite the artifact with ``changes`` and a sidecar that vouches for the new bytes (as
    another lamost-vac or library version would have written them)."""
    payload = joblib.load(path)
    for key, value in changes.items():
        if key == "sklearn":
            payload["libraries"]["scikit-learn"] = value
        else:
            payload[key] = value
    joblib.dump(payload, path)
    write_sidecar(path, payload)


def test_artifact_of_another_format_is_refused(artifact):
    path = artifact[0]
    tamper(path, format=ARTIFACT_FORMAT + 1)
    with pytest.raises(IncompatibleArtifactError, match=rf"format {ARTIFACT_FORMAT + 1}.*retrain") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_artifact_from_another_sklearn_minor_is_refused(artifact):
    path = artifact[0]
    major, minor = (int(part) for part in sklearn.__version__.split(".")[:2])
    tamper(path, sklearn=f"{major}.{minor + 1}.0")
    with pytest.raises(IncompatibleArtifactError, match=rf"scikit-learn {major}\.{minor + 1}\.0.*retrain"):
        load_model(path)
    tamper(path, sklearn=f"{major - 1}.{minor}.0")
    with pytest.raises(IncompatibleArtifactError, match="scikit-learn"):
        load_model(path)


def test_artifact_from_another_sklearn_patch_release_loads(artifact):
    path = artifact[0]
    major, minor = sklearn.__version__.split(".")[:2]
    tamper(path, sklearn=f"{major}.{minor}.999")
    with pytest.warns(ArtifactVersionWarning, match=rf"scikit-learn {major}\.{minor}\.999"):
        assert load_model(path)["version"] == artifact[1]


@pytest.mark.parametrize("content", ["text", "joblib-list", "joblib-dict", "empty"])
def test_non_artifact_file_is_refused(tmp_path, content):
    path = tmp_path / "not-a-model.joblib"
    if content == "text":
        path.write_text("obsid,teff\n1,5000\n")
    elif content == "joblib-list":
        joblib.dump([1, 2, 3], path)
    elif content == "joblib-dict":
        joblib.dump({"model": None}, path)
    else:
        path.write_bytes(b"")
    # even with a sidecar vouching for its bytes, a file that is not an artifact is refused
    with open(sidecar_path(path), "w") as handle:
        json.dump({"sha256": file_sha256(path), "format": ARTIFACT_FORMAT, "version": "lmn-x",
                   "preprocess_hash": "0" * 16, "libraries": library_versions()}, handle)
    with pytest.raises(IncompatibleArtifactError, match="not a lamost-vac model artifact") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_missing_artifact_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.joblib")


def test_bootstrap_members_select_their_own_pixels_and_predict_as_well():
    """member_selection="bootstrap": every member has its own LASSO selection (from its own
    bootstrap sample of the stars, at the full set's alpha), the members disagree more than
    members that differ only by initialisation, and the estimates follow the labels."""
    from models.selection import lasso_support_at

    rng = np.random.default_rng(3)
    X, labels, stars = synthetic_spectra(rng, 150, 2)
    X_test, labels_test, _ = synthetic_spectra(rng, 80, 1)
    common = dict(hidden=SMALL_HIDDEN, n_members=4, cv=3, max_epochs=60, n_jobs=1, random_state=0)
    shared = LassoMLPNet(**common).fit(X, labels, groups=stars)
    bootstrap = LassoMLPNet(member_selection="bootstrap", **common).fit(X, labels, groups=stars)
    assert shared.estimators_["teff"].member_supports_ is None
    for label in LABELS:
        estimator = bootstrap.estimators_[label]
        supports = estimator.member_supports_
        assert len(supports) == 4 and all(s.shape == (X.shape[1],) and s.any() for s in supports)
        assert len({s.tobytes() for s in supports}) > 1           # not one shared selection
        # the full set at the full set's alpha gives back the cross-validated selection
        full = lasso_support_at(shared.scaler_.transform(X), estimator._target(labels[label]),
                                estimator.selector_.alpha_)
        assert np.array_equal(full, shared.estimators_[label].support_)
    raw_shared, raw_boot = shared.predict_raw(X_test), bootstrap.predict_raw(X_test)
    for label in LABELS:
        assert np.median(raw_boot[label + "_spread"]) > np.median(raw_shared[label + "_spread"])
        # each member saw ~63% of the stars: whether that costs accuracy is measured by
        # bench/tune_lasso_mlpnet.py on the reference set; here only that it estimates
        assert np.corrcoef(raw_boot[label], labels_test[label])[0, 1] > 0.8, label
    with pytest.raises(ValueError, match="member_selection"):
        LassoMLPNet(member_selection="bagged", **common).fit(X, labels, groups=stars)


def test_a_spectrum_without_lines_is_flagged_out_of_distribution(trained):
    """A constant, a smooth ramp or pure noise came out as a confident in-domain star with
    flags 0: the linear estimates of a line-free spectrum lie inside the training range
    (found by review). Their line content is ~0; the training stars' is ~1."""
    model, X, _, X_test, _ = trained
    n_pixels = X.shape[1]
    rng = np.random.default_rng(3)
    featureless = np.vstack([np.ones(n_pixels), np.linspace(0.9, 1.1, n_pixels),
                             1.0 + 0.05 * rng.standard_normal(n_pixels)])
    out = model.predict(featureless, np.full(3, 15.0))
    assert np.all(out["flags"] & OUT_OF_DISTRIBUTION)
    assert np.all(model.line_content(featureless) < min(0.25, model.line_content_threshold_))
    assert abs(np.median(model.line_content(X)) - 1.0) < 0.2
    held_out = model.predict(X_test, np.full(len(X_test), 15.0))
    assert np.mean(model.line_content(X_test) < model.line_content_threshold_) < 0.03
    assert np.mean(held_out["flags"] & OUT_OF_DISTRIBUTION > 0) < 0.05
