"""Method runners and their registry.

Each method is one module — ``dense``, ``cs``, ``imp``, ``rigl`` — declaring its settings
class, trial naming, runner, planned epochs and report label in a ``registry.Method``; this
package registers them. Runners are pure PyTorch: a straight function of a ``base.TrialRun``
that reports through ``hooks.Hooks`` and returns the trial's final metrics.
"""

from __future__ import annotations

from ..hooks import Hooks, TrialResult
from . import cs, dense, imp, rigl
from .base import TrialRun
from .registry import Method, get_method, method_names, methods, register, unregister
from .retrain import retrain_ticket

for _module in (dense, cs, imp, rigl):
    register(_module.METHOD)


def run_trial(trial, data, hooks: Hooks | None = None) -> TrialResult:
    """Run (or resume, from ``hooks.load_checkpoint()``) one trial of any method."""
    return TrialRun(trial, data, hooks).run()


def planned_epochs(trial) -> int:
    """Epochs a trial is configured to train (progress display only; the cost report counts
    epochs from the ledger). Retraining counts once per recipe."""
    return get_method(trial.method).planned_epochs(trial)


__all__ = ["Method", "TrialRun", "get_method", "method_names", "methods", "planned_epochs",
           "register", "retrain_ticket", "run_trial", "unregister"]
