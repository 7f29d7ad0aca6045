"""Analytic LAMOST-like spectra with known labels, for the demo and for tests without data.

Not a stellar atmosphere: a Planck continuum with Gaussian absorption lines whose depths
follow Teff (Balmer lines peak near 9,500 K, metal lines grow towards cool stars), [Fe/H]
(metal lines scale as 10**(0.5 [Fe/H])) and log g (Mg b and Na D deepen in dwarfs, the
Ca II triplet in giants). That is enough for LASSO-MLPNet to have something to learn, and
the files, catalogue and label table have the real LAMOST DR8 / APOGEE Payne layouts.
The real benchmarks use MILES stars through ../shared/tools/lamost_sim.py instead.
"""
import os

import numpy as np
from astropy.io import fits
from astropy.table import Table

LOG0, DLOG, NPIX = 3.5682, 1e-4, 3909          # the LAMOST DR8 pixel grid (log10 Angstrom)
R_LAMOST = 1800.0
C_KMS = 299792.458
PAYNE_NLABELS, PAYNE_TEFF, PAYNE_LOGG, PAYNE_FEH = 22, 0, 1, 19

BALMER = (6564.6, 4862.7, 4341.7, 4102.9, 3971.2)
GRAVITY_DWARF = (5168.8, 5174.1, 5185.1, 5891.6, 5897.6)   # Mg b, Na D (vacuum)
GRAVITY_GIANT = (8500.4, 8544.4, 8664.5)                    # Ca II triplet (vacuum)
# a fixed forest of "metal lines", the same for every spectrum
METAL_LINES = np.sort(np.random.default_rng(12345).uniform(3900, 8800, 220))
METAL_STRENGTH = np.random.default_rng(54321).uniform(0.05, 0.35, METAL_LINES.size)


def lamost_wavelength():
    return 10.0 ** (LOG0 + DLOG * np.arange(NPIX))


def _line_depths(teff, logg, feh):
    """Depth of every line for arrays of labels: (n, n_lines) and the line centres."""
    teff, logg, feh = (np.asarray(a, dtype=float)[:, None] for a in (teff, logg, feh))
    balmer = 0.6 * np.exp(-((teff - 9500.0) / 3500.0) ** 2) * np.ones(len(BALMER))
    metal = METAL_STRENGTH * 10 ** (0.5 * feh) * np.clip((6500.0 / teff) ** 2.5, 0.2, 4.0)
    dwarf = 0.25 * 10 ** (0.3 * feh) * np.clip(logg / 4.5, 0.1, 1.3) * (5500.0 / teff) * np.ones(len(GRAVITY_DWARF))
    giant = 0.3 * 10 ** (0.2 * feh) * (1 + 0.25 * (4.5 - logg)) * np.ones(len(GRAVITY_GIANT))
    depths = np.clip(np.hstack([balmer, metal, dwarf, giant]), 0.0, 0.9)
    centres = np.concatenate([BALMER, METAL_LINES, GRAVITY_DWARF, GRAVITY_GIANT])
    return depths, centres


def synthetic_spectra(teff, logg, feh, z, snrg, rng):
    """Noisy observed-frame spectra on the LAMOST grid: (wavelength, flux, ivar), flux (n, NPIX)."""
    wave = lamost_wavelength()
    n = len(teff)
    rest = wave[None, :] / (1.0 + np.asarray(z, dtype=float)[:, None])
    teff_col = np.asarray(teff, dtype=float)[:, None]
    # Planck continuum, in units where only the shape matters
    continuum = 1.0 / (rest / 5000.0) ** 5 / np.expm1(1.4388e8 / (rest * teff_col))
    continuum /= np.median(continuum, axis=1, keepdims=True)
    x = (wave - 6400.0) / 2700.0
    distortion = np.exp(rng.normal(0, 0.08, (n, 1)) * x + rng.normal(0, 0.05, (n, 1)) * x**2)
    depths, centres = _line_depths(teff, logg, feh)
    width = centres / R_LAMOST / 2.3548
    absorption = np.ones_like(rest)
    for k, (centre, sigma) in enumerate(zip(centres, width)):
        absorption *= 1.0 - depths[:, k:k + 1] * np.exp(-0.5 * ((rest - centre) / sigma) ** 2)
    flux = 100.0 * continuum * distortion * absorption
    sigma = np.median(flux, axis=1, keepdims=True) / np.asarray(snrg, dtype=float)[:, None]
    noisy = flux + rng.normal(0.0, 1.0, flux.shape) * sigma
    return wave, noisy.astype(np.float32), np.broadcast_to(1.0 / sigma**2, flux.shape).astype(np.float32)


def _designation(ra, dec):
    rh = ra / 15
    sign = "+" if dec >= 0 else "-"
    ad = abs(dec)
    return (f"J{int(rh):02d}{int(rh % 1 * 60):02d}{rh * 3600 % 60:05.2f}"
            f"{sign}{int(ad):02d}{int(ad % 1 * 60):02d}{ad * 3600 % 60:04.1f}")


def write_dr8_spectrum(path, header, wave, flux, ivar):
    """A LAMOST DR8 primary-image file: rows flux, ivar, wavelength, andmask, ormask."""
    mask = np.zeros_like(flux)
    data = np.vstack([flux, ivar, wave, mask, mask]).astype(np.float32)
    hdu = fits.PrimaryHDU(data=data)
    for key, value in header.items():
        hdu.header[key] = value
    os.makedirs(os.path.dirname(path), exist_ok=True)
    hdu.writeto(path, overwrite=True)


def make_sample(out_dir, n_stars=120, spectra_per_star=3, snr_range=(8.0, 60.0), seed=0,
                progress=None):
    """Write a labelled sample: spectra/, lamost_catalog.csv, apogee_payne.fits, truth.csv.

    Stars are drawn over 3800-6800 K, log g 1-5, [Fe/H] -2 to +0.4 and spread over
    a 20-degree field; each APOGEE row is offset by up to 0.5 arcsec from its LAMOST
    position. Returns the catalogue as an astropy Table.
    """
    rng = np.random.default_rng(seed)
    teff = rng.uniform(3800, 6800, n_stars)
    logg = np.clip(np.where(teff < 5200, rng.uniform(1.0, 5.0, n_stars), rng.uniform(3.0, 4.8, n_stars)), 0, 5)
    feh = rng.uniform(-2.0, 0.4, n_stars)
    ra = rng.uniform(150, 170, n_stars)
    dec = rng.uniform(20, 40, n_stars)
    rows = []
    obsid = 700000001
    star_of, snr_all, z_all = [], [], []
    for star in range(n_stars):
        for _ in range(spectra_per_star):
            star_of.append(star)
            snr_all.append(rng.uniform(*snr_range))
            z_all.append(rng.normal(0, 40) / C_KMS)
    star_of = np.array(star_of)
    wave, flux, ivar = synthetic_spectra(teff[star_of], logg[star_of], feh[star_of], z_all, snr_all, rng)
    indices = range(len(star_of))
    for i in (progress(indices, len(star_of)) if progress else indices):
        star = star_of[i]
        lmjd, spid, fiberid = 58000 + star % 30, 1 + i % 16, 1 + i % 250
        planid = f"DEMO{star % 30:02d}"
        name = f"spec-{lmjd}-{planid}_sp{spid:02d}-{fiberid:03d}.fits"
        relative = os.path.join("spectra", str(lmjd), planid, name)
        header = {"OBSID": obsid, "RA": float(ra[star]), "DEC": float(dec[star]), "Z": float(z_all[i]),
                  "Z_ERR": 5e-6, "CLASS": "STAR", "SUBCLASS": "G", "LMJD": lmjd, "MJD": lmjd - 1,
                  "PLANID": planid, "SPID": spid, "FIBERID": fiberid, "FILENAME": name,
                  "DESIG": "LAMOST " + _designation(ra[star], dec[star]), "SNRG": round(snr_all[i], 2),
                  "SNRU": round(snr_all[i] * 0.3, 2), "SNRR": round(snr_all[i] * 1.3, 2),
                  "SNRI": round(snr_all[i] * 1.6, 2), "SNRZ": round(snr_all[i] * 1.2, 2),
                  "COEFF0": LOG0, "COEFF1": DLOG, "DATA_V": "LAMOST DR8 (synthetic demo)",
                  "EXTEN0": "Flux, Inverse, Wavelength, Andmask, Ormask"}
        write_dr8_spectrum(os.path.join(out_dir, relative), header, wave, flux[i], ivar[i])
        rows.append({"obsid": obsid, "designation": header["DESIG"], "lmjd": lmjd, "mjd": lmjd - 1,
                     "planid": planid, "spid": spid, "fiberid": fiberid, "ra": ra[star], "dec": dec[star],
                     "snru": header["SNRU"], "snrg": header["SNRG"], "snrr": header["SNRR"],
                     "snri": header["SNRI"], "snrz": header["SNRZ"], "class": "STAR", "subclass": "G",
                     "z": z_all[i], "z_err": 5e-6, "filename": relative, "star": star})
        obsid += 1
    catalogue = Table(rows=rows)
    catalogue[[c for c in catalogue.colnames if c != "star"]].write(
        os.path.join(out_dir, "lamost_catalog.csv"), format="ascii.csv", overwrite=True)
    Table({"obsid": catalogue["obsid"], "teff": teff[star_of], "logg": logg[star_of], "feh": feh[star_of],
           "snrg": catalogue["snrg"]}).write(os.path.join(out_dir, "truth.csv"), format="ascii.csv", overwrite=True)
    offset = rng.uniform(0, 0.5, n_stars) / 3600.0
    angle = rng.uniform(0, 2 * np.pi, n_stars)
    payne = np.full((n_stars, PAYNE_NLABELS), -9999.0)
    payne[:, PAYNE_TEFF], payne[:, PAYNE_LOGG], payne[:, PAYNE_FEH] = teff, logg, feh
    Table({"APOGEE_ID": [f"2M{_designation(r, d)[1:].replace('.', '')[:16]}" for r, d in zip(ra, dec)],
           "RA": ra + offset * np.sin(angle) / np.cos(np.radians(dec)), "DEC": dec + offset * np.cos(angle),
           "payne": payne, "good_flag": np.ones(n_stars, dtype=np.int16)}).write(
        os.path.join(out_dir, "apogee_payne.fits"), overwrite=True)
    return catalogue
