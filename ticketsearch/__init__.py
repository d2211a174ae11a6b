"""ticketsearch: parallel lottery-ticket search (Continuous Sparsification, IMP)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ticketsearch")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"


def load_ticket(path):
    """Load a ticket directory (see ``ticketsearch.tickets.load_ticket``)."""
    from .tickets import load_ticket as _load

    return _load(path)


__all__ = ["__version__", "load_ticket"]
