"""Closed-form classifier heads in a network's feature space, and the features themselves.

A classifier's *head* is its last linear layer, ``logits = W f + b`` on the features
``f`` that the rest of the network (the *body*) computes. Two zero-gradient-step ways
to write that layer from labelled samples live here:

* `class_mean_head`: nearest class mean in feature space written as a linear layer,
  ``W_i = mu_i``, ``b_i = -|mu_i|^2 / 2`` (weight imprinting, Qi, Brown and Lowe,
  CVPR 2018, with Euclidean instead of cosine distance so that it is a plain
  ``nn.Linear``). The *prototype* baseline of the evaluation protocol.
* `lda_head` / `lda_cv_head`: Fisher's linear discriminant with shrinkage towards
  a scaled identity (the shrinkage chosen by cross-validation on the same samples), ``W_i = S^-1 mu_i``, ``b_i = -mu_i^T S^-1 mu_i / 2``: class means
  plus the shared within-class covariance, the Bayes-optimal linear rule for Gaussian
  classes with one covariance. d2nwg's pipeline writes the head of every generated
  body this way (`D2NWGPipeline`), so that row i is computed from class i's samples
  in the generated body's feature space rather than recalled for a memorised class.

Both are equivariant in the classes: permuting the classes permutes the rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call


def head_module_name(head_names: Sequence[str]) -> str:
    """``["fc1.weight", "fc1.bias"]`` -> ``"fc1"``; raises ``ValueError`` if they name several modules."""
    modules = {n.rpartition(".")[0] for n in head_names}
    if len(modules) != 1:
        raise ValueError(f"head tensors {list(head_names)} do not belong to one module")
    return modules.pop()


def head_inputs(module: nn.Module, head: str, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The features ``[n, F]`` that submodule ``head`` receives when ``module`` runs on ``x [n, ...]`` with ``params``.

    ``params`` may hold only some tensors; the rest come from ``module``.

    Raises:
        ValueError: ``head`` is not a submodule, does not receive a ``[n, F]`` input, or is not the
            classifier head: its output is not the model's output (a closed-form head written there
            would not decide the predictions).
    """
    try:
        target = module.get_submodule(head)
    except AttributeError:
        raise ValueError(f"the model has no submodule {head!r} to read head features from") from None
    captured: list[torch.Tensor] = []
    handles = [
        target.register_forward_pre_hook(lambda _m, args: captured.append(args[0])),
        target.register_forward_hook(lambda _m, _args, out: captured.append(out)),
    ]
    try:
        with torch.no_grad():
            logits = functional_call(module, dict(params), (x,), strict=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != 2 or captured[0].dim() != 2:
        raise ValueError(f"head {head!r} did not receive one [n, F] feature matrix")
    if not (isinstance(logits, torch.Tensor) and logits.shape == captured[1].shape and torch.equal(logits, captured[1])):
        raise ValueError(f"module {head!r} is not the classifier head: its output is not the model's output")
    return captured[0]


def _class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"every class needs at least one sample; counts per class: {counts.tolist()}")
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    return sums / counts[:, None].to(features.dtype)


def class_mean_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-class-mean head: ``(W [K, F], b [K])`` with ``argmax(W f + b) = argmin_i |f - mu_i|``.

    Args:
        features: ``[n, F]`` features of labelled samples; labels: ``[n]`` in ``[0, K)``.
        num_classes: K.
    """
    mu = _class_means(features.double(), labels, num_classes)
    return mu.to(features.dtype), (-0.5 * (mu * mu).sum(1)).to(features.dtype)


def lda_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrinkage LDA head ``(W [K, F], b [K])`` (equal class priors).

    Args:
        features: ``[n, F]``; labels: ``[n]`` in ``[0, K)``; num_classes: K.
        shrinkage: ``S = (1 - s) * S_within + s * mean(diag(S_within)) * I``; in (0, 1]
            keeps ``S`` invertible when features are fewer than samples or dead (ReLU units
            that never fire have zero variance). `lda_cv_head` picks it per dataset.

    Raises:
        ValueError: ``shrinkage`` outside (0, 1], or a class without samples.
    """
    if not 0.0 < shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage}")
    f = features.double()
    mu = _class_means(f, labels, num_classes)  # (K, F)
    centred = f - mu[labels]
    within = centred.T @ centred / len(f)  # (F, F)
    scale = within.diagonal().mean()
    if scale <= 1e-12:  # one sample per class (or identical ones): no spread to scale by; plain NCM
        scale = torch.ones((), dtype=f.dtype, device=f.device)
    eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    cov = (1 - shrinkage) * within + shrinkage * scale * eye
    w = torch.linalg.solve(cov, mu.T).T  # (K, F)
    b = -0.5 * (w * mu).sum(1)
    return w.to(features.dtype), b.to(features.dtype)


SHRINKAGE_GRID = (0.02, 0.05, 0.1, 0.2, 0.5)
"""Shrinkages `lda_cv_head` chooses from."""


def lda_cv_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, grid: Sequence[float] = SHRINKAGE_GRID
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lda_head` with the shrinkage chosen by 2-fold cross-validation on the given samples.

    Args:
        features: ``[n, F]``; labels: ``[n]`` in ``[0, K)``; num_classes: K.
        grid: the shrinkages to choose from, each in (0, 1].

    Raises:
        ValueError: a class without samples, or a shrinkage outside (0, 1].

    Each class's samples alternate between two folds; every shrinkage in ``grid`` is fitted on
    one fold and scored on the other, both ways. The best mean accuracy wins (ties: the larger,
    more regularised shrinkage), and the head is refitted on all samples. The choice only ever
    sees the samples it is given (a dataset's support set), never test samples. Classes with one
    sample cannot be split: then the largest shrinkage of ``grid`` is used.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if counts.min() < 2:
        return lda_head(features, labels, num_classes, max(grid))
    rank = torch.zeros_like(labels)
    for k in range(num_classes):  # position of each sample within its class
        idx = (labels == k).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx), device=labels.device)
    fold = rank % 2 == 0
    best, best_acc = max(grid), -1.0
    for shrinkage in sorted(grid, reverse=True):
        correct = 0
        for train in (fold, ~fold):
            w, b = lda_head(features[train], labels[train], num_classes, shrinkage)
            correct += int(((features[~train] @ w.T + b).argmax(1) == labels[~train]).sum())
        acc = correct / len(labels)
        if acc > best_acc:
            best, best_acc = shrinkage, acc
    return lda_head(features, labels, num_classes, best)


HEAD_SOLVERS = {"class_mean": class_mean_head, "lda": lda_cv_head}
"""Closed-form heads by name (``D2NWGPipeline(head_solver=...)``)."""


def check_head_solver(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is ``"generated"`` (keep the decoded head) or a key of `HEAD_SOLVERS`."""
    if name != "generated" and name not in HEAD_SOLVERS:
        raise ValueError(f"unknown head_solver {name!r}; expected 'generated' or one of {sorted(HEAD_SOLVERS)}")


def with_head(
    state_dict: Mapping[str, torch.Tensor], head_names: Sequence[str], weight: torch.Tensor, bias: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose head weight (``[K, F]``) and bias (``[K]``, if the head has one) are replaced."""
    out = dict(state_dict)
    for name in head_names:
        ref = state_dict[name]
        value = weight if name.endswith("weight") else bias
        if value.shape != ref.shape:
            raise ValueError(f"computed head tensor for {name!r} has shape {list(value.shape)}, expected {list(ref.shape)}")
        out[name] = value.to(ref.dtype)
    return out
