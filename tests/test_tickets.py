import json
import tempfile

import pytest
import torch

import ticketsearch
from ticketsearch import cli
from ticketsearch.models import create_model
from ticketsearch.sparsity.masks import binary_masks, dense_state_dict, masked_modules
from ticketsearch.sparsity.ticketfile import TicketFormatError
from ticketsearch.tickets import Ticket, TicketMismatchError


def make_ticket():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, (3, 32, 32))
    names = ["conv1", "layer1.0.conv1", "layer3.2.conv2"]
    modules = dict(model.named_modules())
    masks = {n: torch.rand_like(modules[n].weight) > 0.7 for n in names}
    meta = {"method": "cs", "model": "resnet20", "num_classes": 10, "input_shape": [3, 32, 32],
            "dataset": "cifar10", "rewind_epoch": 2, "test_acc": 0.91, "val_acc": 0.9}
    return Ticket("final", masks, dense_state_dict(model), meta)


def test_ticket_round_trip_is_exact(tmp_path):
    ticket = make_ticket()
    path = ticket.save(tmp_path / "final")
    loaded = ticketsearch.load_ticket(path)
    assert loaded.name == "final"
    assert loaded.meta == ticket.meta
    assert loaded.sparsity == pytest.approx(ticket.sparsity)
    for name, mask in ticket.masks.items():
        assert torch.equal(loaded.masks[name], mask)
    for key, value in ticket.rewind_state.items():
        assert torch.equal(loaded.rewind_state[key], value) and loaded.rewind_state[key].dtype == value.dtype


def test_apply_rewinds_a_fresh_model_and_fixes_the_mask(tmp_path):
    ticket = make_ticket()
    model = ticketsearch.load_ticket(ticket.save(tmp_path / "t")).apply()
    assert set(masked_modules(model)) == set(ticket.masks)
    for name, keep in binary_masks(model).items():
        assert torch.equal(keep, ticket.masks[name])
        assert bool((masked_modules(model)[name].weight[~keep] == 0).all())
    state = dense_state_dict(model)
    for key, value in ticket.rewind_state.items():
        assert torch.equal(state[key], value), key
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_flipped_byte_is_rejected(tmp_path):
    path = make_ticket().save(tmp_path / "t")
    data = bytearray((path / "rewind.safetensors").read_bytes())
    data[100] ^= 0x01
    (path / "rewind.safetensors").write_bytes(bytes(data))
    with pytest.raises(TicketFormatError, match="checksum"):
        ticketsearch.load_ticket(path)


def assert_same_ticket(loaded, ticket):
    assert loaded.name == ticket.name
    assert loaded.meta == ticket.meta
    assert list(loaded.masks) == list(ticket.masks)
    assert all(torch.equal(loaded.masks[n], m) for n, m in ticket.masks.items())
    assert list(loaded.rewind_state) == list(ticket.rewind_state)
    for key, value in ticket.rewind_state.items():
        assert loaded.rewind_state[key].dtype == value.dtype
        assert torch.equal(loaded.rewind_state[key], value), key


@pytest.mark.parametrize("edit", [{"test_acc": 0.99}, {"model_kwargs": {"width": 64}}],
                         ids=["test_acc", "model_kwargs"])
def test_edited_ticket_json_is_rejected(tmp_path, edit):
    path = make_ticket().save(tmp_path / "t")
    document = json.loads((path / "ticket.json").read_text())
    document.update(edit)
    (path / "ticket.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    with pytest.raises(TicketFormatError, match="metadata checksum mismatch.*edited or corrupted"):
        ticketsearch.load_ticket(path)


def test_apply_to_a_model_with_another_layer_shape_names_the_layer_and_leaves_it_alone():
    ticket = make_ticket()
    model = create_model("resnet20", 10, (3, 32, 32))
    model.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TicketMismatchError,
                       match=r"layer 'conv1' has shape \(8, 3, 3, 3\) in the model but "
                             r"\(16, 3, 3, 3\) in the ticket"):
        ticket.apply(model)
    assert not masked_modules(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


# --- tickets logged to MLflow -------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A local SQLite MLflow store holding one run with the ticket of ``make_ticket`` logged
    under ``tickets/final``; yields (tracking uri, run id, ticket)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("tickets", artifact_location=(root / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    ticket = make_ticket()
    client.log_artifacts(run_id, str(ticket.save(root / "final")), "tickets/final")
    client.set_terminated(run_id)
    return uri, run_id, ticket


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Point ``tempfile`` at an empty folder of this test, so leftovers can be listed exactly
    (and other processes' temporary files do not interfere)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("ticket-"))


def test_load_from_runs_uri_keeps_nothing_on_disk(mlflow_store, private_tmp):
    uri, run_id, ticket = mlflow_store
    loaded = ticketsearch.load_ticket(f"runs:/{run_id}/tickets/final", tracking_uri=uri)
    assert leftovers(private_tmp) == []
    assert_same_ticket(loaded, ticket)
    assert loaded.apply() is not None


def test_cli_shows_a_logged_ticket_and_keeps_nothing(mlflow_store, private_tmp, monkeypatch,
                                                     capsys):
    uri, run_id, ticket = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli.main(["ticket", f"runs:/{run_id}/tickets/final"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "final" and shown["test_acc"] == ticket.meta["test_acc"]
    assert leftovers(private_tmp) == []


@pytest.mark.parametrize("path", ["tickets/nope", "tickets/final/ticket.json"],
                         ids=["missing", "a_file"])
def test_runs_uri_without_a_ticket_is_a_clear_error(mlflow_store, private_tmp, path):
    uri, run_id, _ = mlflow_store
    artifact = f"runs:/{run_id}/{path}"
    with pytest.raises(TicketFormatError) as info:
        ticketsearch.load_ticket(artifact, tracking_uri=uri)
    message = str(info.value)
    assert artifact in message and "ticketsearch tickets" in message
    assert leftovers(private_tmp) == []


def test_runs_uri_of_a_corrupted_ticket_names_the_uri_and_cleans_up(mlflow_store, private_tmp,
                                                                     tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_id, _ = mlflow_store
    path = make_ticket().save(tmp_path / "bad")
    (path / "rewind.safetensors").write_bytes(b"\0" + (path / "rewind.safetensors").read_bytes()[1:])
    MlflowClient(tracking_uri=uri).log_artifacts(run_id, str(path), "tickets/bad")
    artifact = f"runs:/{run_id}/tickets/bad"
    with pytest.raises(TicketFormatError, match="rewind.safetensors checksum mismatch") as info:
        ticketsearch.load_ticket(artifact, tracking_uri=uri)
    assert artifact in str(info.value)
    assert leftovers(private_tmp) == []


def test_cli_exits_2_on_a_missing_ticket_uri(mlflow_store, private_tmp, monkeypatch, capsys):
    uri, run_id, _ = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    artifact = f"runs:/{run_id}/tickets/nope"
    assert cli.main(["ticket", artifact]) == 2
    err = capsys.readouterr().err
    assert artifact in err and "ticketsearch tickets" in err and "Traceback" not in err
    assert leftovers(private_tmp) == []
