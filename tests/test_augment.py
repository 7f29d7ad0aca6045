"""Low-S/N copies of training spectra (models/augment.py): a copy must be, statistically, an
observation of the same star at the lower S/N it claims, with the noise following the
spectrum's own inverse variance pixel by pixel."""
import numpy as np
import pytest

from models.augment import DegradedCopies, degrade_spectrum, degraded_copies, featurise_degraded_copies
from models.readers import Spectrum

N_PIXELS = 200_000


def spectrum_at(snr, rng, n=N_PIXELS):
    """Flux 1 observed at S/N ``snr`` in the middle, noisier towards the blue end (as LAMOST):
    per-pixel sigma from 3x to 1x the middle's."""
    sigma = (1.0 / snr) * np.linspace(3.0, 1.0, n)
    ivar = 1.0 / sigma ** 2
    ivar[:1000] = 0.0                                   # no data
    flux = 1.0 + rng.standard_normal(n) * sigma
    return Spectrum(path="test", wavelength=np.linspace(3700.0, 9100.0, n), flux=flux.astype(np.float32),
                    ivar=ivar.astype(np.float32), andmask=np.zeros(n, np.int32),
                    ormask=np.zeros(n, np.int32), meta={}, layout="test")


def test_the_noise_added_follows_each_pixels_inverse_variance():
    rng = np.random.default_rng(1)
    original = spectrum_at(60.0, rng)
    factor = 3.0
    copy = degrade_spectrum(original, factor, rng)
    good = original.ivar > 0
    added = (copy.flux[good].astype(float) - original.flux[good]) * np.sqrt(original.ivar[good] / (factor ** 2 - 1))
    assert abs(added.mean()) < 0.01 and abs(added.std() - 1.0) < 0.01
    # per pixel, not one level: the blue (noisy) third got more noise than the red third
    third = good.sum() // 3
    raw = copy.flux[good].astype(float) - original.flux[good]
    assert raw[:third].std() > 1.5 * raw[-third:].std()
    np.testing.assert_allclose(copy.ivar, original.ivar / factor ** 2, rtol=1e-6)
    np.testing.assert_array_equal(copy.flux[~good], original.flux[~good])
    # the original is not touched, and the rest of the spectrum is carried over
    assert copy.wavelength is original.wavelength and copy.meta is original.meta


def test_a_copy_is_an_observation_at_the_lower_snr():
    rng = np.random.default_rng(2)
    original = spectrum_at(60.0, rng)
    copy = degrade_spectrum(original, 4.0, rng)             # S/N 60 -> 15
    good = original.ivar > 0
    # total noise about the true flux (1) is what its ivar says: chi2 per pixel ~ 1
    z = (copy.flux[good] - 1.0) * np.sqrt(copy.ivar[good])
    assert abs(z.std() - 1.0) < 0.01
    # the S/N LAMOST's pipeline would quote, the median of flux * sqrt(ivar), drops by the
    # factor: ~60 -> ~15 at the red end
    red = slice(-5000, None)
    quoted = np.median(original.flux[red] * np.sqrt(original.ivar[red]))
    assert quoted == pytest.approx(60.0, rel=0.03)
    assert np.median(copy.flux[red] * np.sqrt(copy.ivar[red])) == pytest.approx(quoted / 4.0, rel=0.01)


@pytest.mark.parametrize("factor", [0.5, float("nan")])
def test_a_factor_that_would_remove_noise_is_refused(factor):
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="noise factor"):
        degrade_spectrum(spectrum_at(20.0, rng, n=100), factor, rng)


def test_copies_are_planned_only_from_spectra_above_the_range():
    snrg = np.array([8.0, 15.0, 20.0, 25.0, np.nan, 70.0])
    source, factor = degraded_copies(snrg, 4, snr_range=(5.0, 20.0), rng=7)
    np.testing.assert_array_equal(source, [3, 3, 3, 3, 5, 5, 5, 5])
    target = snrg[source] / factor
    assert np.all((target >= 5.0) & (target <= 20.0)) and np.all(factor > 1)
    again = degraded_copies(snrg, 4, snr_range=(5.0, 20.0), rng=7)
    np.testing.assert_array_equal(again[1], factor)


def test_copy_snr_is_log_uniform_over_the_range():
    source, factor = degraded_copies(np.full(5000, 80.0), 4, snr_range=(5.0, 20.0), rng=8)
    target = 80.0 / factor
    assert source.size == 20_000
    # log-uniform over 5-20: half below the geometric middle, 10
    assert np.mean(target < 10.0) == pytest.approx(0.5, abs=0.02)
    assert target.min() < 5.1 and target.max() > 19.9


def test_copies_are_capped_in_all():
    snrg = np.full(1000, 60.0)
    source, _ = degraded_copies(snrg, 24, rng=1, max_copies=5000)
    # as many per spectrum as fit: 5 of each
    np.testing.assert_array_equal(np.bincount(source, minlength=1000), np.full(1000, 5))
    source, _ = degraded_copies(snrg, 24, rng=1, max_copies=300)
    # more spectra than copies: one copy each of a random 300
    assert source.size == 300 == np.unique(source).size and source.max() > 900


def test_first_keeps_the_first_copies_of_every_source():
    copies = DegradedCopies(source=np.array([2, 2, 2, 7, 7, 7]), snrg=np.arange(6.0),
                            features=np.arange(12.0).reshape(6, 2), per_spectrum=3, snr_range=(5.0, 20.0))
    first = copies.first(2)
    np.testing.assert_array_equal(first.source, [2, 2, 7, 7])
    np.testing.assert_array_equal(first.snrg, [0, 1, 3, 4])
    assert first.per_spectrum == 2 and copies.first(5).source.size == 6


def test_copies_train_only_the_models_that_train_on_their_star():
    from models.training import training_rows

    features = np.arange(10.0)[:, None] * np.ones((1, 3))
    stars = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    labels = {"teff": 4000.0 + 100 * stars, "logg": 1.0 + stars, "feh": -0.1 * stars}
    copies = DegradedCopies(source=np.array([1, 1, 3, 9]), snrg=np.full(4, 8.0),
                            features=np.array([[50.0] * 3, [51.0] * 3, [52.0] * 3, [np.nan] * 3]),
                            per_spectrum=2, snr_range=(5.0, 20.0))
    fit = np.isin(stars, [0, 4]) & (np.arange(10) % 2 == 0)       # a fold without stars 1-3
    X, y, groups, observed = training_rows(features, labels, stars, fit, copies)
    # the fit rows, then the copies of star 0 (star 4's copy could not be made: NaN)
    np.testing.assert_array_equal(X[:, 0], [0, 8, 50, 51])
    np.testing.assert_array_equal(groups, [0, 4, 0, 0])
    np.testing.assert_array_equal(observed, [True, True, False, False])
    np.testing.assert_array_equal(y["logg"], [1, 5, 1, 1])
    X, _, groups, observed = training_rows(features, labels, stars, np.isin(stars, [1]), copies)
    np.testing.assert_array_equal(groups, [1, 1, 1])                  # star 1's own copy
    X, _, groups, observed = training_rows(features, labels, stars, np.isin(stars, [2]), None)
    assert observed.all() and X.shape == (2, 3)
    # a copy of a spectrum without reference labels never trains
    unlabelled = {k: np.where(np.arange(10) == 1, np.nan, v) for k, v in labels.items()}
    X, y, groups, observed = training_rows(features, unlabelled, stars, np.isin(stars, [0]) & (np.arange(10) == 0),
                                           copies)
    np.testing.assert_array_equal(X[:, 0], [0])
    np.testing.assert_array_equal(observed, [True])


def test_copies_do_not_set_the_thresholds_of_real_spectra():
    """A copy trains the networks but is not a spectrum the model will be given: line-free
    copies (a sky-subtraction failure's flux) must not lower the line-content threshold."""
    from models.lasso_mlpnet import LassoMLPNet
    from test_model import synthetic_spectra

    rng = np.random.default_rng(4)
    X, labels, stars = synthetic_spectra(rng, 60, 2)
    flat = np.ones((30, X.shape[1]))
    X_all = np.vstack([X, flat])
    labels_all = {k: np.concatenate([v, v[:30]]) for k, v in labels.items()}
    groups = np.concatenate([stars, stars[:30]])
    observed = np.arange(len(X_all)) < len(X)
    params = dict(hidden={k: (8, 4) for k in labels}, n_members=1, cv=3, max_epochs=20,
                  max_lasso_steps=50, n_jobs=1, random_state=0)
    as_copies = LassoMLPNet(**params).fit(X_all, labels_all, groups=groups, observed=observed)
    as_real = LassoMLPNet(**params).fit(X_all, labels_all, groups=groups)
    assert as_real.line_content_threshold_ <= 0.0 + 1e-9 < as_copies.line_content_threshold_
    content = as_copies.line_content(X)
    assert as_copies.line_content_threshold_ == pytest.approx(0.5 * np.quantile(content, 0.01))
    # the out-of-distribution threshold too: the quantile over the observed rows' scores
    assert np.isfinite(as_copies.ood_threshold_)


def test_featurised_copies_do_not_depend_on_the_chunking(simulated_set):
    from models.pipeline import featurise_files
    from models.preprocess import PreprocessConfig

    config = PreprocessConfig(wave_min=3881.0, wave_max=7400.0)
    paths = sorted(str(p) for p in simulated_set.glob("spectra/**/*.fits*"))[:4]
    originals = featurise_files(paths, np.full(len(paths), np.nan), config, n_jobs=1)
    snrg = np.array([15.0, 15.0, 4.0, 15.0])           # the third is below the range: no copies
    usable = np.array([True, True, True, False])          # the fourth may not be copied
    kwargs = dict(snr_range=(3.0, 8.0), usable=usable, seed=5)
    one = featurise_degraded_copies(paths, originals.z, snrg, 3, config, n_jobs=1, **kwargs)
    chunked = featurise_degraded_copies(paths, originals.z, snrg, 3, config, n_jobs=2, chunk_size=2, **kwargs)
    np.testing.assert_array_equal(one.source, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(one.features, chunked.features)
    assert np.isfinite(one.features).all() and np.all((one.snrg > 3) & (one.snrg <= 8))
    # noisier than their source, more so the lower their S/N
    scatter = np.std(one.features - originals.features[one.source], axis=1)
    assert np.all(scatter > 0)
    assert np.corrcoef(scatter, 1.0 / one.snrg)[0, 1] > 0.5
