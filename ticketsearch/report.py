"""The report of a job, rendered: the terminal summary, ``report.md``, ``report.json`` and the
plots — all from the one ``analysis.Report`` document. Its records come from the job directory
(complete by construction: every finished trial's ``result.json``), or from the MLflow store for
a job whose directory is gone (``--experiment`` / ``--run``).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from .analysis import REPORT_SCHEMA, ReportError, build_report, validate_report
from .jobdir import read_result
from .records import JobRecord, TrialRecord, read_record

COLORS = {"cs": "#1f77b4", "imp": "#d62728", "rigl": "#2ca02c", "dense": "#7f7f7f"}
SELECTED_ON = {"val_acc": "validation", "test_acc": "test"}  # report["selected_on"] in words

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
                     f"sparsest matching {matching}{_fused_note(m)}")
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


def _fused_note(m: dict[str, Any]) -> str:
    if not m.get("fused_groups"):
        return ""
    return f"  ({m['fused_trials']} trials in {m['fused_groups']} fused group(s))"


def format_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the tables, the ticket lists and the plots."""
    job, dense = report["job"], report["dense"]
    out = [f"# Report: {job['name']} ({job['spec_hash']})", "",
           f"Dense baseline test accuracy: **{_fmt(dense['test_acc'])}** "
           f"({dense['source'] or 'no dense baseline in this job'}). Matching tickets: "
           f"{SELECTED_ON[report['selected_on']]} accuracy ≥ dense − {report['tolerance']} "
           "(over seeds: the mean). Job makespan: "
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
    fused = [f"{name}: {m['fused_trials']} trials trained as {m['fused_groups']} fused "
             "group(s)" for name, m in report["methods"].items() if m.get("fused_groups")]
    if fused:
        out += ["", "; ".join(fused) + " (`resources.fuse`): a group's wall-clock counts once "
                "in the totals and its device-seconds are split evenly between its members."]
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
    on = SELECTED_ON[report["selected_on"]]
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


REMAINING_TICKS = [100, 50, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05]


def remaining_pct(sparsity: float) -> float:
    """% of masked weights a ticket keeps (kept above 0 for the log axis)."""
    return max(100.0 * (1.0 - sparsity), 0.01)


def ticket_labels(tickets: list[dict[str, Any]]) -> list[str]:
    """A short label per ticket: the settings that differ between the method's trials
    (``target=0.893``, ``s0=-0.1``), and the round when a trial has several tickets."""
    settings = [dict(SETTING.findall(t["trial_id"])) for t in tickets]
    varying = [k for k in dict.fromkeys(k for d in settings for k in d)
               if len({d.get(k) for d in settings}) > 1]
    per_trial: dict[str, int] = {}
    for t in tickets:
        per_trial[t["trial_id"]] = per_trial.get(t["trial_id"], 0) + 1
    labels = []
    for t, d in zip(tickets, settings):
        parts = [f"{k}={_short(d[k])}" for k in varying if k in d]
        if per_trial[t["trial_id"]] > 1 and t.get("round") is not None:
            parts.append(f"r{t['round']}")
        labels.append(" ".join(parts) or t["name"])
    return labels


def _short(value: str) -> str:
    """A setting's value for a label: numbers to 3 significant digits."""
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


SETTING = re.compile(r"([A-Za-z][A-Za-z0-9_]*)=(-?[0-9.]+(?:e-?[0-9]+)?|[A-Za-z0-9_.]+)")


def pareto_figure(report: dict[str, Any]):
    """Test accuracy against % of weights remaining (log axis, sparser to the right), every
    ticket labelled by its setting, each method's frontier (chosen on validation accuracy)
    drawn, the dense baseline dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.2))
    for index, (name, m) in enumerate(report["methods"].items()):
        scored = [t for t in m["tickets"] if t["test_acc"] is not None]
        color = COLORS.get(name, "#9467bd")
        ax.scatter([remaining_pct(t["sparsity"]) for t in scored],
                   [t["test_acc"] for t in scored], s=18, alpha=0.5, color=color,
                   label=f"{name} tickets")
        side = 1 if index % 2 == 0 else -1  # methods' labels on alternate sides of their points
        labelled = sorted(zip(scored, ticket_labels(scored)), key=lambda p: p[0]["sparsity"])
        for step, (t, label) in enumerate(labelled):  # neighbours staggered: no overlaps
            rise = (4 if side > 0 else -9) + side * 7 * (step % 2)
            ax.annotate(label, (remaining_pct(t["sparsity"]), t["test_acc"]), fontsize=6,
                        color=color, xytext=(2, rise), textcoords="offset points")
        _error_bars(ax, m["groups"], color)
        front = [t for t in m["pareto"] if t["test_acc"] is not None]
        ax.plot([remaining_pct(t["sparsity"]) for t in front], [t["test_acc"] for t in front],
                marker="o", color=color, label=f"{name} frontier")
    if report["dense"]["test_acc"] is not None:
        ax.axhline(report["dense"]["test_acc"], color=COLORS["dense"], linestyle="--",
                   label="dense")
    ax.margins(y=0.1)  # room for the labels above the top and below the lowest point
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xticks(REMAINING_TICKS, [f"{v:g}%" for v in REMAINING_TICKS])
    ax.minorticks_off()
    ax.set_xlabel("masked weights remaining (log scale; sparsity = 1 - remaining)")
    ax.set_ylabel("test accuracy after retraining")
    ax.set_title(f"{report['job']['name']}: tickets (frontier chosen on "
                 f"{report['selected_on'].replace('_acc', '')} accuracy)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    _save(pareto_figure(report), path)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


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


def cost_figure(report: dict[str, Any]):
    """Per method: epochs (search and retraining stacked) and wall-clock, each as critical
    path and total."""
    plt = _pyplot()
    names = list(report["methods"])
    methods_ = report["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.9))
    width, xs = 0.38, list(range(len(names)))
    for offset, part, shade in ((-width / 2, "critical_path", "#444"),
                                (width / 2, "total", "#aaa")):
        at = [x + offset for x in xs]
        search = [methods_[n]["search_epochs"][part] for n in names]
        retrain = [methods_[n]["retrain_epochs"][part] for n in names]
        axes[0].bar(at, search, width, color=shade, label=f"search, {part.replace('_', ' ')}")
        axes[0].bar(at, retrain, width, bottom=search, color=shade, hatch="//", alpha=0.6,
                    edgecolor="white", label=f"retraining, {part.replace('_', ' ')}")
        for x, a, b in zip(at, search, retrain):
            axes[0].annotate(f"{a:g}+{b:g}", (x, a + b), ha="center", va="bottom", fontsize=7)
        walls = [methods_[n]["wall_clock_s"][part] for n in names]
        axes[1].bar(at, walls, width, color=shade, label=part.replace("_", " "))
        for x, value in zip(at, walls):
            axes[1].annotate(f"{value:.0f}", (x, value), ha="center", va="bottom", fontsize=7)
    for ax, label in ((axes[0], "epochs trained"), (axes[1], "wall-clock s (whole trials)")):
        ax.set_xticks(xs, names)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{report['job']['name']}: cost per method")
    fig.tight_layout()
    return fig


def plot_cost(report: dict[str, Any], path: Path) -> None:
    _save(cost_figure(report), path)


def timeline_figure(report: dict[str, Any]):
    """Every trial attempt as a bar over wall-clock, coloured by method (legend)."""
    plt = _pyplot()
    rows = report["timeline"]
    labels = sorted({r["trial"] for r in rows}, key=lambda n: min(
        r["start_s"] for r in rows if r["trial"] == n))
    fig, ax = plt.subplots(figsize=(8, 0.35 * max(len(labels), 3) + 1.4))
    seen = set()
    for r in rows:
        y = labels.index(r["trial"])
        method = r["method"]
        ax.barh(y, r["end_s"] - r["start_s"], left=r["start_s"],
                color=COLORS.get(method, "#9467bd"), label=None if method in seen else method)
        seen.add(method)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first trial started")
    ax.set_title("trials over wall-clock (a bar per attempt)")
    if seen:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def plot_timeline(report: dict[str, Any], path: Path) -> None:
    _save(timeline_figure(report), path)


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Validate, then write report.json, report.md, the three plots and report.html (the
    same report with the plots inside: what MLflow's artifact view renders) into
    ``out_dir``."""
    validate_report(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "pareto.png",
             out_dir / "cost.png", out_dir / "timeline.png", out_dir / "report.html"]
    paths[0].write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    markdown = format_markdown(report)
    paths[1].write_text(markdown)
    plot_pareto(report, paths[2])
    plot_cost(report, paths[3])
    plot_timeline(report, paths[4])
    paths[5].write_text(format_html(report, markdown, paths[2:5]))
    return paths


def format_html(report: dict[str, Any], markdown: str, plots: list[Path]) -> str:
    """report.md as a page that needs nothing beside it: its text as it is, each image link
    replaced by the image itself."""
    import base64
    import html

    images = {f"![{alt}]({path.name})": path for alt, path in
              zip(("Pareto frontier", "Cost", "Timeline"), plots)}
    parts, text = [], []
    for line in markdown.splitlines():
        if line in images:
            parts.append(f"<pre>{html.escape(chr(10).join(text))}</pre>")
            data = base64.b64encode(images[line].read_bytes()).decode()
            parts.append(f'<img alt="{html.escape(line[2:line.index("]")])}" '
                         f'src="data:image/png;base64,{data}" style="max-width:100%">')
            text = []
        else:
            text.append(line)
    parts.append(f"<pre>{html.escape(chr(10).join(text))}</pre>")
    title = html.escape(f"{report['job']['name']} {report['job']['spec_hash']}: report")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>"
            "<style>body{font-family:sans-serif;margin:1.5em}pre{white-space:pre-wrap;"
            "font-size:13px}</style></head><body>" + "\n".join(parts) + "</body></html>\n")


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
