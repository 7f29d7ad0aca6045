"""Low-S/N copies of training spectra (models/augment.py): a copy must be, statistically, an
observation of the same star at the lower S/N it claims, with the noise following the
spectrum's own inverse variance pixel by pixel."""
import numpy as np
import pytest

from models.augment import degrade_spectrum, degraded_copies
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
