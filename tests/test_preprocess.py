"""Properties of the vectorised preprocessing (models/preprocess.py).

Every test builds spectra on the LAMOST log-linear grid (log10 lambda = 3.5682 + 1e-4 i,
3909 pixels) with known content and checks a property the method must have: a pure
continuum normalises to 1, lines return to their rest wavelength, masked pixels do not
leak, the vectorised helpers agree with straightforward references, and a batch gives
the same features as its rows one at a time.
"""
import dataclasses
import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import median_filter

from models.preprocess import (DEFAULT_MASKED_REGIONS, INSTRUMENT_REGIONS, PreprocessConfig,
                               cosmic_ray_spikes,
                               SpectrumStack, bridge_masked, continuum_normalise,
                               fit_pseudo_continuum, masked_regions_from_names, median_filter3,
                               preprocess_spectra, resample_rest_frame)

LAMOST_LOGLAM0 = 3.5682
LAMOST_NPIX = 3909
CONFIG = PreprocessConfig()


def lamost_wavelength(npix=LAMOST_NPIX, first_pixel=0):
    return 10.0 ** (LAMOST_LOGLAM0 + 1e-4 * (first_pixel + np.arange(npix)))


def planck(wavelength, teff):
    """Black-body shape (arbitrary units) at ``wavelength`` in Angstrom."""
    x = 1.438777e8 / (wavelength * teff)          # h c / (lambda k T), lambda in Angstrom
    return 1e20 / wavelength**5 / np.expm1(x)


def make_spectrum(flux, wavelength=None, ivar=None, andmask=None):
    wavelength = lamost_wavelength(flux.size) if wavelength is None else wavelength
    return SimpleNamespace(
        wavelength=wavelength,
        flux=np.asarray(flux, dtype=np.float32),
        ivar=np.ones(flux.size, dtype=np.float32) if ivar is None else np.asarray(ivar, np.float32),
        andmask=np.zeros(flux.size, dtype=np.int32) if andmask is None else np.asarray(andmask, np.int32))


def absorption(wavelength, centres, depth=0.5, sigma_pixels=2.0):
    """1 minus Gaussian lines of ``depth`` at ``centres`` (Angstrom), width in grid pixels."""
    profile = np.ones_like(wavelength)
    for centre in centres:
        sigma = centre * np.log(10) * 1e-4 * sigma_pixels
        profile -= depth * np.exp(-0.5 * ((wavelength - centre) / sigma) ** 2)
    return profile


def star_like(rng, wavelength, teff=5500.0, z=0.0, noise=0.01,
              lines=(4101.7, 4340.5, 4861.3, 5183.6, 5269.5, 5895.9, 6562.8, 8542.1)):
    """Observed-frame flux of a black body with absorption lines, redshifted by ``z``."""
    rest = wavelength / (1.0 + z)
    flux = planck(rest, teff) * absorption(rest, lines)
    return flux * (1.0 + noise * rng.standard_normal(wavelength.size))


# --------------------------------------------------------------------------- configuration

def test_output_grid_is_log_linear_over_the_configured_range():
    config = PreprocessConfig(wave_min=3881.0, wave_max=7400.0)
    loglam = config.loglam
    assert np.allclose(np.diff(loglam), 1e-4, rtol=0, atol=1e-12)
    assert loglam[0] == pytest.approx(np.log10(3881.0), abs=1e-12)
    assert loglam[-1] <= np.log10(7400.0) + 1e-12
    assert loglam[-1] > np.log10(7400.0) - 1e-4
    assert np.allclose(config.wavelength, 10.0**loglam)


def test_digest_is_stable_and_changes_with_every_parameter():
    base = PreprocessConfig()
    assert base.digest() == PreprocessConfig().digest()
    digests = {base.digest()}
    other = {"masked_regions": (), "continuum": "per-arm"}        # the non-numeric fields
    for field in dataclasses.fields(PreprocessConfig):
        value = getattr(base, field.name)
        if field.name in other:
            value = other[field.name]
        else:
            value = value + (1 if isinstance(value, int) else 0.5 * value)
        changed = dataclasses.replace(base, **{field.name: value})
        assert changed.digest() != base.digest(), field.name
        digests.add(changed.digest())
    assert len(digests) == len(dataclasses.fields(PreprocessConfig)) + 1


# --------------------------------------------------------------------------- whole pipeline

@pytest.mark.parametrize("kind", ["planck-4500", "planck-5800", "planck-9000", "polynomial"])
@pytest.mark.parametrize("z", [0.0, -1.2e-3, 2.5e-3])
def test_pure_continuum_normalises_to_one(kind, z):
    """A smooth continuum divides out to 1 within 1e-3 everywhere.

    (Below ~4000 K a black body over 3881-8890 A is beyond what a 6th-order polynomial
    follows to 1e-3 -- ~1e-3 misfit at 3800 K -- a limit of the published method.)
    """
    wavelength = lamost_wavelength()
    rest = wavelength / (1.0 + z)
    if kind == "polynomial":
        x = np.log10(rest) - 3.75
        flux = 3.0 + 8.0 * x - 20.0 * x**2 + 30.0 * x**3
        assert flux.min() > 0.5
    else:
        flux = planck(rest, float(kind.split("-")[1]))
    spectrum = make_spectrum(flux, wavelength)
    features, good_fraction = preprocess_spectra([spectrum], [z], CONFIG)
    assert features.shape == (1, CONFIG.loglam.size)
    assert good_fraction[0] == pytest.approx(1.0)
    assert np.all(np.isfinite(features))
    assert np.max(np.abs(features - 1.0)) < 1e-3


@pytest.mark.parametrize("z", [-2.0e-3, -6.0e-4, 0.0, 4.0e-4, 1.5e-3, 3.0e-3])
def test_lines_return_to_their_rest_wavelength(z):
    """Line centres, found on the output grid, sit at the rest wavelengths within half a pixel.

    At these redshifts the lines move by 1.7-13 pixels in the observed frame, so an
    ignored or wrong-signed shift is caught.
    """
    rest_lines = (4226.7, 4861.3, 5183.6, 6162.2, 6562.8, 8542.1)    # none in a masked region
    wavelength = lamost_wavelength()
    flux = planck(wavelength / (1 + z), 6000.0) * absorption(wavelength / (1 + z), rest_lines, depth=0.6)
    features, _ = preprocess_spectra([make_spectrum(flux, wavelength)], [z], CONFIG)
    row = features[0].astype(float)
    loglam = CONFIG.loglam
    for line in rest_lines:
        expected = (np.log10(line) - loglam[0]) / CONFIG.dloglam          # fractional pixel
        window = slice(int(expected) - 6, int(expected) + 7)
        i = window.start + int(np.argmin(row[window]))
        left, mid, right = row[i - 1], row[i], row[i + 1]
        centre = i + 0.5 * (left - right) / (left - 2 * mid + right)      # parabola vertex
        assert abs(centre - expected) < 0.5, (line, z, centre - expected)
        assert row[i] < 0.7                                               # the line is there


def test_resample_rest_frame_maps_rest_pixels_to_shifted_observed_pixels():
    """Resampling a linear function of log10(lambda_obs) is exact: check it directly."""
    wavelength = lamost_wavelength()
    loglam_obs = np.log10(wavelength)
    spectra = [make_spectrum(1.0 + 10.0 * (loglam_obs - 3.5)) for _ in range(3)]
    z = np.array([-1e-3, 0.0, 2e-3])
    stack = SpectrumStack.from_spectra(spectra)
    flux, good = resample_rest_frame(stack, z, CONFIG.loglam)
    expected = 1.0 + 10.0 * (CONFIG.loglam[None, :] + np.log10(1 + z)[:, None] - 3.5)
    assert good.all()
    assert np.allclose(flux, expected, rtol=0, atol=1e-5)     # float32 input


def test_outside_the_observed_range_is_not_good():
    # a spectrum covering only 4000-6000 A: the rest of the output grid has no data
    wavelength = 10.0 ** np.arange(np.log10(4000.0), np.log10(6000.0), 1e-4)
    stack = SpectrumStack.from_spectra([make_spectrum(np.ones(wavelength.size), wavelength)])
    _, good = resample_rest_frame(stack, [0.0], CONFIG.loglam)
    wave = CONFIG.wavelength
    assert not good[0, wave < 3999.0].any()
    assert not good[0, wave > 6001.0].any()
    assert good[0, (wave > 4001.0) & (wave < 5998.0)].all()


@pytest.mark.parametrize("how", ["ivar", "andmask"])
@pytest.mark.parametrize("spike", [1e6, -1e6, 3e38, np.inf, np.nan])
def test_masked_pixels_do_not_leak(how, spike):
    """A masked pixel may hold anything: the features are the same as with a sane value."""
    rng = np.random.default_rng(7)
    wavelength = lamost_wavelength()
    flux = star_like(rng, wavelength, z=3e-4)
    ivar = np.ones(flux.size)
    andmask = np.zeros(flux.size, dtype=np.int32)
    bad = [5, 800, 801, 1500, 2200, 3100, 3905]           # edges, a pair and isolated pixels
    if how == "ivar":
        ivar[bad] = 0.0
    else:
        andmask[bad] = 1 << 23                           # any and-mask bit
    clean = make_spectrum(flux, wavelength, ivar, andmask)
    spiked_flux = flux.copy()
    spiked_flux[bad] = spike
    with np.errstate(invalid="ignore", over="ignore"):
        spiked = make_spectrum(spiked_flux, wavelength, ivar, andmask)
        features, good_fraction = preprocess_spectra([clean, spiked], [3e-4, 3e-4], CONFIG)
    assert np.all(np.isfinite(features))
    assert good_fraction[0] == good_fraction[1] < 1.0
    assert np.max(np.abs(features[0] - features[1])) < 1e-6


def test_masked_pixels_are_ignored_not_fitted():
    """A block of masked garbage leaves the features of the good pixels as without the block."""
    rng = np.random.default_rng(11)
    wavelength = lamost_wavelength()
    flux = star_like(rng, wavelength, noise=0.0)
    masked = (wavelength > 5000) & (wavelength < 5100)
    ivar = np.where(masked, 0.0, 1.0)
    garbage = np.where(masked, 50.0 * flux, flux)
    features, good_fraction = preprocess_spectra(
        [make_spectrum(flux, wavelength), make_spectrum(garbage, wavelength, ivar)], [0.0, 0.0], CONFIG)
    rest = CONFIG.wavelength
    far = (rest < 4990) | (rest > 5110)
    # the continuum is fitted without those pixels (slightly different), nowhere near 50x
    assert np.max(np.abs(features[1][far] - features[0][far])) < 0.02
    # masked output pixels hold the bridged flux over the continuum: close to the clean
    # spectrum's (a line-free stretch), nothing of the garbage
    inside = (rest > 5002) & (rest < 5098)
    assert np.max(np.abs(features[1][inside] - features[0][inside])) < 0.05
    assert good_fraction[1] < good_fraction[0]


@pytest.mark.parametrize("how", ["ivar", "andmask"])
def test_masked_line_core_reads_as_a_line_not_as_continuum(how):
    """A masked line core is filled with the bridged flux over the continuum: the feature
    stays as deep as the line's wings, never 1 ("no line", what a fill of 1 would claim)."""
    wavelength = lamost_wavelength()
    flux = planck(wavelength, 5500.0) * absorption(wavelength, [5183.6], depth=0.7, sigma_pixels=3.0)
    core = np.abs(wavelength - 5183.6) < 5.183 * 2.5 * 1e-3 * np.log(10) * 1e3 * 0.1   # ~3 pixels
    assert 2 <= core.sum() <= 5
    ivar = np.where(core, 0.0, 1.0) if how == "ivar" else None
    andmask = np.where(core, 1 << 1, 0) if how == "andmask" else None
    spectra = [make_spectrum(flux, wavelength), make_spectrum(flux, wavelength, ivar, andmask)]
    features, _ = preprocess_spectra(spectra, [0.0, 0.0], CONFIG)
    centre = np.argmin(np.abs(CONFIG.wavelength - 5183.6))
    assert features[0, centre] < 0.45                     # the line, unmasked
    # bridged between the good pixels next to the core: deeper than 0.7, shallower than the core
    assert features[0, centre] <= features[1, centre] < 0.7
    # and reported as filled, for the masked-selected-pixels flag
    again, _, masked = preprocess_spectra(spectra, [0.0, 0.0], CONFIG, return_masked=True)
    np.testing.assert_array_equal(again, features)
    assert masked[1, centre] and not masked[0].any()


def test_instrument_regions_are_filled_in_the_observed_frame():
    """Pixels whose observed wavelength is in a masked region (default: the dichroic and the
    O2 bands) do not depend on the flux there, and the region moves with the redshift."""
    rng = np.random.default_rng(4)
    wavelength = lamost_wavelength()
    z = 1.5e-3                                            # 450 km/s: ~8.6 A at 5800 A
    clean = star_like(rng, wavelength, z=z, noise=0.0)
    spoiled = clean * np.where((wavelength > 5700) & (wavelength < 5900), 3.0, 1.0)   # a bad overlap
    spoiled = spoiled * np.where((wavelength > 7590) & (wavelength < 7700), 0.2, 1.0)  # O2 A band
    features, good_fraction, masked = preprocess_spectra(
        [make_spectrum(clean, wavelength), make_spectrum(spoiled, wavelength)], [z, z], CONFIG,
        return_masked=True)
    np.testing.assert_allclose(features[1], features[0], rtol=0, atol=1e-5)
    # the regions are masked in every spectrum alike: not counted as masked data
    assert good_fraction[0] == good_fraction[1] == pytest.approx(1.0)
    assert not masked.any()
    # without the regions the damage shows, and it sits where the observed frame puts it
    bare = dataclasses.replace(CONFIG, masked_regions=())
    unmasked, _ = preprocess_spectra([make_spectrum(clean, wavelength), make_spectrum(spoiled, wavelength)],
                                     [z, z], bare)
    rest = CONFIG.wavelength
    damaged = np.abs(unmasked[1] - unmasked[0]) > 0.5
    assert damaged[(rest * (1 + z) > 5705) & (rest * (1 + z) < 5895)].all()
    assert not damaged[(rest > 5900) & (rest * (1 + z) > 5905) & (rest < 7500)].any()
    # the O2 A band, observed 7590-7700 A, is rest 7578.6-7688.5 A at this z
    assert np.abs(unmasked[1] - unmasked[0])[(rest > 7580) & (rest < 7686)].min() > 0.3


def test_masked_regions_by_name():
    regions = masked_regions_from_names("dichroic, H2O 8200")
    assert regions == (("dichroic", 5700.0, 5900.0), ("H2O 8200", 8130.0, 8350.0))
    assert masked_regions_from_names("none") == ()
    assert set(INSTRUMENT_REGIONS) >= {"dichroic", "O2 B", "O2 A", "H2O 7200", "H2O 8200", "sky forest"}
    assert [name for name, _, _ in PreprocessConfig().masked_regions] == ["dichroic", "O2 B", "O2 A"]
    with pytest.raises(ValueError, match="unknown instrument region 'O3'"):
        masked_regions_from_names("O3")
    # a list (as from JSON) gives the same configuration and hash as tuples
    as_lists = PreprocessConfig(masked_regions=[list(r) for r in DEFAULT_MASKED_REGIONS])
    assert as_lists == PreprocessConfig() and as_lists.digest() == PreprocessConfig().digest()
    with pytest.raises(ValueError, match="continuum"):
        PreprocessConfig(continuum="spline")


def test_per_arm_continuum_follows_a_jump_between_the_arms():
    """A flux-calibration step between the arms (red arm 30% high) defeats one polynomial;
    one polynomial per arm normalises both sides (the paper's single fit stays an option)."""
    wavelength = lamost_wavelength()
    flux = planck(wavelength, 5800.0) * np.where(wavelength < 5800.0, 1.0, 1.3)
    spectrum = make_spectrum(flux, wavelength)
    single, _ = preprocess_spectra([spectrum], [0.0], CONFIG)
    per_arm, _ = preprocess_spectra([spectrum], [0.0], dataclasses.replace(CONFIG, continuum="per-arm"))
    rest = CONFIG.wavelength
    away = (np.abs(rest - 5800.0) > 150.0)
    assert np.max(np.abs(per_arm[0, away] - 1.0)) < 5e-3
    assert np.max(np.abs(single[0, away] - 1.0)) > 0.05


def test_spectrum_with_too_few_good_pixels_gives_nan_row():
    rng = np.random.default_rng(3)
    wavelength = lamost_wavelength()
    flux = star_like(rng, wavelength)
    rest = CONFIG.wavelength
    share = lambda cut: np.mean(rest < cut)                        # noqa: E731
    cut_bad, cut_ok = 6900.0, 5400.0
    assert share(cut_bad) > 0.55 and share(cut_ok) < 0.45
    spectra = [make_spectrum(flux, wavelength, np.where(wavelength < cut, 0.0, 1.0))
               for cut in (cut_bad, cut_ok)]
    spectra.append(make_spectrum(flux, wavelength, np.zeros(flux.size)))          # nothing good
    features, good_fraction = preprocess_spectra(spectra, [0.0, 0.0, 0.0], CONFIG)
    assert np.all(np.isnan(features[0]))
    assert np.all(np.isfinite(features[1]))
    assert np.all(np.isnan(features[2]))
    assert good_fraction[0] == pytest.approx(1.0 - share(cut_bad), abs=0.01)
    assert good_fraction[1] == pytest.approx(1.0 - share(cut_ok), abs=0.01)
    assert good_fraction[2] == 0.0


def test_batch_equals_row_by_row():
    """Rows of different lengths, start pixels, redshifts and masks: the batch is exact."""
    rng = np.random.default_rng(5)
    spectra, z = [], []
    for k, (npix, first) in enumerate([(3909, 0), (3751, 40), (3850, 3), (3909, 0), (3800, 100),
                                       (3909, 0), (3760, 0)]):
        wavelength = lamost_wavelength(npix, first)
        redshift = rng.uniform(-2e-3, 2e-3)
        flux = star_like(rng, wavelength, teff=rng.uniform(3800, 8000), z=redshift, noise=0.03)
        flux *= 10.0 ** (4 * (-1) ** k * k / 6)          # flux levels from 1e-4 to 1e4
        ivar = np.ones(npix)
        ivar[rng.choice(npix, 40, replace=False)] = 0.0
        andmask = np.zeros(npix, dtype=np.int32)
        andmask[rng.choice(npix, 20, replace=False)] = 1 << (k % 8)
        if k == 4:
            ivar[: int(0.7 * npix)] = 0.0                    # one unusable row in the batch
        spectra.append(make_spectrum(flux, wavelength, ivar, andmask))
        z.append(redshift)
    batch, batch_good = preprocess_spectra(spectra, z, CONFIG)
    chunked, _ = preprocess_spectra(spectra, z, CONFIG, chunk_size=3)
    assert np.all(np.isnan(batch[4]))
    for i, spectrum in enumerate(spectra):
        single, single_good = preprocess_spectra([spectrum], [z[i]], CONFIG)
        assert single_good[0] == batch_good[i]
        np.testing.assert_allclose(batch[i], single[0], rtol=0, atol=2e-6, equal_nan=True)
        np.testing.assert_allclose(chunked[i], single[0], rtol=0, atol=2e-6, equal_nan=True)


@pytest.mark.parametrize("factor", [1e-6, 1e-2, 1e5])
def test_features_do_not_depend_on_the_flux_scale(factor):
    rng = np.random.default_rng(9)
    wavelength = lamost_wavelength()
    flux = star_like(rng, wavelength, teff=4200.0, noise=0.02)
    features, _ = preprocess_spectra([make_spectrum(flux, wavelength),
                                      make_spectrum(flux * factor, wavelength)], [1e-4, 1e-4], CONFIG)
    np.testing.assert_allclose(features[1], features[0], rtol=0, atol=1e-5)


def test_continuum_normalise_recovers_the_line_profile():
    """Features of a black body with lines = the (median-filtered) normalised line profile."""
    wavelength = lamost_wavelength()
    lines = [4500.0, 5500.0, 6300.0]
    depth = 0.4
    flux = planck(wavelength, 5000.0) * absorption(wavelength, lines, depth=depth, sigma_pixels=3.0)
    stack = SpectrumStack.from_spectra([make_spectrum(flux, wavelength)])
    features, _ = continuum_normalise(stack, [0.0], CONFIG)
    # the median filter of width 3 (part of the method) flattens each core by one pixel
    expected = median_filter(absorption(CONFIG.wavelength, lines, depth=depth, sigma_pixels=3.0),
                             size=3, mode="nearest")
    # linear resampling of a 3-pixel Gaussian core costs up to depth / (8 sigma^2) ~ 0.006
    assert np.max(np.abs(features[0] - expected)) < 8e-3
    away = np.all(np.abs(CONFIG.wavelength[:, None] - np.array(lines)[None]) > 30.0, axis=1)
    assert np.max(np.abs(features[0, away] - 1.0)) < 1e-3
    for line in lines:
        core = np.argmin(np.abs(CONFIG.wavelength - line))
        assert features[0, core] == pytest.approx(1.0 - depth, abs=0.03)


def test_the_returned_continuum_is_the_star_continuum_in_flux_units():
    """What the spectrum plot draws over the observed flux: for a black body with a few lines,
    the pseudo-continuum at z is the black body itself (in the file's flux units)."""
    wavelength = lamost_wavelength()
    z = 2e-4
    rest = wavelength / (1 + z)
    flux = 3e-16 * planck(rest, 5000.0) / planck(np.array([5500.0]), 5000.0) * \
        absorption(rest, [4500.0, 6300.0], depth=0.4, sigma_pixels=3.0)
    stack = SpectrumStack.from_spectra([make_spectrum(flux, wavelength)])
    features, _, continuum = continuum_normalise(stack, [z], CONFIG, return_continuum=True)
    expected = 3e-16 * planck(CONFIG.wavelength, 5000.0) / planck(np.array([5500.0]), 5000.0)
    np.testing.assert_allclose(continuum[0], expected, rtol=2e-3)
    same, _ = continuum_normalise(stack, [z], CONFIG)
    np.testing.assert_array_equal(features, same)


# --------------------------------------------------------------------------- building blocks

def test_median_filter3_matches_scipy():
    rng = np.random.default_rng(0)
    flux = rng.standard_normal((6, 500))
    flux[2, 100] = 1e9                                   # a cosmic-ray hit is removed
    flux[3, 50:53] = 7.0                                 # ties
    ours = median_filter3(flux)
    reference = median_filter(flux, size=(1, 3), mode="nearest")
    np.testing.assert_array_equal(ours[:, 1:-1], reference[:, 1:-1])
    np.testing.assert_array_equal(ours[:, [0, -1]], flux[:, [0, -1]])
    assert ours[2, 100] < 10
    assert not np.shares_memory(ours, flux)


def test_bridge_masked_interpolates_linearly():
    rng = np.random.default_rng(1)
    n, p = 5, 300
    flux = rng.normal(1.0, 0.2, (n, p))
    good = rng.random((n, p)) > 0.3
    good[1, :40] = False                                  # leading gap: first good value
    good[1, -25:] = False                                 # trailing gap: last good value
    good[2, 100:180] = False                              # long gap
    good[3] = True                                        # nothing to do
    good[4] = False                                       # nothing to bridge from
    out = bridge_masked(flux, good)
    index = np.arange(p)
    for i in range(3):
        expected = np.interp(index, index[good[i]], flux[i, good[i]])
        np.testing.assert_allclose(out[i], expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out[3], flux[3])
    np.testing.assert_array_equal(out[4], flux[4])
    assert np.all(out[good] == flux[good])


def test_fit_pseudo_continuum_ignores_masked_pixels_and_clips_lines():
    x = np.linspace(0.0, 1.0, 1200)
    continuum = 2.0 + x - 1.5 * x**2 + 0.8 * x**3
    flux = continuum.copy()
    flux[200:230] *= 0.3                                  # absorption line: clipped below
    good = np.ones_like(flux, dtype=bool)
    flux[600:650] = 1e6                                   # masked garbage
    good[600:650] = False
    fitted = fit_pseudo_continuum(flux[None], good[None])[0]
    np.testing.assert_allclose(fitted, continuum, rtol=2e-3)


@pytest.mark.parametrize("layout, line_kept", [("dr1-image", True), ("dr8-image", False)])
def test_dr1_line_cores_with_zero_ivar_are_kept(layout, line_kept):
    """DR1 zeroes ivar in strong line cores with a clear and-mask: those pixels are data there,
    and masked (bridged over) in every other layout."""
    wavelength = lamost_wavelength()
    flux = np.ones(wavelength.size)
    core = np.abs(wavelength - 5000.0) < 4.0
    flux[np.abs(wavelength - 5000.0) < 8.0] = 0.5
    flux[core] = 0.2                                    # a deep line whose core has ivar = 0
    ivar = np.where(core, 0.0, 1.0)
    spectrum = make_spectrum(flux, wavelength, ivar, np.zeros(flux.size, dtype=np.int32))
    spectrum = SimpleNamespace(**vars(spectrum), layout=layout)
    features, _ = preprocess_spectra([spectrum], [0.0], CONFIG)
    depth = features[0, np.argmin(np.abs(CONFIG.wavelength - 5000.0))]
    if line_kept:
        assert depth < 0.3
    else:
        assert depth > 0.4                               # bridged from the 0.5 shoulders


def test_a_dr1_spectrum_without_weights_is_unusable():
    """The DR1 exception keeps a few zero-ivar line cores; a DR1 file with ivar = 0
    everywhere was estimated as if every pixel were good (found by review)."""
    wavelength = lamost_wavelength()
    flux = 1.0 + 0.1 * np.sin(wavelength / 50.0)
    spectrum = make_spectrum(flux, wavelength, np.zeros(flux.size),
                             np.zeros(flux.size, dtype=np.int32))
    spectrum = SimpleNamespace(**vars(spectrum), layout="dr1-image")
    features, good_fraction = preprocess_spectra([spectrum], [0.0], CONFIG)
    assert good_fraction[0] == 0.0 and np.isnan(features[0]).all()


def test_a_pixel_that_overflows_float32_is_masked_not_infinite():
    """Flux of 1e-25 with one unmasked 1e30 pixel gave an inf feature, and the spectrum
    was dropped as having 'too few usable pixels (good fraction 1.00)' (found by review)."""
    wavelength = lamost_wavelength()
    flux = 1e-25 * (1.0 + 0.1 * np.sin(wavelength / 50.0))
    flux[np.argmin(np.abs(wavelength - 5000.0))] = 1e30      # outside the masked regions
    spectrum = make_spectrum(flux, wavelength, np.ones(flux.size), np.zeros(flux.size, dtype=np.int32))
    features, good_fraction = preprocess_spectra([spectrum], [0.0], CONFIG)
    assert np.isfinite(features).all()
    assert 0.99 < good_fraction[0] < 1.0
    assert np.abs(features[0] - 1.0).max() < 0.2


def test_cosmic_ray_spikes_are_masked_but_lines_are_not():
    """An unmasked one-pixel spike (LAMOST marks cosmic rays in the or-mask only) moved two
    features by 7-13 and Teff by 220 K: the width-3 median filter runs after the resampling
    has spread it over two pixels (found by review). Lines, absorption or emission, stay."""
    rng = np.random.default_rng(5)
    wavelength = lamost_wavelength()
    clean = star_like(rng, wavelength, teff=5200.0, noise=0.0)
    sigma = 0.02 * clean
    noisy = clean + sigma * rng.standard_normal(clean.size)
    # an emission line of FWHM ~6 pixels, twice the continuum (narrower and stronger ones
    # lose their core: the docstring's limit)
    pixel = np.argmin(np.abs(wavelength - 6000.0))
    noisy += 2.0 * clean * np.exp(-0.5 * ((np.arange(clean.size) - pixel) / 2.5) ** 2)
    spiked = noisy.copy()
    hits = [np.argmin(np.abs(wavelength - w)) for w in (4700.0, 5300.0, 6500.0)]
    spiked[hits] += 30.0 * sigma[hits]
    spiked[hits[1] + 1] += 20.0 * sigma[hits[1] + 1]                # a two-pixel hit
    spectra = [make_spectrum(f, wavelength, ivar=1.0 / sigma**2) for f in (noisy, spiked)]
    features, _ = preprocess_spectra(spectra, [0.0, 0.0], CONFIG)
    assert np.abs(features[1] - features[0]).max() < 0.02
    paper = dataclasses.replace(CONFIG, despike_sigma=0.0)
    paper_features, _ = preprocess_spectra(spectra, [0.0, 0.0], paper)
    assert np.abs(paper_features[1] - paper_features[0]).max() > 0.2
    # the emission line and the absorption lines are the same with and without despiking
    np.testing.assert_allclose(features[0], paper_features[0], atol=1e-6)
    stack = SpectrumStack.from_spectra(spectra)
    assert cosmic_ray_spikes(stack, CONFIG.despike_sigma,
                             CONFIG.despike_min_fraction).sum(axis=1).tolist() == [0, 4]


def test_a_configuration_pickled_before_despiking_keeps_its_features():
    import pickle

    old = PreprocessConfig()
    state = dict(vars(old))
    del state["despike_sigma"]
    revived = PreprocessConfig.__new__(PreprocessConfig)
    revived.__setstate__(state)
    assert revived.despike_sigma == 0.0
    assert pickle.loads(pickle.dumps(old)).despike_sigma == old.despike_sigma == 5.0
    # its hash is the one it had (artifacts are checked against it): of the fields it has
    legacy = {k: v for k, v in state.items() if k != "despike_min_fraction"}
    blob = json.dumps({k: list(map(list, v)) if k == "masked_regions" else v
                       for k, v in sorted(legacy.items())}, sort_keys=True).encode()
    assert revived.digest() == hashlib.sha256(blob).hexdigest()[:16]
    assert old.digest() != revived.digest()
