"""The numbers of a job, computed once: tickets, matching tickets, Pareto frontiers, epochs and
wall-clock per method (critical path and total), cost ratios, the retraining-recipe table and
the timeline — from a ``records.JobRecord`` (its trials' ledgers: epochs actually trained,
seconds actually spent, never the configuration).

The result is a ``Report`` document (``REPORT_SCHEMA`` is generated from it); the terminal
summary, ``report.md`` and the plots (``report.py``) all render this one document. Method order
and labels come from the method registry.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .methods import get_method, methods
from .records import JobRecord, TrialRecord

SCHEMA_VERSION = 2  # 2: selection on validation accuracy, frontier comparators
RATIO_PAIRS = (("imp", "cs"), ("rigl", "cs"), ("imp", "rigl"))


# --- the document -----------------------------------------------------------------------------


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cost(_Doc):
    critical_path: int | float
    total: int | float


class TicketRow(_Doc):
    name: str
    trial_id: str
    trial: str
    sparsity: float
    val_acc: float | None
    test_acc: float | None
    run_id: str | None
    round: int | None = None
    search_epochs: int | None = None
    retrain_epochs: int | None = None
    path: str | None = None


class PerTicket(_Doc):
    search_epochs: float | None
    wall_clock_s: float | None


class MethodReport(_Doc):
    label: str
    trials: int
    tickets: list[TicketRow]
    matching: list[TicketRow]
    sparsest_matching: TicketRow | None
    pareto: list[TicketRow]
    search_epochs: Cost
    retrain_epochs: Cost
    wall_clock_s: Cost
    device_s: float
    per_ticket: PerTicket
    groups: list[Group]
    fused_groups: int = 0  # fused groups its trials trained in (resources.fuse)
    fused_trials: int = 0


class DenseBaseline(_Doc):
    test_acc: float | None
    val_acc: float | None
    source: str | None
    trials: int = 0
    epochs: Cost = Cost(critical_path=0, total=0)
    wall_clock_s: Cost = Cost(critical_path=0, total=0)


class FrontierRow(_Doc):
    name: str
    trial_id: str
    sparsity: float
    test_acc: float | None
    reference_ticket: str | None  # the comparator: None when no reference ticket is as sparse
    reference_best_test_acc: float | None
    dominates: bool | None  # None: nothing to compare with


class Frontier(_Doc):
    challenger: str
    reference: str
    tickets: list[FrontierRow]
    dominating: int
    of: int  # frontier tickets that had a comparator
    without_comparator: int


class RecipeRow(_Doc):
    method: str
    trial_id: str
    ticket: str
    sparsity: float
    recipe: str
    primary: bool
    val_acc: float | None
    test_acc: float | None
    test_acc_delta: float | None


class TimelineRow(_Doc):
    trial_id: str
    trial: str
    method: str
    start_s: float
    end_s: float


class Stat(_Doc):
    """A quantity over ``n`` seeds: mean, sample standard deviation and the 95 % interval of
    the mean (t-distribution; sd and interval are null for one seed)."""

    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None


class Group(_Doc):
    """One ticket of one setting, aggregated over the setting's seeds."""

    group: str
    ticket: str
    seeds: list[int | None]
    target_sparsity: float | None
    sparsity: Stat
    val_acc: Stat
    test_acc: Stat
    matching: bool


class PairedSide(_Doc):
    group: str
    ticket: str
    sparsity: Stat
    test_acc: Stat


class PairedRow(_Doc):
    """One target sparsity: each method's ticket there, and CS − IMP paired by seed."""

    target_sparsity: float
    cs: PairedSide
    imp: PairedSide | None
    rigl: PairedSide | None
    difference: Stat | None  # test accuracy, CS − IMP, over seeds present in both


class JobInfo(_Doc):
    name: str
    spec_hash: str
    parent_run_id: str | None = None


class Report(_Doc):
    """``report.json``: everything the report says, as numbers."""

    schema_version: int = SCHEMA_VERSION
    selected_on: str = "val_acc"  # what matching / frontier selection compares
    job: JobInfo
    dense: DenseBaseline
    tolerance: float
    makespan_s: float | None
    methods: dict[str, MethodReport]
    ratios: dict[str, dict[str, float | None]]
    frontier: Frontier | None
    recipes: list[RecipeRow]
    timeline: list[TimelineRow]
    paired: list[PairedRow] = []
    test_examples: int | None = None
    orchestration: dict[str, float] | None = None


REPORT_SCHEMA: dict[str, Any] = Report.model_json_schema()


class ReportError(RuntimeError):
    """A report cannot be built (no such job, nothing finished)."""


# --- the numbers ------------------------------------------------------------------------------


def _cost(values: list[float]) -> dict[str, float]:
    return {"critical_path": max(values, default=0), "total": sum(values)}


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def stat(values: list[float | None]) -> dict[str, Any]:
    """``Stat`` of the non-null ``values``: mean, sample sd, 95 % t-interval of the mean."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci_low": None, "ci_high": None}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci_low": None, "ci_high": None}
    from scipy.stats import t

    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = float(t.ppf(0.975, n - 1)) * sd / n ** 0.5
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def ticket_groups(trials: list[TrialRecord], dense_acc: float | None, tolerance: float,
                  key: str = "val_acc") -> list[dict[str, Any]]:
    """Each (setting, ticket name) over the setting's seeds; ``matching`` when the mean
    ``key`` accuracy (validation, see ``selection_key``) is at least the dense one minus
    ``tolerance``. Least sparse first."""
    found: dict[tuple[str, str], list] = {}
    for trial in trials:
        for ticket in trial.tickets:
            found.setdefault((trial.group or trial.title, ticket.name), []).append(
                (trial.seed, ticket))
    groups = []
    for (group, name), members in found.items():
        tickets = [t for _, t in members]
        accs = {k: stat([getattr(t, k) for t in tickets]) for k in ("val_acc", "test_acc")}
        chosen = accs[key]["mean"]
        groups.append({
            "group": group, "ticket": name, "seeds": [seed for seed, _ in members],
            "target_sparsity": tickets[0].target_sparsity,
            "sparsity": stat([t.sparsity for t in tickets]), **accs,
            "matching": None not in (dense_acc, chosen) and chosen >= dense_acc - tolerance,
        })
    return sorted(groups, key=lambda g: (g["sparsity"]["mean"], g["group"], g["ticket"]))


def paired_comparison(trials: list[TrialRecord], methods_: dict[str, Any]) -> list[dict]:
    """For every CS target: CS, and IMP and RigL tickets of the same sparsity (to 0.5 points,
    the closest), with CS − IMP test accuracy paired by seed."""
    if "cs" not in methods_:
        return []
    rows = []
    for cs in methods_["cs"]["groups"]:
        if cs["target_sparsity"] is None:
            continue
        row = {"target_sparsity": cs["target_sparsity"], "cs": _side(cs), "imp": None,
               "rigl": None, "difference": None}
        for rival in ("imp", "rigl"):
            match = _closest(methods_.get(rival, {}).get("groups", []), cs["sparsity"]["mean"])
            row[rival] = None if match is None else _side(match)
        if row["imp"] is not None:
            row["difference"] = _paired_difference(trials, cs, row["imp"])
        rows.append(row)
    return rows


def _side(group: dict[str, Any]) -> dict[str, Any]:
    return {k: group[k] for k in ("group", "ticket", "sparsity", "test_acc")}


def _closest(groups: list[dict[str, Any]], sparsity: float) -> dict[str, Any] | None:
    near = [g for g in groups if abs(g["sparsity"]["mean"] - sparsity) <= 0.005]
    return min(near, key=lambda g: abs(g["sparsity"]["mean"] - sparsity), default=None)


def _paired_difference(trials: list[TrialRecord], cs: dict, imp: dict) -> dict[str, Any]:
    """CS − IMP test accuracy for each seed both groups have."""
    def by_seed(group: str, name: str) -> dict:
        return {t.seed: k.test_acc for t in trials if (t.group or t.title) == group
                for k in t.tickets if k.name == name and k.test_acc is not None}

    a, b = by_seed(cs["group"], cs["ticket"]), by_seed(imp["group"], imp["ticket"])
    return stat([a[seed] - b[seed] for seed in sorted(a.keys() & b.keys(), key=str)])


def ticket_rows(trials: list[TrialRecord]) -> list[dict[str, Any]]:
    """Every ticket of ``trials`` with its trial and run, least sparse first."""
    rows = []
    for trial in trials:
        for t in trial.tickets:
            rows.append({"name": t.name, "trial_id": trial.trial_id, "trial": trial.title,
                         "sparsity": t.sparsity, "val_acc": t.val_acc, "test_acc": t.test_acc,
                         "run_id": trial.run_id, "round": t.round,
                         "search_epochs": t.search_epochs, "retrain_epochs": t.retrain_epochs,
                         "path": t.path})
    return sorted(rows, key=lambda t: (t["sparsity"], t["trial_id"], t["name"]))


def recipe_comparison(trials: list[TrialRecord]) -> list[dict[str, Any]]:
    """For tickets retrained under several recipes: each recipe's accuracy and its difference
    from the ticket's primary (first) recipe."""
    rows = []
    for trial in trials:
        for t in trial.tickets:
            recipes = t.recipes or {}
            primary = recipes.get(t.recipe) if t.recipe else None
            if len(recipes) < 2 or primary is None:
                continue
            for name, result in sorted(recipes.items()):
                acc, base = result.test_acc, primary.test_acc
                rows.append({
                    "method": trial.method, "trial_id": trial.trial_id, "ticket": t.name,
                    "sparsity": t.sparsity, "recipe": name, "primary": name == t.recipe,
                    "val_acc": result.val_acc, "test_acc": acc,
                    "test_acc_delta": None if acc is None or base is None else acc - base,
                })
    return rows


def selection_key(trials: list[TrialRecord]) -> str:
    """What tickets are selected on: validation accuracy, unless no ticket has one (a job
    without a validation split), then test accuracy (the report says which)."""
    has_val = any(t.val_acc is not None for trial in trials for t in trial.tickets)
    return "val_acc" if has_val else "test_acc"


def pareto_front(tickets: list[dict[str, Any]], key: str = "val_acc") -> list[dict[str, Any]]:
    """Tickets no other ticket beats on both sparsity and ``key`` accuracy (sparsest last)."""
    scored = [t for t in tickets if t[key] is not None]
    front = []
    for t in scored:
        beaten = any(o is not t and o["sparsity"] >= t["sparsity"] and o[key] >= t[key] and
                     (o["sparsity"] > t["sparsity"] or o[key] > t[key])
                     for o in scored)
        if not beaten:
            front.append(t)
    return sorted(front, key=lambda t: t["sparsity"])


def dense_baseline(trials: list[TrialRecord]) -> dict[str, Any]:
    """Dense accuracy from the first method (registry order) that measures one — the dense
    trials (mean over seeds), else the IMP chains' first, unpruned round — and the dense
    trials' cost."""
    dense = {"test_acc": None, "val_acc": None, "source": None}
    for method in methods():
        if method.baseline is None:
            continue
        prefix, source = method.baseline
        finals = [t.final for t in trials if t.method == method.name
                  and t.final.get(f"{prefix}test_acc") is not None]
        if finals:
            dense = {"test_acc": _mean([f.get(f"{prefix}test_acc") for f in finals]),
                     "val_acc": _mean([f.get(f"{prefix}val_acc") for f in finals]),
                     "source": source}
            break
    mine = [t for t in trials if not get_method(t.method).makes_tickets]
    phases = tuple(p for t in mine for p in get_method(t.method).search_phases)
    return dense | {"trials": len(mine),
                    "epochs": _cost([t.ledger.phase_epochs(phases) for t in mine]),
                    "wall_clock_s": _cost([t.ledger.wall_clock_s for t in mine])}


def method_report(trials: list[TrialRecord], dense: dict[str, Any], tolerance: float,
                  key: str = "val_acc") -> dict[str, Any]:
    """One method's tickets, matching tickets (``key`` accuracy at least the dense one minus
    ``tolerance``), sparsest matching ticket, frontier (on ``key``) and costs."""
    method = get_method(trials[0].method)
    tickets = ticket_rows(trials)
    dense_acc = dense.get(key)
    matching = [] if dense_acc is None else [
        t for t in tickets if t[key] is not None and t[key] >= dense_acc - tolerance]
    search = [t.ledger.phase_epochs(method.search_phases) for t in trials]
    walls = unit_walls(trials)
    n = len(tickets)
    return {
        "label": method.label,
        "trials": len(trials),
        "tickets": tickets,
        "matching": matching,
        "sparsest_matching": max(matching, key=lambda t: (t["sparsity"], t[key]),
                                 default=None),
        "pareto": pareto_front(tickets, key),
        "search_epochs": _cost(search),
        "retrain_epochs": _cost([t.ledger.phase_epochs(("retrain",)) for t in trials]),
        "wall_clock_s": _cost(walls),
        "device_s": sum(t.ledger.device_s for t in trials),
        "per_ticket": {"search_epochs": sum(search) / n if n else None,
                       "wall_clock_s": sum(walls) / n if n else None},
        "groups": ticket_groups(trials, dense_acc, tolerance, key),
        "fused_groups": len({t.fused_group for t in trials if t.fused_group}),
        "fused_trials": sum(1 for t in trials if t.fused_group),
    }


def unit_walls(trials: list[TrialRecord]) -> list[float]:
    """The wall-clock of each unit of work: a trial alone, or a fused group once (its
    members share its time; the longest member's window stands for it)."""
    walls: dict[str, float] = {}
    for trial in trials:
        key = trial.fused_group or trial.trial_id
        walls[key] = max(walls.get(key, 0.0), trial.ledger.wall_clock_s)
    return list(walls.values())


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def cost_ratios(methods_: dict[str, Any], top: str, bottom: str) -> dict[str, float | None]:
    """``top``/``bottom`` of every cost figure."""
    a, b = methods_[top], methods_[bottom]
    out = {}
    for key in ("search_epochs", "retrain_epochs", "wall_clock_s"):
        for part in ("critical_path", "total"):
            out[f"{key}.{part}"] = _ratio(a[key][part], b[key][part])
    out["device_s"] = _ratio(a["device_s"], b["device_s"])
    for key in ("search_epochs", "wall_clock_s"):
        out[f"per_ticket.{key}"] = _ratio(a["per_ticket"][key], b["per_ticket"][key])
    return out


def frontier_comparison(methods_: dict[str, Any], challenger: str = "cs",
                        reference: str = "imp", key: str = "val_acc") -> dict[str, Any] | None:
    """For each ticket on the challenger's frontier (chosen on ``key``): the reference ticket
    of equal or higher sparsity with the best ``key`` accuracy is its comparator, and it
    ``dominates`` when its test accuracy is at least the comparator's. A ticket sparser than
    every reference ticket has no comparator (``dominates`` None), counted apart."""
    if challenger not in methods_ or reference not in methods_:
        return None
    ref = [t for t in methods_[reference]["tickets"]
           if t[key] is not None and t["test_acc"] is not None]
    rows = []
    for t in methods_[challenger]["pareto"]:
        rivals = [r for r in ref if r["sparsity"] >= t["sparsity"]]
        best = max(rivals, key=lambda r: (r[key], r["sparsity"]), default=None)
        rows.append({"name": t["name"], "trial_id": t["trial_id"], "sparsity": t["sparsity"],
                     "test_acc": t["test_acc"],
                     "reference_ticket": None if best is None else best["name"],
                     "reference_best_test_acc": None if best is None else best["test_acc"],
                     "dominates": None if best is None or t["test_acc"] is None
                     else t["test_acc"] >= best["test_acc"]})
    compared = [r for r in rows if r["dominates"] is not None]
    return {"challenger": challenger, "reference": reference, "tickets": rows,
            "dominating": sum(r["dominates"] for r in compared), "of": len(compared),
            "without_comparator": len(rows) - len(compared)}


def timeline(trials: list[TrialRecord]) -> list[dict[str, Any]]:
    """Every attempt of every trial as (start, end) seconds since the job's first start."""
    windows = [(t, w) for t in trials for w in t.ledger.attempt_windows]
    if not windows:
        return []
    origin = min(w[0] for _, w in windows)
    return [{"trial_id": t.trial_id, "trial": t.title, "method": t.method,
             "start_s": round(w[0] - origin, 3), "end_s": round(w[1] - origin, 3)}
            for t, w in sorted(windows, key=lambda item: item[1][0])]


def makespan(trials: list[TrialRecord]) -> float:
    """First trial start to last trial end, over every attempt of every trial."""
    windows = [w for t in trials for w in t.ledger.attempt_windows]
    return max(w[1] for w in windows) - min(w[0] for w in windows) if windows else 0.0


def orchestration_costs(trials: list[TrialRecord], driver_wall_s: float,
                        startup_s: float) -> dict[str, float]:
    """A driver session's wall-clock vs the trials' own: what running them through Ray cost
    (trial process start-up, scheduling, reporting), Ray's own start-up apart."""
    walls = unit_walls(trials)
    critical = max(walls, default=0.0)
    return {
        "ray_startup_s": round(startup_s, 3),
        "driver_wall_s": round(driver_wall_s, 3),
        "trial_wall_clock_sum_s": round(sum(walls), 3),
        "critical_path_trial_s": round(critical, 3),
        "overhead_s": round(driver_wall_s - critical, 3),
        "overhead_fraction": round((driver_wall_s - critical) / critical, 4) if critical else 0.0,
    }


def build_report(record: JobRecord, tolerance: float = 0.01,
                 parent_run_id: str | None = None) -> dict[str, Any]:
    """The report of a job as a ``Report`` document (validated), in plain JSON types."""
    trials = record.trials
    if not trials:
        raise ReportError(f"job {record.job!r} has no finished trial to report on")
    dense = dense_baseline(trials)
    key = selection_key(trials)
    present = [m.name for m in methods()
               if m.makes_tickets and any(t.method == m.name for t in trials)]
    by_method = {m: method_report([t for t in trials if t.method == m], dense, tolerance, key)
                 for m in present}
    ratios = {f"{a}/{b}": cost_ratios(by_method, a, b)
              for a, b in RATIO_PAIRS if a in by_method and b in by_method}
    report = Report(
        job={"name": record.job, "spec_hash": record.spec_hash,
             "parent_run_id": parent_run_id or (record.tracking or {}).get("parent_run_id")},
        dense=dense, tolerance=tolerance, selected_on=key,
        makespan_s=record.makespan_s if record.makespan_s is not None else makespan(trials),
        methods=by_method, ratios=ratios, frontier=frontier_comparison(by_method, key=key),
        recipes=recipe_comparison(trials), timeline=timeline(trials),
        paired=paired_comparison(trials, by_method),
        test_examples=max((t.data_sizes.get("test", 0) for t in trials), default=0) or None,
        orchestration=None if record.orchestration is None else record.orchestration.model_dump(),
    )
    return report.model_dump(mode="json")


def validate_report(report: dict[str, Any]) -> None:
    """Raise pydantic's ValidationError if ``report`` is not a ``Report`` document."""
    Report.model_validate(report)
