import pytest
import torch

import ticketsearch
from ticketsearch.models import create_model
from ticketsearch.sparsity.masks import binary_masks, dense_state_dict, masked_modules
from ticketsearch.sparsity.ticketfile import TicketFormatError
from ticketsearch.tickets import Ticket


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
    data = bytearray((path / "state.bin").read_bytes())
    data[100] ^= 0x01
    (path / "state.bin").write_bytes(bytes(data))
    with pytest.raises(TicketFormatError, match="checksum"):
        ticketsearch.load_ticket(path)
