import math

import pytest
import torch

from ticketsearch.sparsity.imp import prune, prune_count, prune_global, prune_layerwise


def random_layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {"a": torch.randn(20, 30, generator=g), "b": torch.randn(7, 3, 3, 3, generator=g),
               "c": torch.randn(50, generator=g) * 0.1}
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in weights.items()}
    return weights, masks


def brute_force_global(weights, masks, fraction):
    remaining = sorted(abs(float(w)) for n in masks
                       for w, m in zip(weights[n].flatten(), masks[n].flatten()) if m)
    count = math.ceil(round(fraction * len(remaining), 9))
    threshold = remaining[count - 1]
    return {n: masks[n] & (weights[n].abs() > threshold) for n in masks}


def test_prune_count_is_ceil_of_fraction_without_float_noise():
    assert prune_count(0.2, 15) == 3
    assert prune_count(0.2, 16) == 4
    assert prune_count(0.2, 1) == 1
    assert prune_count(0.2, 0) == 0


def test_global_mask_equals_brute_force_reference_over_rounds():
    weights, masks = random_layers()
    for _ in range(4):
        expected = brute_force_global(weights, masks, 0.2)
        got = prune_global(weights, masks, 0.2)
        for name in masks:
            assert torch.equal(got[name], expected[name]), name
        masks = got


def test_density_after_k_rounds_is_point_eight_to_the_k():
    weights, masks = random_layers(1)
    total = sum(m.numel() for m in masks.values())
    for k in range(1, 11):
        masks = prune(weights, masks, 0.2, "global")
        kept = sum(int(m.sum()) for m in masks.values())
        assert abs(kept - total * 0.8**k) <= k, (k, kept, total * 0.8**k)


def test_pruning_only_removes_remaining_weights():
    weights, masks = random_layers(2)
    masks["a"][0, :] = False
    weights["a"][0, :] = 100.0  # large but already pruned: must stay pruned
    new = prune_global(weights, masks, 0.5)
    assert not new["a"][0, :].any()
    for name in masks:
        assert not (new[name] & ~masks[name]).any()


def test_layerwise_prunes_each_tensor_separately():
    weights, masks = random_layers(3)
    new = prune_layerwise(weights, masks, 0.2)
    for name, mask in masks.items():
        n = int(mask.sum())
        kept = int(new[name].sum())
        assert kept == n - math.ceil(0.2 * n)
        magnitudes = weights[name].abs()
        assert magnitudes[new[name]].min() > magnitudes[~new[name]].max()
    # global on the same weights prunes the small-magnitude layer "c" much harder
    glob = prune_global(weights, masks, 0.2)
    assert glob["c"].float().mean() < new["c"].float().mean()


def test_unknown_scope_is_rejected():
    weights, masks = random_layers()
    with pytest.raises(ValueError, match="scope"):
        prune(weights, masks, 0.2, "random")
