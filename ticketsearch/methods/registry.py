"""The method registry: one entry per ticket-search method, the only place a method is named.

A method is one module that declares a ``Method``: its settings class (a ``spec.MethodSpec``,
which is the ``methods.<name>`` section of a job spec), how a resolved setting is named as a
trial, its runner, its planned epochs, which ledger phases count as its search, and its report
label and order. Everything else — the spec's ``methods`` section and JSON schema, trial
expansion, the runner table, progress, the report's method order and the CLI's choices —
derives from ``methods()``. Adding a method is one module plus one ``register(...)`` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """A registered method.

    ``run(trial_run)`` trains one trial through a ``methods.base.TrialRun`` and returns the
    trial's final metrics. ``identity(settings, swept)`` gives the (trial id, readable name)
    of one resolved setting, ``swept`` being the names of the axes its sweep varied.
    ``planned_epochs(trial)`` is for progress display only (reports count the ledger).
    ``baseline`` names the final metrics that hold a dense accuracy, as (key prefix, source
    text), for methods that measure one (the dense baseline, an IMP chain's first round).
    ``prepare(section, sections)``, if given, resolves a section against the job's other
    method sections before it is expanded (e.g. CS aimed at the IMP chain's densities); it
    raises ``spec.SpecError`` naming the field when it cannot.
    ``run_group(group_run)``, if given, trains several trials of the method at once as one
    fused network (a ``methods.group.GroupRun``; ``resources.fuse``): trials whose settings
    differ only in the ``fuse_axes`` fields, and that ``fusible(trial)`` allows, may share
    a group.
    """

    name: str
    spec: type
    run: Callable[[Any], dict[str, Any]]
    identity: Callable[[Any, frozenset[str]], tuple[str, str]]
    planned_epochs: Callable[[Any], int]
    description: str
    label: str
    order: int
    search_phases: tuple[str, ...] = ("search",)
    makes_tickets: bool = True
    baseline: tuple[str, str] | None = None
    prepare: Callable[[Any, dict[str, Any]], Any] | None = None
    run_group: Callable[[Any], None] | None = None
    fuse_axes: tuple[str, ...] = ()
    fusible: Callable[[Any], str | None] | None = None  # why a trial cannot be fused, or None


_METHODS: dict[str, Method] = {}


class UnknownMethodError(KeyError):
    """No method of that name is registered."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(method: Method) -> Method:
    """Add (or replace, e.g. when a module is imported again) the method ``method.name``."""
    _METHODS[method.name] = method
    from .. import spec

    spec.forget_methods_model()
    return method


def unregister(name: str) -> None:
    """Remove the method ``name`` (if registered)."""
    _METHODS.pop(name, None)
    from .. import spec

    spec.forget_methods_model()


def methods() -> list[Method]:
    """Every registered method, in report order."""
    return sorted(_METHODS.values(), key=lambda m: (m.order, m.name))


def method_names() -> list[str]:
    return [m.name for m in methods()]


def get_method(name: str) -> Method:
    """The method ``name``; UnknownMethodError listing the known ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; known methods: "
                                 f"{', '.join(method_names())}") from None
