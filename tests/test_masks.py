import copy
import io

import torch
from torch import nn

from ticketsearch.sparsity.cs import l0_penalty
from ticketsearch.sparsity.masks import (
    add_binary_masks,
    add_soft_masks,
    binary_masks,
    dense_state_dict,
    load_dense_state,
    masked_modules,
    soft_masks,
)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def test_binary_mask_zeroes_pruned_weights_in_forward():
    net = small_net()
    keep = torch.rand(3, 64) > 0.5
    add_binary_masks(net, {"4": keep})
    assert torch.equal(net[4].weight == 0, ~keep | (net[4].parametrizations.weight.original == 0))
    x = torch.randn(2, 64)
    expected = x @ (net[4].parametrizations.weight.original * keep).T + net[4].bias
    assert torch.allclose(net[4](x), expected)


def test_masks_survive_deepcopy_state_dict_and_moves():
    net = small_net()
    add_soft_masks(net, ["0"], s0=-0.2)
    add_binary_masks(net, {"4": torch.rand(3, 64) > 0.3})
    net(torch.randn(2, 1, 6, 6))  # leaves a cached soft mask with a graph behind
    l0_penalty(net)
    net(torch.randn(2, 1, 6, 6))
    clone = copy.deepcopy(net)
    assert set(masked_modules(clone)) == {"0", "4"}
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_net()
    add_soft_masks(fresh, ["0"], s0=0.0)
    add_binary_masks(fresh, {"4": torch.ones(3, 64, dtype=torch.bool)})
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(5, 1, 6, 6)
    net.eval(), clone.eval(), fresh.eval()
    assert torch.equal(net(x), clone(x))
    assert torch.equal(net(x), fresh(x))
    assert torch.equal(binary_masks(fresh)["4"], binary_masks(net)["4"])
    moved = copy.deepcopy(net).to(torch.float64)
    assert soft_masks(moved)["0"].logits.dtype == torch.float64
    assert binary_masks(moved)["4"].dtype == torch.bool


def test_dense_state_uses_plain_names_and_excludes_mask_tensors():
    net = small_net()
    plain = set(net.state_dict())
    add_soft_masks(net, ["0"], s0=0.0)
    add_binary_masks(net, {"4": torch.ones(3, 64, dtype=torch.bool)})
    assert set(dense_state_dict(net)) == plain


def test_rewind_restores_weights_and_bn_statistics_bit_exactly():
    net = small_net()
    add_binary_masks(net, {"0": torch.ones(4, 1, 3, 3, dtype=torch.bool)})
    net.train()
    net(torch.randn(8, 1, 6, 6))
    snapshot = dense_state_dict(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 1, 6, 6)).square().sum().backward()
        opt.step()
    changed = dense_state_dict(net)
    assert not torch.equal(changed["1.running_mean"], snapshot["1.running_mean"])
    assert not torch.equal(changed["0.weight"], snapshot["0.weight"])
    load_dense_state(net, snapshot)
    after = dense_state_dict(net)
    assert set(after) == set(snapshot)
    for key, value in snapshot.items():
        assert torch.equal(after[key], value), key
    assert int(after["1.num_batches_tracked"]) == 1


def test_load_dense_state_rejects_mismatched_keys():
    net = small_net()
    state = dense_state_dict(net)
    state.pop("4.bias")
    try:
        load_dense_state(net, state)
    except ValueError as err:
        assert "4.bias" in str(err)
    else:
        raise AssertionError("missing key was accepted")
