"""ticketsearch: parallel lottery-ticket search (Continuous Sparsification, IMP)."""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("ticketsearch")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"


def load_ticket(path, tracking_uri=None):
    """Load a ticket: a local ticket directory, or an MLflow artifact URI such as
    ``runs:/<ticket run id>/ticket`` (downloaded first; ``tracking_uri`` defaults to
    ``MLFLOW_TRACKING_URI``). Checksums are verified; nothing is unpickled."""
    from .tickets import is_artifact_uri, load_ticket_dir

    if is_artifact_uri(path):
        from .tracking import load_ticket_artifact

        return load_ticket_artifact(str(path), tracking_uri)
    return load_ticket_dir(Path(path))


__all__ = ["__version__", "load_ticket"]
