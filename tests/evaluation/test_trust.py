"""Trust checks on known inputs (issue 15, item 3): the spread ratio against a hand computation, and each warning
firing on its own unhealthy figure and never on healthy ones."""

from __future__ import annotations

import itertools
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from d2nwg.evaluation.trust import (
    COLLAPSE_RATIO,
    MIN_VAE_RECON_RATIO,
    NEAR_COPY_RATIO,
    flat_tokens,
    generation_warnings,
    ncm_accuracy,
    report_warnings,
    sample_diversity,
    streamed_zoo_spacing,
    within_task_spread_ratio,
    zoo_spacing,
)

# A zoo of four members in 2-D and one task's three samples, distances easy to check by hand.
ZOO = [(0.0, 0.0), (10.0, 0.0), (0.0, 30.0), (12.0, 30.0)]
SAMPLES = [(1.0, 1.0), (4.0, 5.0), (1.0, 9.0)]


def test_within_task_spread_ratio_matches_a_hand_computation():
    spacing = statistics.median(min(math.dist(a, b) for b in ZOO if b is not a) for a in ZOO)  # 10, 10, 12, 12 -> 11
    spread = statistics.median(math.dist(a, b) for a, b in itertools.combinations(SAMPLES, 2))  # 5, 8, 5 -> 5
    assert (spacing, spread) == (11.0, 5.0)
    zoo, samples = torch.tensor(ZOO), torch.tensor(SAMPLES)
    assert zoo_spacing(zoo) == pytest.approx(spacing)
    assert within_task_spread_ratio(samples, zoo_spacing(zoo)) == pytest.approx(spread / spacing)  # 5 / 11

    # The nearest member of every sample is member "a" at (0, 0): distances sqrt(2), sqrt(41), sqrt(82).
    (row,) = sample_diversity([samples], zoo, ["a", "b", "c", "d"], spacing)
    assert row["within_task_spread_ratio"] == pytest.approx(5 / 11)
    assert row["nearest_member"] == "a"
    assert row["nearest_member_ratio"] == pytest.approx(math.sqrt(41) / spacing)


def test_streamed_spacing_equals_the_in_memory_one():
    tokens = torch.randn(11, 6, generator=torch.Generator().manual_seed(0))
    expected = zoo_spacing(tokens, seed=3, max_reference=7)
    assert streamed_zoo_spacing(len(tokens), lambda index: tokens[index], seed=3, max_reference=7, chunk=4) == expected
    by_hand = statistics.median(min(torch.dist(a, b).item() for j, b in enumerate(tokens) if j != i) for i, a in enumerate(tokens))
    assert zoo_spacing(tokens, max_reference=11) == pytest.approx(by_hand)


def test_spread_ratio_is_none_when_it_cannot_be_computed():
    assert within_task_spread_ratio(torch.tensor([SAMPLES[0]]), 10.0) is None  # one sample
    assert within_task_spread_ratio(torch.tensor(SAMPLES), None) is None  # no zoo spacing
    assert within_task_spread_ratio(torch.tensor([SAMPLES[0], (math.nan, 0.0)]), 10.0) is None
    assert zoo_spacing(torch.tensor([ZOO[0]])) is None


# ----------------------------------------------------------------------------- report warnings
HEALTHY_SUMMARY = {  # the default digits report's figures
    "num_tasks": 200, "generated_best_acc": 0.968, "generated_mean_acc": 0.968, "ncm_acc": 0.938, "zoo_mean_acc": 0.202,
    "lda_zoo_mean_acc": 0.962, "oracle_acc": 0.984, "vae_recon_ratio": 0.938, "vae_recon_acc": 0.923, "vae_original_acc": 0.984,
}
HEALTHY_ROW = {"task": "t0", "within_task_spread_ratio": 0.4, "nearest_member_ratio": 2.4, "nearest_member": "m1"}

# name: (summary change, row change, words the one warning line must hold)
UNHEALTHY = {
    "below-cheap-baseline": ({"generated_best_acc": 0.179, "generated_mean_acc": 0.179, "zoo_mean_acc": 0.182, "ncm_acc": 0.1,
                              "lda_zoo_mean_acc": None},
                             {}, ["generated best 0.179", "zoo mean at 0.182", "200 held-out task"]),
    "below-lda-zoo-mean": ({"generated_best_acc": 0.956, "lda_zoo_mean_acc": 0.971}, {}, ["0.956", "LDA head on support at 0.971"]),
    "oracle-is-not-cheap": ({"oracle_acc": 0.999, "generated_best_acc": 0.97}, {}, None),
    "weak-vae": ({"vae_recon_ratio": 0.338, "vae_recon_acc": 0.3, "vae_original_acc": 0.9}, {},
                 ["VAE reconstruction ratio 0.338", f"below {MIN_VAE_RECON_RATIO}"]),
    "collapsed": ({}, {"within_task_spread_ratio": 0.002}, ["collapsed on 1 of 1 task", "0.002x", f"below {COLLAPSE_RATIO}"]),
    "near-copy": ({}, {"nearest_member_ratio": 0.01}, ["near-copies of one zoo member", "0.01x", "t0: member m1", f"below {NEAR_COPY_RATIO}"]),
}


def test_healthy_figures_give_no_warning():
    assert report_warnings(HEALTHY_SUMMARY, [HEALTHY_ROW]) == []


@pytest.mark.parametrize("case", list(UNHEALTHY))
def test_each_unhealthy_figure_gives_one_line_with_its_numbers(case):
    summary_change, row_change, words = UNHEALTHY[case]
    found = report_warnings({**HEALTHY_SUMMARY, **summary_change}, [{**HEALTHY_ROW, **row_change}])
    if words is None:  # the oracle trains on the task: never a cheap baseline
        assert found == []
        return
    assert len(found) == 1 and "\n" not in found[0], found
    assert all(w in found[0] for w in words), found[0]


# ----------------------------------------------------------------------------- generate's checks
def test_ncm_accuracy_on_known_clusters():
    support = [torch.tensor([[0.0, 0.0], [0.0, 2.0]]), torch.tensor([[10.0, 0.0], [10.0, 2.0]])]
    held = [torch.tensor([[1.0, 1.0], [6.0, 1.0]]), torch.tensor([[9.0, 1.0]])]  # one class-0 sample is nearer class 1
    assert ncm_accuracy(support, held) == pytest.approx(2 / 3)
    assert ncm_accuracy(support, held, num_features=1) == pytest.approx(2 / 3)


def test_generation_warnings_on_known_inputs(tiny_digits_zoo, tiny_pipeline):
    members = tiny_digits_zoo.state_dicts("train")
    spacing = zoo_spacing(flat_tokens(tiny_pipeline.layout, members))
    healthy = SimpleNamespace(layout=tiny_pipeline.layout, provenance={"vae_recon_ratio": 0.95, "zoo": {"nn_distance": spacing}})
    # Distinct zoo members as "samples": spread of the order of the zoo's own spacing; best above NCM.
    assert generation_warnings(healthy, members[:4], best_score=0.9, ncm_score=0.8, num_held_back=20) == []
    assert generation_warnings(SimpleNamespace(layout=tiny_pipeline.layout, provenance=None), members[:1]) == []  # nothing to check

    weak = SimpleNamespace(layout=tiny_pipeline.layout, provenance={"vae_recon_ratio": 0.3, "zoo": {"nn_distance": spacing}})
    found = generation_warnings(weak, [members[0]] * 4, best_score=0.28, ncm_score=0.9, num_held_back=20)
    assert len(found) == 3, found
    baseline, recon, collapse = found
    assert "generated best 0.280" in baseline and "nearest class mean at 0.900" in baseline and "20 held-back samples" in baseline
    assert "VAE reconstruction ratio 0.300" in recon
    assert "collapsed on 1 of 1 task" in collapse and "0x" in collapse


def test_residual_warning_when_generation_does_not_beat_its_own_conditional_mean():
    from d2nwg.evaluation.trust import residual_message

    found = residual_message(0.50, 0.54, "on 3 tasks")
    assert found is not None and "0.500" in found and "0.540" in found and "\n" not in found
    assert residual_message(0.55, 0.54, "on 3 tasks") is None
    assert residual_message(0.50, None, "on 3 tasks") is None  # a pipeline without a conditional mean
