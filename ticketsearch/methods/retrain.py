"""Ticket retraining, shared by the methods that find tickets: every pending ticket under
every recipe of ``retrain.recipes``, from the rewind point with its mask fixed.

One round per (ticket, recipe), ticket-major. The ticket's ``val_acc`` / ``test_acc`` /
``retrain_epochs`` are its first recipe's (named in ``meta["recipe"]``); ``meta["recipes"]``
holds every recipe's ``{val_acc, test_acc, retrain_epochs, settings}`` by recipe name. A
ticket is emitted once its last recipe is done.
"""

from __future__ import annotations

from ..hooks import Hooks, TrialResult
from ..recipes import make_batch_loss, warmup_factor
from ..sparsity.masks import add_binary_masks, load_dense_state
from ..tickets import Ticket
from .base import TrialRun, keep_trained


def retrain_pending(run: TrialRun) -> None:
    """Retrain ``run.pending`` (or, with retraining off, emit the tickets as found)."""
    if not (run.pending and run.trial.retrain.enabled):
        for ticket in run.pending:
            run.emit(ticket)
        run.pending = []
        return
    if not run.enter("retrain"):
        return
    recipes = run.trial.retrain.recipes
    epochs = run.trial.retrain.epochs or run.train.epochs_per_round
    batches = run.data.num_train_batches(run.train.batch_size)
    for rnd in run.rounds(len(run.pending) * len(recipes)):
        ticket, recipe = run.pending[rnd // len(recipes)], recipes[rnd % len(recipes)]
        model = run.new_model(recipe.activation)
        add_binary_masks(model, ticket.masks)
        load_dense_state(model, run.snapshot)
        val, test = run.fit(
            model, run.new_optimizer(model), epochs, recipe=recipe.name,
            batch_loss=lambda r=recipe: make_batch_loss(r, run.data.num_classes, batches,
                                                        run.generator),
            lr_factor=lambda epoch, r=recipe: warmup_factor(epoch, r.warmup_epochs),
        )
        primary = rnd % len(recipes) == 0
        record_recipe_result(ticket, recipe, val, test, run.ledger.epochs("retrain", rnd),
                             primary)
        if primary:  # the reported accuracy is the primary recipe's: keep its model
            keep_trained(ticket, model, recipe.activation)
        if rnd % len(recipes) == len(recipes) - 1:
            run.emit(ticket)


def retrain_group(group) -> None:
    """``retrain_pending`` for a fused group (``methods.group.GroupRun``): every member's
    pending tickets retrained at once, one fused model per (ticket, recipe) round. Recipes
    that mix examples (mixup, CutMix) never reach here (``cs.fusible``)."""
    runs = group.members
    if not (runs[0].pending and runs[0].trial.retrain.enabled):
        for run in runs:
            retrain_pending(run)  # retraining off: emitted as found
        return
    if not group.enter("retrain"):
        return
    recipes = runs[0].trial.retrain.recipes
    epochs = runs[0].trial.retrain.epochs or group.train.epochs_per_round
    for rnd in group.rounds(len(runs[0].pending) * len(recipes)):
        tickets = [run.pending[rnd // len(recipes)] for run in runs]
        recipe = recipes[rnd % len(recipes)]
        model = group.new_model(recipe.activation)
        add_binary_masks(model, group.stack([t.masks for t in tickets]))
        load_dense_state(model, group.stack([run.snapshot for run in runs]))
        vals, tests = group.fit(
            model, group.new_optimizer(model), epochs, recipe=recipe.name,
            smoothing=recipe.label_smoothing,
            lr_factor=lambda epoch, r=recipe: warmup_factor(epoch, r.warmup_epochs))
        primary = rnd % len(recipes) == 0
        for member, (run, ticket) in enumerate(zip(runs, tickets)):
            record_recipe_result(ticket, recipe, vals[member], tests[member],
                                 run.ledger.epochs("retrain", rnd), primary)
        if primary:
            group.keep_trained(tickets, model, recipe.activation)
        if rnd % len(recipes) == len(recipes) - 1:
            for run, ticket in zip(runs, tickets):
                run.emit(ticket)


def record_recipe_result(ticket: Ticket, recipe, val, test, epochs: int, primary: bool) -> None:
    """Store one recipe's retraining result in ``ticket.meta["recipes"][recipe.name]``; the
    primary (first) recipe's accuracy and epochs are also the ticket's own."""
    results = dict(ticket.meta.get("recipes") or {})
    results[recipe.name] = {"val_acc": val, "test_acc": test, "retrain_epochs": epochs,
                            "settings": recipe.tweaks()}
    ticket.meta["recipes"] = results
    if primary:
        ticket.meta.update(val_acc=val, test_acc=test, retrain_epochs=epochs, recipe=recipe.name)


def planned_retrain_epochs(trial, tickets: int) -> int:
    """Epochs retraining ``tickets`` tickets under every recipe will take (0 when off)."""
    if not trial.retrain.enabled:
        return 0
    epochs = trial.retrain.epochs or trial.train.epochs_per_round
    return tickets * epochs * len(trial.retrain.recipes)


def retrain_ticket(ticket: Ticket, trial, data, hooks: Hooks | None = None) -> TrialResult:
    """Retrain an existing ticket (e.g. loaded from disk) from its rewind point, with its mask
    fixed, under ``trial``'s recipes; results it carried from an earlier retraining are
    replaced, not merged."""
    run = TrialRun(trial, data, hooks)
    run.begin()
    if run.resuming is None:
        run.snapshot = {k: v.to(run.device) for k, v in ticket.rewind_state.items()}
        meta = {k: v for k, v in ticket.meta.items() if k not in ("recipe", "recipes")}
        run.pending = [Ticket(ticket.name, ticket.masks, ticket.rewind_state, meta)]
    retrain_pending(run)
    run.ledger.touch()
    return TrialResult(trial.trial_id, trial.method, run.tickets, run.ledger, run.rounds_done,
                       {}, dict(data.sizes))
