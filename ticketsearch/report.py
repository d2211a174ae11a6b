"""The cost report: tickets, matching tickets, Pareto frontier, and epochs / wall-clock per
method (critical path and total), with plots — built from the MLflow store, so any past job
can be reported again (or from the job directory for a job run without tracking).

Every number comes from the trials' ledgers (their ``result.json``, also logged to MLflow):
epochs actually trained and seconds actually spent, never the configuration.
``report.json`` follows ``REPORT_SCHEMA`` (``schema_version`` 1).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SEARCH_PHASES = ("search", "train")  # a RigL run's training is its search
METHOD_ORDER = ("cs", "imp", "rigl")
COLORS = {"cs": "#1f77b4", "imp": "#d62728", "rigl": "#2ca02c", "dense": "#7f7f7f"}

_COST = {"type": "object", "required": ["critical_path", "total"],
         "properties": {"critical_path": {"type": "number"}, "total": {"type": "number"}}}
_TICKET = {"type": "object", "required": ["name", "sparsity", "val_acc", "test_acc", "run_id"],
           "properties": {"name": {"type": "string"}, "sparsity": {"type": "number"},
                          "val_acc": {"type": ["number", "null"]},
                          "test_acc": {"type": ["number", "null"]},
                          "run_id": {"type": ["string", "null"]}}}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ticketsearch report",
    "type": "object",
    "required": ["schema_version", "job", "dense", "methods", "makespan_s"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "job": {"type": "object", "required": ["name", "spec_hash"],
                "properties": {"name": {"type": "string"}, "spec_hash": {"type": "string"},
                               "parent_run_id": {"type": ["string", "null"]}}},
        "dense": {"type": "object", "required": ["test_acc"],
                  "properties": {"test_acc": {"type": ["number", "null"]},
                                 "val_acc": {"type": ["number", "null"]},
                                 "source": {"type": ["string", "null"]}}},
        "tolerance": {"type": "number"},
        "makespan_s": {"type": ["number", "null"]},
        "methods": {"type": "object", "additionalProperties": {
            "type": "object",
            "required": ["tickets", "search_epochs", "retrain_epochs", "wall_clock_s",
                         "device_s"],
            "properties": {
                "tickets": {"type": "array", "items": _TICKET},
                "matching": {"type": "array", "items": _TICKET},
                "sparsest_matching": {"anyOf": [_TICKET, {"type": "null"}]},
                "pareto": {"type": "array", "items": _TICKET},
                "search_epochs": _COST, "retrain_epochs": _COST, "wall_clock_s": _COST,
                "device_s": {"type": "number"},
                "trials": {"type": "integer"},
                "per_ticket": {"type": "object"},
            }}},
        "ratios": {"type": "object"},
        "recipes": {"type": "array", "items": {
            "type": "object",
            "required": ["method", "trial_id", "ticket", "sparsity", "recipe", "test_acc",
                         "test_acc_delta"]}},
        "timeline": {"type": "array"},
    },
}


class ReportError(RuntimeError):
    """A report cannot be built (no such job, nothing finished)."""


@dataclass
class JobRecord:
    """What a report is made of: the job's identity, makespan and finished trials."""

    name: str
    spec_hash: str
    makespan_s: float | None
    trials: list[dict[str, Any]] = field(default_factory=list)  # result.json + run_id, title
    parent_run_id: str | None = None


# --- sources ----------------------------------------------------------------------------------


def record_from_job_dir(job_dir: Path) -> JobRecord:
    """Read a job directory (for jobs run without tracking)."""
    job_dir = Path(job_dir)
    summary_path = job_dir / "summary.json"
    if not summary_path.exists():
        raise ReportError(f"{summary_path} not found: is {job_dir} a finished job directory?")
    summary = json.loads(summary_path.read_text())
    trials = []
    for result in sorted((job_dir / "trials").glob("*/result.json")):
        trial = json.loads(result.read_text())
        trials.append(trial | {"run_id": None, "title": trial["trial_id"]})
    return JobRecord(summary["job"], summary["spec_hash"], summary.get("makespan_s"), trials)


def _download_json(client, run_id: str, path: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = client.download_artifacts(run_id, path, folder)
        except Exception:
            return None
        return json.loads(Path(local).read_text())


def _parent_run(client, uri: str, parent_run_id: str | None, experiment: str | None):
    if parent_run_id:
        return client.get_run(parent_run_id)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"no experiment named {experiment!r} in {uri}")
    runs = client.search_runs([found.experiment_id], "tags.`ticketsearch.kind` = 'job'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no ticketsearch job run")
    return runs[0]


def record_from_mlflow(uri: str, parent_run_id: str | None = None,
                       experiment: str | None = None) -> JobRecord:
    """Read a job from the MLflow store: its parent run (given, or the latest job of
    ``experiment``), each child run's ``result.json`` and the parent's ``summary.json``."""
    from .tracking import _client, check_reachable

    check_reachable(uri)
    client = _client(uri)
    parent = _parent_run(client, uri, parent_run_id, experiment)
    parent_id = parent.info.run_id
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000)
    trials = []
    for child in children:
        result = _download_json(client, child.info.run_id, "result.json")
        if result is not None:  # unfinished trials have none yet
            trials.append(result | {"run_id": child.info.run_id, "title": child.info.run_name})
    summary = _download_json(client, parent_id, "summary.json") or {}
    tags = parent.data.tags
    return JobRecord(tags.get("ticketsearch.job", ""), tags.get("ticketsearch.spec_hash", ""),
                     summary.get("makespan_s"), sorted(trials, key=lambda t: t["trial_id"]),
                     parent_id)


# --- the numbers ------------------------------------------------------------------------------


def _epochs(trial: dict[str, Any], phases: tuple[str, ...]) -> int:
    return sum(trial["ledger"]["epochs"].get(p, 0) for p in phases)


def _cost(values: list[float]) -> dict[str, float]:
    return {"critical_path": max(values, default=0), "total": sum(values)}


def _tickets(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for trial in trials:
        for t in trial["tickets"]:
            rows.append({"name": t["name"], "trial_id": trial["trial_id"],
                         "trial": trial["title"], "sparsity": t["sparsity"],
                         "val_acc": t.get("val_acc"), "test_acc": t.get("test_acc"),
                         "run_id": trial.get("run_id")})
    return sorted(rows, key=lambda t: (t["sparsity"], t["trial_id"], t["name"]))


def recipe_comparison(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For tickets retrained under several recipes: each recipe's accuracy and its difference
    from the ticket's primary (first) recipe."""
    rows = []
    for trial in trials:
        for t in trial["tickets"]:
            recipes = t.get("recipes") or {}
            primary = recipes.get(t.get("recipe")) if t.get("recipe") else None
            if len(recipes) < 2 or primary is None:
                continue
            base = primary.get("test_acc")
            for name, result in sorted(recipes.items()):
                acc = result.get("test_acc")
                rows.append({
                    "method": trial["method"], "trial_id": trial["trial_id"],
                    "ticket": t["name"], "sparsity": t["sparsity"], "recipe": name,
                    "primary": name == t["recipe"], "val_acc": result.get("val_acc"),
                    "test_acc": acc,
                    "test_acc_delta": None if acc is None or base is None else acc - base,
                })
    return rows


def pareto_front(tickets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tickets no other ticket beats on both sparsity and test accuracy (sparsest last)."""
    scored = [t for t in tickets if t["test_acc"] is not None]
    front = []
    for t in scored:
        beaten = any(o is not t and o["sparsity"] >= t["sparsity"] and
                     o["test_acc"] >= t["test_acc"] and
                     (o["sparsity"] > t["sparsity"] or o["test_acc"] > t["test_acc"])
                     for o in scored)
        if not beaten:
            front.append(t)
    return sorted(front, key=lambda t: t["sparsity"])


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def dense_baseline(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Dense accuracy: the dense trials' (mean over seeds), else the IMP chains' first
    (unpruned) round."""
    for method, key, source in (("dense", "", "dense trials"),
                                ("imp", "dense_", "first round of the IMP chains")):
        finals = [t["final"] for t in trials if t["method"] == method
                  and t["final"].get(f"{key}test_acc") is not None]
        if finals:
            return {"test_acc": _mean([f.get(f"{key}test_acc") for f in finals]),
                    "val_acc": _mean([f.get(f"{key}val_acc") for f in finals]),
                    "source": source}
    return {"test_acc": None, "val_acc": None, "source": None}


def method_report(trials: list[dict[str, Any]], dense_acc: float | None,
                  tolerance: float) -> dict[str, Any]:
    tickets = _tickets(trials)
    matching = [] if dense_acc is None else [
        t for t in tickets if t["test_acc"] is not None and t["test_acc"] >= dense_acc - tolerance]
    search = [_epochs(t, SEARCH_PHASES) for t in trials]
    walls = [t["ledger"]["wall_clock_s"] for t in trials]
    n = len(tickets)
    return {
        "trials": len(trials),
        "tickets": tickets,
        "matching": matching,
        "sparsest_matching": max(matching, key=lambda t: (t["sparsity"], t["test_acc"]),
                                 default=None),
        "pareto": pareto_front(tickets),
        "search_epochs": _cost(search),
        "retrain_epochs": _cost([_epochs(t, ("retrain",)) for t in trials]),
        "wall_clock_s": _cost(walls),
        "device_s": sum(t["ledger"]["device_s"] for t in trials),
        "per_ticket": {"search_epochs": sum(search) / n if n else None,
                       "wall_clock_s": sum(walls) / n if n else None},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def cost_ratios(methods: dict[str, Any], top: str, bottom: str) -> dict[str, float | None]:
    """``top``/``bottom`` of every cost figure."""
    a, b = methods[top], methods[bottom]
    out = {}
    for key in ("search_epochs", "retrain_epochs", "wall_clock_s"):
        for part in ("critical_path", "total"):
            out[f"{key}.{part}"] = _ratio(a[key][part], b[key][part])
    out["device_s"] = _ratio(a["device_s"], b["device_s"])
    for key in ("search_epochs", "wall_clock_s"):
        out[f"per_ticket.{key}"] = _ratio(a["per_ticket"][key], b["per_ticket"][key])
    return out


def frontier_comparison(methods: dict[str, Any], challenger: str = "cs",
                        reference: str = "imp") -> dict[str, Any] | None:
    """For each ticket on the challenger's frontier: does it match or beat the reference's
    best test accuracy at equal or higher sparsity?"""
    if challenger not in methods or reference not in methods:
        return None
    ref = [t for t in methods[reference]["tickets"] if t["test_acc"] is not None]
    rows = []
    for t in methods[challenger]["pareto"]:
        rivals = [r["test_acc"] for r in ref if r["sparsity"] >= t["sparsity"]]
        best = max(rivals, default=None)
        rows.append({"name": t["name"], "trial_id": t["trial_id"], "sparsity": t["sparsity"],
                     "test_acc": t["test_acc"], "reference_best_test_acc": best,
                     "dominates": best is None or t["test_acc"] >= best})
    wins = sum(r["dominates"] for r in rows)
    return {"challenger": challenger, "reference": reference, "tickets": rows,
            "dominating": wins, "of": len(rows)}


def timeline(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every attempt of every trial as (start, end) seconds since the job's first start."""
    windows = [(t, w) for t in trials for w in t["ledger"].get("attempt_windows", [])]
    if not windows:
        return []
    origin = min(w[0] for _, w in windows)
    return [{"trial_id": t["trial_id"], "trial": t["title"], "method": t["method"],
             "start_s": round(w[0] - origin, 3), "end_s": round(w[1] - origin, 3)}
            for t, w in sorted(windows, key=lambda item: item[1][0])]


def build_report(record: JobRecord, tolerance: float = 0.01) -> dict[str, Any]:
    """The report as a ``REPORT_SCHEMA`` document."""
    if not record.trials:
        raise ReportError(f"job {record.name!r} has no finished trial to report on")
    dense = dense_baseline(record.trials)
    present = [m for m in METHOD_ORDER if any(t["method"] == m for t in record.trials)]
    present += sorted({t["method"] for t in record.trials} - set(METHOD_ORDER) - {"dense"})
    methods = {m: method_report([t for t in record.trials if t["method"] == m],
                                dense["test_acc"], tolerance) for m in present}
    ratios = {f"{a}/{b}": cost_ratios(methods, a, b)
              for a, b in (("imp", "cs"), ("rigl", "cs"), ("imp", "rigl"))
              if a in methods and b in methods}
    return {
        "schema_version": SCHEMA_VERSION,
        "job": {"name": record.name, "spec_hash": record.spec_hash,
                "parent_run_id": record.parent_run_id},
        "dense": dense,
        "tolerance": tolerance,
        "makespan_s": record.makespan_s,
        "methods": methods,
        "ratios": ratios,
        "frontier": frontier_comparison(methods),
        "recipes": recipe_comparison(record.trials),
        "timeline": timeline(record.trials),
    }


def validate_report(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``report`` breaks ``REPORT_SCHEMA``."""
    import jsonschema

    jsonschema.validate(report, REPORT_SCHEMA)


# --- output -----------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(report: dict[str, Any]) -> str:
    """The short terminal table."""
    lines = [f"report: {report['job']['name']} ({report['job']['spec_hash']}), dense test acc "
             f"{_fmt(report['dense']['test_acc'])} ({report['dense']['source'] or 'no baseline'})"]
    lines.append(f"{'method':6} {'tickets':>7} {'sparsest matching':>24} {'search ep cp/total':>19}"
                 f" {'retrain ep cp/total':>20} {'wall s cp/total':>17}")
    for name, m in report["methods"].items():
        best = m["sparsest_matching"]
        matching = "-" if best is None else f"{best['sparsity']:.3f} @ {best['test_acc']:.4f}"
        s, r, w = m["search_epochs"], m["retrain_epochs"], m["wall_clock_s"]
        lines.append(f"{name:6} {len(m['tickets']):>7} {matching:>24} "
                     f"{s['critical_path']:>8g}/{s['total']:<10g} "
                     f"{r['critical_path']:>8g}/{r['total']:<11g} "
                     f"{w['critical_path']:>7.1f}/{w['total']:<9.1f}")
    for pair, ratios in report["ratios"].items():
        lines.append(f"{pair}: search epochs critical path x{_fmt(ratios['search_epochs.critical_path'], 2)}"
                     f", total x{_fmt(ratios['search_epochs.total'], 2)}; wall-clock critical "
                     f"path x{_fmt(ratios['wall_clock_s.critical_path'], 2)}")
    frontier = report.get("frontier")
    if frontier:
        lines.append(f"{frontier['challenger']} frontier tickets at or above the best "
                     f"{frontier['reference']} accuracy of equal or higher sparsity: "
                     f"{frontier['dominating']}/{frontier['of']}")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the tables, the ticket lists and the plots."""
    job, dense = report["job"], report["dense"]
    out = [f"# Report: {job['name']} ({job['spec_hash']})", "",
           f"Dense baseline test accuracy: **{_fmt(dense['test_acc'])}** "
           f"({dense['source'] or 'no dense baseline in this job'}). Matching tickets: test "
           f"accuracy ≥ dense − {report['tolerance']}. Job makespan: "
           f"{_fmt(report['makespan_s'], 1)} s.", "",
           "## Cost per method (from the ledgers: epochs trained, seconds spent)", "",
           "| method | trials | tickets | search epochs (critical path / total) | retraining "
           "epochs (critical path / total) | wall-clock s (critical path / total) | device-s "
           "| search epochs per ticket |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in report["methods"].items():
        s, r, w = m["search_epochs"], m["retrain_epochs"], m["wall_clock_s"]
        out.append(f"| {name} | {m['trials']} | {len(m['tickets'])} | {s['critical_path']:g} / "
                   f"{s['total']:g} | {r['critical_path']:g} / {r['total']:g} | "
                   f"{w['critical_path']:.1f} / {w['total']:.1f} | {m['device_s']:.1f} | "
                   f"{_fmt(m['per_ticket']['search_epochs'], 1)} |")
    for pair, ratios in report["ratios"].items():
        out += ["", f"Ratios {pair}: " + ", ".join(f"{k} ×{_fmt(v, 2)}" for k, v in ratios.items())]
    frontier = report.get("frontier")
    if frontier:
        out += ["", f"{frontier['challenger'].upper()} frontier tickets that match or beat the "
                f"best {frontier['reference'].upper()} ticket of equal or higher sparsity: "
                f"**{frontier['dominating']} of {frontier['of']}**."]
    if report.get("recipes"):
        out += ["", "## Retraining recipes", "",
                "Test accuracy of each ticket under each recipe, and the difference from its "
                "primary (first) recipe.", "",
                "| method | ticket | sparsity | recipe | test acc | Δ vs primary |",
                "| --- | --- | --- | --- | --- | --- |"]
        for r in report["recipes"]:
            delta = "-" if r["test_acc_delta"] is None else f"{r['test_acc_delta']:+.4f}"
            out.append(f"| {r['method']} | {r['trial_id']} / {r['ticket']} | "
                       f"{r['sparsity']:.4f} | {r['recipe']}{' (primary)' if r['primary'] else ''}"
                       f" | {_fmt(r['test_acc'])} | {delta} |")
    out += ["", "![Pareto frontier](pareto.png)", "", "![Cost](cost.png)", "",
            "![Timeline](timeline.png)"]
    for name, m in report["methods"].items():
        best = m["sparsest_matching"]
        out += ["", f"## {name} tickets", "",
                "Sparsest matching ticket: " + ("none" if best is None else
                                                f"`{best['trial_id']}/{best['name']}` at "
                                                f"sparsity {best['sparsity']:.4f}, test "
                                                f"{best['test_acc']:.4f}"), "",
                "| ticket | sparsity | val acc | test acc | matching | run |",
                "| --- | --- | --- | --- | --- | --- |"]
        matching = {(t["trial_id"], t["name"]) for t in m["matching"]}
        for t in m["tickets"]:
            out.append(f"| {t['trial']} / {t['name']} | {t['sparsity']:.4f} | "
                       f"{_fmt(t['val_acc'])} | {_fmt(t['test_acc'])} | "
                       f"{'yes' if (t['trial_id'], t['name']) in matching else ''} | "
                       f"{t['run_id'] or '-'} |")
    return "\n".join(out) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in report["methods"].items():
        scored = [t for t in m["tickets"] if t["test_acc"] is not None]
        color = COLORS.get(name, "#9467bd")
        ax.scatter([t["sparsity"] for t in scored], [t["test_acc"] for t in scored], s=18,
                   alpha=0.5, color=color)
        ax.plot([t["sparsity"] for t in m["pareto"]], [t["test_acc"] for t in m["pareto"]],
                marker="o", color=color, label=f"{name} frontier")
    if report["dense"]["test_acc"] is not None:
        ax.axhline(report["dense"]["test_acc"], color=COLORS["dense"], linestyle="--",
                   label="dense")
    ax.set_xlabel("sparsity (fraction of masked weights pruned)")
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title(f"{report['job']['name']}: tickets")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    names = list(report["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, key, label in ((axes[0], "search_epochs", "search epochs"),
                           (axes[1], "wall_clock_s", "wall-clock s")):
        width = 0.38
        xs = range(len(names))
        crit = [report["methods"][n][key]["critical_path"] for n in names]
        total = [report["methods"][n][key]["total"] for n in names]
        ax.bar([x - width / 2 for x in xs], crit, width, label="critical path", color="#444")
        ax.bar([x + width / 2 for x in xs], total, width, label="total", color="#aaa")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel(label)
        for x, value in zip(xs, crit):
            ax.annotate(f"{value:g}" if key == "search_epochs" else f"{value:.0f}",
                        (x - width / 2, value), ha="center", va="bottom", fontsize=8)
    axes[0].legend()
    fig.suptitle(f"{report['job']['name']}: cost per method")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(report: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    rows = report["timeline"]
    labels = sorted({r["trial"] for r in rows}, key=lambda n: min(
        r["start_s"] for r in rows if r["trial"] == n))
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(labels), 3) + 1.2))
    for r in rows:
        y = labels.index(r["trial"])
        ax.barh(y, r["end_s"] - r["start_s"], left=r["start_s"],
                color=COLORS.get(r["method"], "#9467bd"))
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first trial started")
    ax.set_title("trials over wall-clock (bars: attempts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Validate, then write report.json, report.md and the three plots into ``out_dir``."""
    validate_report(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "pareto.png",
             out_dir / "cost.png", out_dir / "timeline.png"]
    paths[0].write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    paths[1].write_text(format_markdown(report))
    plot_pareto(report, paths[2])
    plot_cost(report, paths[3])
    plot_timeline(report, paths[4])
    return paths


def report_job(job_dir: Path, out_dir: Path | None = None, tolerance: float = 0.01,
               log: bool = True) -> dict[str, Any]:
    """Report on a job: from MLflow when it was tracked (and log the report to its parent
    run), else from its job directory. Returns the report."""
    from .tracking import JobTracking

    job_dir = Path(job_dir)
    tracking = JobTracking.load(job_dir)
    if tracking is not None:
        record = record_from_mlflow(tracking.uri, tracking.parent_run_id)
    else:
        record = record_from_job_dir(job_dir)
    report = build_report(record, tolerance)
    out = Path(out_dir or job_dir / "report")
    write_report(report, out)
    if tracking is not None and log:
        from .tracking import _client

        _client(tracking.uri).log_artifacts(tracking.parent_run_id, str(out), "report")
    return report
