"""The science of lamost-vac: reading LAMOST spectra, preprocessing, LASSO-MLPNet.

No database code lives here; `etl` moves data in and out of the catalogue and calls this.
"""
