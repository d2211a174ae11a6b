"""The report of a job, rendered: the terminal summary, ``report.md``, ``report.json`` and the
plots — all from the one ``analysis.Report`` document. Its records come from the job directory
(complete by construction: every finished trial's ``result.json``), or from the MLflow store for
a job whose directory is gone (``--experiment`` / ``--run``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .analysis import REPORT_SCHEMA, ReportError, build_report, validate_report
from .jobdir import read_result
from .records import JobRecord, TrialRecord, read_record

COLORS = {"cs": "#1f77b4", "imp": "#d62728", "rigl": "#2ca02c", "dense": "#7f7f7f"}

__all__ = ["REPORT_SCHEMA", "ReportError", "build_report", "format_markdown", "format_summary",
           "record_from_job_dir", "record_from_mlflow", "report_job", "write_report"]


# --- sources ----------------------------------------------------------------------------------


def record_from_job_dir(job_dir: Path) -> JobRecord:
    """A job directory's record: its ``summary.json`` (job-level figures, if the job got that
    far) with every finished trial's ``result.json``."""
    job_dir = Path(job_dir)
    summary = read_record(job_dir / "summary.json", JobRecord)
    if summary is None:
        summary = _record_from_spec(job_dir)
    trials = [read_result(path.parent) for path in sorted(job_dir.glob("trials/*/result.json"))]
    return summary.model_copy(update={"trials": trials, "job_dir": str(job_dir)})


def _record_from_spec(job_dir: Path) -> JobRecord:
    from .spec import load_job

    if not (job_dir / "spec.yaml").exists():
        raise ReportError(f"{job_dir / 'spec.yaml'} not found: is {job_dir} a job directory?")
    job = load_job(job_dir / "spec.yaml")
    return JobRecord(job=job.name, spec_hash=job.spec_hash(), status="UNFINISHED")


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
    from .tracking import check_reachable, client_for

    check_reachable(uri)
    client = client_for(uri)
    parent = _parent_run(client, uri, parent_run_id, experiment)
    parent_id = parent.info.run_id
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000)
    trials = []
    for child in children:
        result = _download_json(client, child.info.run_id, "result.json")
        if result is not None:  # unfinished trials have none yet
            trials.append(TrialRecord.model_validate(
                result | {"run_id": child.info.run_id, "name": child.info.run_name}))
    summary = _download_json(client, parent_id, "summary.json") or {}
    tags = parent.data.tags
    return JobRecord(job=tags.get("ticketsearch.job", ""),
                     spec_hash=tags.get("ticketsearch.spec_hash", ""),
                     makespan_s=summary.get("makespan_s"),
                     tracking={"uri": uri, "parent_run_id": parent_id},
                     trials=sorted(trials, key=lambda t: t.trial_id))


# --- output -----------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_ci(value: dict[str, Any] | None, signed: bool = False) -> str:
    if value is None or value["mean"] is None:
        return "-"
    sign = "+" if signed else ""
    if value["ci_low"] is None:
        return f"{value['mean']:{sign}.4f}"
    return f"{value['mean']:{sign}.4f} [{value['ci_low']:{sign}.4f}, {value['ci_high']:{sign}.4f}]"


def format_summary(report: dict[str, Any]) -> str:
    """The terminal summary: tickets per method, costs per method, ratios, the frontier
    comparison and (for Ray runs) the orchestration overhead."""
    dense = report["dense"]
    lines = [f"job {report['job']['name']} ({report['job']['spec_hash']}); dense test acc "
             f"{_fmt(dense['test_acc'])} ({dense['source'] or 'no baseline'})",
             "tickets (sparsity, val acc, test acc):"]
    for method, m in report["methods"].items():
        for t in m["tickets"]:
            lines.append(f"  {method:5s} {t['trial_id']}/{t['name']}: {t['sparsity']:.3f} "
                         f"{_fmt(t['val_acc'])} {_fmt(t['test_acc'])}")
    lines.append("cost (epochs critical path / total; wall-clock s critical path / total):")
    if dense["trials"]:
        e, w = dense["epochs"], dense["wall_clock_s"]
        lines.append(f"  {'dense':5s} train {e['critical_path']:g}/{e['total']:g}  "
                     f"wall {w['critical_path']:.1f}/{w['total']:.1f}")
    for method, m in report["methods"].items():
        s, r, w = m["search_epochs"], m["retrain_epochs"], m["wall_clock_s"]
        best = m["sparsest_matching"]
        matching = "none" if best is None else f"{best['sparsity']:.3f} @ {best['test_acc']:.4f}"
        lines.append(f"  {method:5s} search {s['critical_path']:g}/{s['total']:g}  "
                     f"retrain {r['critical_path']:g}/{r['total']:g}  "
                     f"wall {w['critical_path']:.1f}/{w['total']:.1f}  "
                     f"sparsest matching {matching}")
    for pair, ratios in report["ratios"].items():
        lines.append(f"{pair}: search epochs critical path "
                     f"x{_fmt(ratios['search_epochs.critical_path'], 2)}, total "
                     f"x{_fmt(ratios['search_epochs.total'], 2)}; wall-clock critical path "
                     f"x{_fmt(ratios['wall_clock_s.critical_path'], 2)}")
    frontier = report.get("frontier")
    if frontier:
        lines.append(frontier_sentence(report))
    if report.get("paired"):
        lines.append("at equal sparsity (test acc, mean [95 % interval] over seeds):")
        for r in report["paired"]:
            imp = "-" if r["imp"] is None else _mean_ci(r["imp"]["test_acc"])
            lines.append(f"  target {r['target_sparsity']:.3f}: cs "
                         f"{_mean_ci(r['cs']['test_acc'])}  imp {imp}  cs-imp "
                         f"{_mean_ci(r['difference'], signed=True)}")
    lines.append(f"makespan {_fmt(report['makespan_s'], 1)}s")
    costs = report.get("orchestration")
    if costs:
        lines.append(
            f"orchestration: Ray start-up {costs['ray_startup_s']:.1f}s; driver wall-clock "
            f"{costs['driver_wall_s']:.1f}s vs longest trial {costs['critical_path_trial_s']:.1f}s "
            f"(overhead {costs['overhead_s']:.1f}s = {100 * costs['overhead_fraction']:.1f}%); "
            f"sum of trial wall-clock {costs['trial_wall_clock_sum_s']:.1f}s")
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the tables, the ticket lists and the plots."""
    job, dense = report["job"], report["dense"]
    out = [f"# Report: {job['name']} ({job['spec_hash']})", "",
           f"Dense baseline test accuracy: **{_fmt(dense['test_acc'])}** "
           f"({dense['source'] or 'no dense baseline in this job'}). Matching tickets: test "
           f"accuracy ≥ dense − {report['tolerance']} (over seeds: the mean). Job makespan: "
           f"{_fmt(report['makespan_s'], 1)} s.{_test_split_note(report)}", "",
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
    out += ["", selection_rule(report)]
    frontier = report.get("frontier")
    if frontier:
        out += ["", frontier_sentence(report, markdown=True)]
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
    out += _paired_markdown(report) + _groups_markdown(report)
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


def selection_rule(report: dict[str, Any]) -> str:
    """The rule by which tickets are chosen, in words (report.md states it)."""
    on = {"val_acc": "validation", "test_acc": "test"}[report["selected_on"]]
    rule = (f"Tickets are chosen on {on} accuracy: a ticket *matches* when its {on} accuracy "
            f"is at least the dense baseline's minus {report['tolerance']:g}; the *sparsest "
            f"matching* ticket and the *frontier* (no other ticket both sparser and more "
            f"accurate) are chosen the same way. Test accuracy is reported for what was "
            "chosen, and the comparison with IMP is made on it: a frontier ticket's comparator "
            "is the IMP ticket of equal or higher sparsity with the best "
            f"{on} accuracy; a ticket sparser than every IMP ticket has none and is counted "
            "apart.")
    if on == "test":
        rule += " (These tickets have no validation accuracy: the job has no validation split.)"
    return rule


def frontier_sentence(report: dict[str, Any], markdown: bool = False) -> str:
    """How the challenger's frontier tickets fare against their comparators."""
    f = report["frontier"]
    a, b = (f["challenger"].upper(), f["reference"].upper()) if markdown else (
        f["challenger"], f["reference"])
    counts = f"{f['dominating']} of {f['of']}"
    text = (f"{a} frontier tickets that match or beat, on test accuracy, their {b} "
            f"comparator (equal or higher sparsity): {f'**{counts}**' if markdown else counts}")
    if f["without_comparator"]:
        text += (f"; {f['without_comparator']} sparser than every {b} ticket (no comparator, "
                 "not counted)")
    return text + ("." if markdown else "")


def _test_split_note(report: dict[str, Any]) -> str:
    n = report.get("test_examples")
    if not n:
        return ""
    return (f" The test split has {n} examples: one point of accuracy is {n / 100:g} "
            f"test images.")


def _stat(value: dict[str, Any] | None, digits: int = 4) -> str:
    """``mean ± sd [low, high] (n)`` — or just the value for one seed."""
    if value is None or value["mean"] is None:
        return "-"
    if value["sd"] is None:
        return f"{value['mean']:.{digits}f}"
    return (f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f} "
            f"[{value['ci_low']:.{digits}f}, {value['ci_high']:.{digits}f}] (n={value['n']})")


def _paired_markdown(report: dict[str, Any]) -> list[str]:
    rows = report.get("paired") or []
    if not rows:
        return []
    out = ["", "## Tickets at equal sparsity", "",
           "Each CS target next to the IMP (and RigL) ticket of the same sparsity (to 0.5 "
           "points). Test accuracy as mean ± sd [95 % interval] over seeds; the difference is "
           "CS − IMP paired by seed.", "",
           "| target | CS sparsity | CS test acc | IMP ticket | IMP test acc | RigL test acc "
           "| CS − IMP |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        imp, rigl = r["imp"], r["rigl"]
        out.append(f"| {r['target_sparsity']:.4f} | {_stat(r['cs']['sparsity'])} | "
                   f"{_stat(r['cs']['test_acc'])} | "
                   f"{'-' if imp is None else imp['group'] + ' / ' + imp['ticket']} | "
                   f"{'-' if imp is None else _stat(imp['test_acc'])} | "
                   f"{'-' if rigl is None else _stat(rigl['test_acc'])} | "
                   f"{_stat(r['difference'])} |")
    return out


def _groups_markdown(report: dict[str, Any]) -> list[str]:
    """Per-setting tables over seeds, for methods run with more than one seed."""
    out = []
    for name, m in report["methods"].items():
        groups = [g for g in m["groups"] if len(g["seeds"]) > 1]
        if not groups:
            continue
        out += ["", f"## {name} tickets over seeds", "",
                "| setting / ticket | seeds | sparsity | test acc | matching (mean) |",
                "| --- | --- | --- | --- | --- |"]
        out += [f"| {g['group']} / {g['ticket']} | {len(g['seeds'])} | {_stat(g['sparsity'])} "
                f"| {_stat(g['test_acc'])} | {'yes' if g['matching'] else ''} |"
                for g in groups]
    return out


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
        _error_bars(ax, m["groups"], color)
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


def _error_bars(ax, groups: list[dict[str, Any]], color: str) -> None:
    """Mean and 95 % interval of the tickets run with several seeds."""
    multi = [g for g in groups if g["test_acc"]["ci_low"] is not None]
    if not multi:
        return
    means = [g["test_acc"]["mean"] for g in multi]
    ax.errorbar([g["sparsity"]["mean"] for g in multi], means,
                yerr=[[m - g["test_acc"]["ci_low"] for m, g in zip(means, multi)],
                      [g["test_acc"]["ci_high"] - m for m, g in zip(means, multi)]],
                fmt="s", ms=4, capsize=3, color=color, alpha=0.9)


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
    """Report on a job from its directory, write it (default ``<job dir>/report``) and, when
    the job was tracked and ``log``, attach it to the job's parent run. Returns the report."""
    job_dir = Path(job_dir)
    report = build_report(record_from_job_dir(job_dir), tolerance)
    out = Path(out_dir or job_dir / "report")
    write_report(report, out)
    if log:
        from .tracking import log_report

        log_report(job_dir, out)
    return report
