import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ticketsearch.sparsity import cs
from ticketsearch.sparsity.masks import add_soft_masks, mask_parameters, soft_masks
from ticketsearch.training import make_optimizer


def net_with_masks(s0=0.0):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    add_soft_masks(net, ["0", "2"], s0)
    return net


@pytest.mark.parametrize("epochs", [2, 5, 85])
def test_beta_is_one_in_first_epoch_and_beta_final_in_last(epochs):
    betas = [cs.beta_for_epoch(e, epochs, 200.0) for e in range(epochs)]
    assert betas[0] == 1.0
    assert betas[-1] == 200.0
    ratio = 200.0 ** (1 / (epochs - 1))
    for a, b in zip(betas, betas[1:]):
        assert b / a == pytest.approx(ratio)


def test_per_iteration_beta_schedule_spans_the_round():
    assert cs.beta_for_iteration(0, 100, 50.0) == 1.0
    assert cs.beta_for_iteration(99, 100, 50.0) == 50.0
    assert cs.beta_for_iteration(33, 100, 50.0) == pytest.approx(50.0 ** (33 / 99))


def test_mask_is_exactly_one_at_round_start():
    for s0 in (-0.3, 0.0, 0.05):
        net = net_with_masks(s0)
        for mask in soft_masks(net).values():
            assert torch.allclose(mask.soft_mask(), torch.ones_like(mask.logits))


def test_penalty_is_the_sum_of_scaled_soft_masks():
    net = net_with_masks(-0.1)
    with torch.no_grad():
        for mask in soft_masks(net).values():
            mask.logits.copy_(torch.randn_like(mask.logits))
    cs.set_beta(net, 3.0)
    expected = sum(
        (torch.sigmoid(3.0 * m.logits) / torch.sigmoid(torch.tensor(-0.1))).sum()
        for m in soft_masks(net).values()
    )
    net(torch.randn(2, 5))  # the penalty reuses the forward pass's masks
    assert torch.allclose(cs.l0_penalty(net), expected)
    assert torch.allclose(cs.l0_penalty(net), expected)  # and recomputes when none cached
    fresh = net_with_masks(0.0)
    assert cs.l0_penalty(fresh).item() == pytest.approx(5 * 4 + 4 * 3)  # a sum, not a mean


def test_no_weight_decay_reaches_mask_logits():
    net = net_with_masks(0.5)
    train = SimpleNamespace(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5)
    opt = make_optimizer(net, train)
    logits = mask_parameters(net)
    groups = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(groups[id(p)] == 0.0 for p in logits)
    weight = net[0].parametrizations.weight.original
    assert groups[id(weight)] == 0.5
    before = [p.detach().clone() for p in logits]
    w_before = weight.detach().clone()
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(logits, before))
    assert torch.allclose(weight, w_before * (1 - 0.1 * 0.5))


def test_soft_reset_rules_on_hand_made_logits():
    logits = torch.tensor([[-2.0, -0.5, 0.0, 0.02, 1.5]])
    for rule, expected in [
        ("scaled", [[-20.0, -5.0, -0.1, -0.1, -0.1]]),
        ("clip", [[-2.0, -0.5, -0.1, -0.1, -0.1]]),
    ]:
        net = nn.Sequential(nn.Linear(5, 1))
        add_soft_masks(net, ["0"], -0.1)
        mask = soft_masks(net)["0"]
        with torch.no_grad():
            mask.logits.copy_(logits)
        cs.set_beta(net, 10.0)
        cs.soft_reset(net, rule, beta_end=10.0)
        assert torch.allclose(mask.logits, torch.tensor(expected)), rule
        assert float(mask.beta) == 1.0
    # scaled with positive s0: values above s0 are clipped, below are scaled
    net = nn.Sequential(nn.Linear(5, 1))
    add_soft_masks(net, ["0"], 0.05)
    mask = soft_masks(net)["0"]
    with torch.no_grad():
        mask.logits.copy_(logits)
    cs.soft_reset(net, "scaled", beta_end=4.0)
    assert torch.allclose(mask.logits, torch.tensor([[-8.0, -2.0, 0.0, 0.05, 0.05]]))
    with pytest.raises(ValueError, match="soft_reset"):
        cs.soft_reset(net, "hard", 1.0)


def test_ticket_mask_is_strictly_positive_logits_and_sparsity_counts_nonpositive():
    net = nn.Sequential(nn.Linear(4, 2))
    add_soft_masks(net, ["0"], 0.0)
    with torch.no_grad():
        soft_masks(net)["0"].logits.copy_(torch.tensor([[0.0, 1e-9, -1e-9, 3.0],
                                                         [-5.0, 0.0, 0.2, -0.0]]))
    masks = cs.ticket_masks(net)
    assert masks["0"].tolist() == [[False, True, False, True], [False, False, True, False]]
    assert cs.cs_sparsity(net) == pytest.approx(5 / 8)
    # float32 soft mask underflow must not matter: huge beta, tiny positive logit stays kept
    cs.set_beta(net, 1e6)
    assert math.isclose(cs.cs_sparsity(net), 5 / 8)


def test_all_logits_are_views_of_one_flat_parameter_computed_once_per_pass(monkeypatch):
    """One soft-mask kernel: the logits of every masked layer live in one flat parameter (the
    optimizer sees one tensor), each layer's logits are a view of it, and a forward pass plus
    the penalty compute the sigmoid once for all layers."""
    net = net_with_masks(-0.1)
    (flat,) = mask_parameters(net)
    masks = soft_masks(net)
    assert flat.numel() == sum(m.logits.numel() for m in masks.values()) == 5 * 4 + 4 * 3
    with torch.no_grad():
        masks["2"].logits.fill_(0.25)  # a view: writes the flat parameter
    assert torch.equal(flat[20:], torch.full((12,), 0.25))
    calls = []
    real = torch.sigmoid
    monkeypatch.setattr(torch, "sigmoid", lambda t: calls.append(t.shape) or real(t))
    loss = net(torch.randn(3, 5)).sum() + 1e-3 * cs.l0_penalty(net)
    assert calls == [torch.Size([32])]
    loss.backward()
    assert flat.grad is not None and flat.grad.shape == (32,)
    net(torch.randn(3, 5))  # the next pass computes afresh
    assert len(calls) == 2
