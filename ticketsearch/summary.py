"""Job summaries: tickets and costs per method, from the trials' results (ledgers of epochs
actually trained, never the config)."""

from __future__ import annotations

from typing import Any


def _cost(trials: list[dict[str, Any]], *phases: str) -> dict[str, int]:
    epochs = [sum(t["ledger"]["epochs"].get(p, 0) for p in phases) for t in trials]
    return {"critical_path": max(epochs, default=0), "total": sum(epochs)}


def makespan(trials: list[dict[str, Any]]) -> float:
    """First trial start to last trial end, over every attempt of every trial."""
    windows = [w for t in trials for w in t["ledger"].get("attempt_windows", [])]
    return max(w[1] for w in windows) - min(w[0] for w in windows) if windows else 0.0


def job_summary(job, trials: list[dict[str, Any]], driver_wall_s: float) -> dict[str, Any]:
    """Per-method tickets and costs from the trials' ledgers (epochs trained, not configured).
    ``driver_wall_s`` is how long this driver session ran (start-up included)."""
    methods: dict[str, Any] = {}
    order = {"dense": 0, "cs": 1, "imp": 2}
    for method in sorted({t["method"] for t in trials}, key=lambda m: (order.get(m, 9), m)):
        mine = [t for t in trials if t["method"] == method]
        wall = [t["ledger"]["wall_clock_s"] for t in mine]
        methods[method] = {
            "trials": len(mine),
            "tickets": [dict(t, trial_id=r["trial_id"]) for r in mine for t in r["tickets"]],
            "search_epochs": _cost(mine, "search", "train"),  # a RigL run's training is its search
            "retrain_epochs": _cost(mine, "retrain"),
            "dense_epochs": _cost(mine, "dense"),
            "wall_clock_s": {"critical_path": max(wall), "total": sum(wall)},
            "device_s": sum(t["ledger"]["device_s"] for t in mine),
            "final": [r["final"] for r in mine],
        }
    return {"job": job.name, "spec_hash": job.spec_hash(), "makespan_s": makespan(trials),
            "driver_wall_s": driver_wall_s, "methods": methods, "trials": trials}


def format_summary(summary: dict[str, Any]) -> str:
    """Terminal tables: tickets per method, then epochs and wall-clock per method."""
    lines = ["tickets (sparsity, val acc, test acc):"]
    for method, info in summary["methods"].items():
        for t in sorted(info["tickets"], key=lambda t: t["sparsity"]):
            val = "-" if t["val_acc"] is None else f"{t['val_acc']:.4f}"
            test = "-" if t["test_acc"] is None else f"{t['test_acc']:.4f}"
            lines.append(f"  {method:5s} {t['trial_id']}/{t['name']}: {t['sparsity']:.3f} "
                         f"{val} {test}")
        for final in info["final"]:
            if method == "dense":
                lines.append(f"  dense baseline test acc {final.get('test_acc')}")
    lines.append("cost (epochs critical path / total; wall-clock s critical path / total):")
    for method, info in summary["methods"].items():
        search, retrain, wall = info["search_epochs"], info["retrain_epochs"], info["wall_clock_s"]
        if method == "dense":
            search = info["dense_epochs"]
        lines.append(
            f"  {method:5s} {'train' if method == 'dense' else 'search'} "
            f"{search['critical_path']}/{search['total']}  "
            f"retrain {retrain['critical_path']}/{retrain['total']}  "
            f"wall {wall['critical_path']:.1f}/{wall['total']:.1f}"
        )
    lines.append(f"makespan {summary['makespan_s']:.1f}s")
    costs = summary.get("orchestration")
    if costs:
        lines.append(
            f"orchestration: Ray start-up {costs['ray_startup_s']:.1f}s; driver wall-clock "
            f"{costs['driver_wall_s']:.1f}s vs longest trial {costs['critical_path_trial_s']:.1f}s "
            f"(overhead {costs['overhead_s']:.1f}s = {100 * costs['overhead_fraction']:.1f}%); "
            f"sum of trial wall-clock {costs['trial_wall_clock_sum_s']:.1f}s")
    return "\n".join(lines)
