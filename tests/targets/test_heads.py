"""Closed-form heads (`d2nwg.targets.heads`) and the pipeline's ``head_solver``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2nwg.targets.architectures import build_model
from d2nwg.targets.heads import SHRINKAGE_GRID, class_mean_head, head_inputs, lda_cv_head, lda_head, with_head


def _gaussian_classes(k: int = 4, n: int = 40, d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 3.0 * torch.randn(k, d, generator=g)
    x = torch.cat([means[i] + torch.randn(n, d, generator=g) for i in range(k)])
    y = torch.arange(k).repeat_interleave(n)
    return x, y


def test_lda_head_matches_the_textbook_formula():
    x, y = _gaussian_classes()
    w, b = lda_head(x, y, 4, shrinkage=0.2)
    xn, yn = x.double().numpy(), y.numpy()
    mu = np.stack([xn[yn == i].mean(0) for i in range(4)])
    c = xn - mu[yn]
    s = c.T @ c / len(xn)
    s = 0.8 * s + 0.2 * np.trace(s) / len(s) * np.eye(len(s))
    w_ref = np.linalg.solve(s, mu.T).T
    np.testing.assert_allclose(w.double().numpy(), w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.double().numpy(), -0.5 * (w_ref * mu).sum(1), rtol=1e-5, atol=1e-6)
    assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.95


def test_class_mean_head_is_nearest_class_mean():
    x, y = _gaussian_classes(seed=1)
    w, b = class_mean_head(x, y, 4)
    mu = torch.stack([x[y == i].mean(0) for i in range(4)])
    assert torch.equal((x @ w.T + b).argmax(1), torch.cdist(x, mu).argmin(1))


@pytest.mark.parametrize("solver", [lda_head, lda_cv_head, class_mean_head])
def test_heads_are_class_equivariant(solver):
    """Relabelling the classes permutes the rows: row i depends on class i's samples, not on slot i."""
    x, y = _gaussian_classes(seed=2)
    perm = torch.tensor([2, 0, 3, 1])  # new label of old class j is perm[j]
    w, b = solver(x, y, 4)
    w2, b2 = solver(x, perm[y], 4)
    torch.testing.assert_close(w2[perm], w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b2[perm], b, rtol=1e-5, atol=1e-5)


def test_lda_rejects_bad_input():
    x, y = _gaussian_classes()
    with pytest.raises(ValueError, match="shrinkage"):
        lda_head(x, y, 4, shrinkage=0.0)
    with pytest.raises(ValueError, match="every class"):
        lda_head(x, y, 5)
    # one sample per class: no spread, still a finite nearest-class-mean rule
    w, b = lda_head(x[::40], y[::40], 4)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


def test_head_inputs_are_the_features_the_head_sees():
    model = build_model({"name": "mlp", "config": {"in_features": 5, "hidden": [7], "num_classes": 3}})
    x = torch.randn(11, 5)
    params = {k: v + 1.0 for k, v in model.state_dict().items()}
    features = head_inputs(model, "fc1", params, x)
    expected = torch.relu(x @ params["fc0.weight"].T + params["fc0.bias"])
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match="no submodule"):
        head_inputs(model, "head", params, x)
    with pytest.raises(ValueError, match="not the classifier head"):
        head_inputs(model, "fc0", params, x)  # a layout without the head would name fc0 last


def test_pipeline_lda_heads_are_computed_from_the_dataset(tiny_digits_zoo, make_tiny_pipeline):
    zoo = tiny_digits_zoo
    task = next(t for t in zoo.tasks if zoo.task_kind(t) == "unseen_classes")
    support = zoo.class_samples(task, "support")
    plain = make_tiny_pipeline(zoo)(dataset=support, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    pipe = make_tiny_pipeline(zoo, head_solver="lda")
    out = pipe(dataset=support, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    model = build_model(zoo.architecture)
    x, y = zoo.task_data(task, "support")
    for generated, solved in zip(plain.weights, out.weights):
        for name in ("fc0.weight", "fc0.bias"):  # the body is the generated one
            assert torch.equal(generated[name], solved[name])
        w, b = lda_cv_head(head_inputs(model, "fc1", generated, x), y, len(support))
        # the LDA rows, rescaled by one positive factor to the decoded head's norm
        scale = generated["fc1.weight"].norm() / w.norm()
        torch.testing.assert_close(solved["fc1.weight"], w * scale)
        torch.testing.assert_close(solved["fc1.bias"], b * scale)
        assert solved["fc1.weight"].norm() == pytest.approx(float(generated["fc1.weight"].norm()), rel=1e-5)
    # deterministic: same seed, same weights
    again = pipe(dataset=support, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a[k], c[k]) for a, c in zip(out.weights, again.weights) for k in a)


def test_pipeline_rejects_an_unknown_head_solver(tiny_digits_zoo, make_tiny_pipeline):
    with pytest.raises(ValueError, match="head_solver"):
        make_tiny_pipeline(tiny_digits_zoo, head_solver="svm")


def test_with_head_checks_shapes():
    sd = {"fc1.weight": torch.zeros(3, 4), "fc1.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="fc1.weight"):
        with_head(sd, ["fc1.weight", "fc1.bias"], torch.zeros(2, 4), torch.zeros(2))


def test_lda_cv_picks_the_shrinkage_with_the_best_two_fold_accuracy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(60, 20, generator=g)  # few samples per dimension: shrinkage matters
    y = torch.arange(3).repeat(20)
    x[:, :3] += 1.5 * torch.nn.functional.one_hot(y, 3)
    rank = torch.zeros_like(y)
    for k in range(3):
        idx = (y == k).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    fold = rank % 2 == 0
    scores = {}
    for s in SHRINKAGE_GRID:
        correct = 0
        for a in (fold, ~fold):
            w, b = lda_head(x[a], y[a], 3, s)
            correct += int(((x[~a] @ w.T + b).argmax(1) == y[~a]).sum())
        scores[s] = correct
    best = max(sorted(SHRINKAGE_GRID, reverse=True), key=lambda s: scores[s])
    w, b = lda_cv_head(x, y, 3)
    w_ref, b_ref = lda_head(x, y, 3, best)
    assert torch.equal(w, w_ref) and torch.equal(b, b_ref)


def test_cli_head_solver_choices_match_the_library():
    from d2nwg.commands.options import HEAD_SOLVER_CHOICES
    from d2nwg.targets.heads import HEAD_SOLVERS

    assert set(HEAD_SOLVER_CHOICES) == {"generated", *HEAD_SOLVERS}
