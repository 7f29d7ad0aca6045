"""Progress bars for long loops, written to stderr so piped output stays clean."""
import sys

from astropy.utils.console import ProgressBar


def progress(iterable, total=None, desc="", enabled=None):
    """Yield from ``iterable`` while drawing a progress bar on stderr.

    The bar is drawn only when stderr is a terminal (or ``enabled=True``), so logs and
    test output are not flooded with carriage returns.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield from iterable
        return
    items = list(iterable) if total is None and not hasattr(iterable, "__len__") else iterable
    total = total if total is not None else len(items)
    if desc:
        print(desc, file=sys.stderr)
    with ProgressBar(total, file=sys.stderr) as bar:
        for item in items:
            yield item
            bar.update()
