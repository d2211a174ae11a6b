"""ticketsearch: parallel lottery-ticket search (Continuous Sparsification, IMP)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ticketsearch")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"


def load_ticket(path, tracking_uri=None):
    """Load a ticket: a local ticket directory, or an MLflow artifact URI such as
    ``runs:/<run_id>/tickets/<name>`` (downloaded first; ``tracking_uri`` defaults to
    ``MLFLOW_TRACKING_URI``). Checksums are verified; nothing is unpickled."""
    from .tickets import load_ticket as _load

    text = str(path)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        from .tracking import download_ticket

        return _load(download_ticket(text, tracking_uri))
    return _load(path)


__all__ = ["__version__", "load_ticket"]
