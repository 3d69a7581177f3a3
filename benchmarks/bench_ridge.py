"""Which ridge the conditional mean (`d2nwg.models.ConditionalMean`) should use on a causal-LM adapter zoo.

For each ridge strength, every *training* task's adapter is predicted by the regression fitted on the other
training tasks and scored by the mean log-likelihood of that task's test answers (nats per token,
teacher-forced through the slice; the member never trained on them). The left-out task is queried at its 8
support records (``--query support``, `d2nwg.models.conditional_mean.leave_one_out_at`), as generation
conditions on a user's records, or at the training embedding it was left out with (``--query train``, the
closed form `leave_one_out`). Held-out tasks are not touched, so a ridge chosen here is chosen on training data
only. It also prints the leave-one-out token error, what `ConditionalMean.fit` minimises by default.

    python benchmarks/bench_ridge.py --zoo runs/llm-lora [--stride 4] [--query train]

Measured on the default llm-lora zoo with task-gradient conditioning (docs/results/llm-lora.md; stride 4: 48 training
tasks, support query, 532 s with another job on the second core): log-likelihood peaks at ridge 0.316
(-0.0809; 0.1: -0.0899, 1.0: -0.0903), while the token error is lowest at 1.78. On the earlier zoo without
the gradient block (stride 2, train query) it peaked at 0.1 (-0.099; 0.01: -0.118, 1.0: -0.139).
"""

from __future__ import annotations

import argparse
import time


def ridge_scores(zoo, stride: int = 1, query: str = "support") -> list[tuple[float, float, float]]:
    """``(ridge, leave-one-out test log-likelihood, leave-one-out token MSE)`` for each ridge of `RIDGE_GRID`,
    over every ``stride``-th training task of the causal-LM adapter ``zoo``; the left-out task's regression is
    queried at its ``query`` split (``support``: its 8 support records, as generation conditions on a user's
    records; ``train``: the training embedding it was left out with, `leave_one_out`)."""
    import torch

    from d2nwg.models.conditional_mean import RIDGE_GRID, class_means, leave_one_out, leave_one_out_at
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.finetune import adapter_scores
    from d2nwg.targets.population import stack_state_dicts

    module = build_model(zoo.architecture).eval()
    train = zoo.members("train")
    tokens = zoo.tokens("train")
    cf = zoo.input_spec.condition_features  # what the dataset encoder and the regression see
    embeddings = torch.stack([class_means(zoo.class_samples(m.task, "train"), cf) for m in train])
    blocks = zoo.input_spec.condition_blocks
    picked = list(range(0, len(train), stride))
    if query == "train":
        predictions = {ridge: leave_one_out(embeddings, tokens, ridge, blocks)[picked] for ridge in RIDGE_GRID}
    elif query == "support":
        queries = torch.zeros_like(embeddings)  # only the picked rows are queried
        anchor = zoo.init_state()
        for i in picked:
            queries[i] = class_means([support_features(zoo, module, train[i].task, anchor)], cf)
        predictions = dict(zip(RIDGE_GRID, leave_one_out_at(embeddings, tokens, queries, RIDGE_GRID, blocks, picked)))
    else:
        raise ValueError(f"unknown query split {query!r}; expected support or train")
    scores = dict.fromkeys(RIDGE_GRID, 0.0)
    for n, i in enumerate(picked):
        states = zoo.layout.detokenize(torch.stack([predictions[r][n] for r in RIDGE_GRID]))
        ll = adapter_scores(module, stack_state_dicts(states), zoo.class_samples(train[i].task, "test")[0])
        for j, ridge in enumerate(RIDGE_GRID):
            scores[ridge] += float(ll[j]) / len(picked)
    return [(r, scores[r], float((predictions[r] - tokens[picked]).pow(2).mean())) for r in RIDGE_GRID]


def support_features(zoo, module, task: str, anchor=None):
    """``task``'s support samples ``[n, D]`` as generation would condition on them: the zoo stores a training
    task's support split without the gradient block (`model_zoo.llm_lora`), so it is taken here, at ``anchor``
    (default: the zoo's warm start), as `d2nwg.targets.causal_lm.conditioning.gradient_condition` takes it for a held-out task."""
    from d2nwg.targets.causal_lm.conditioning import gradient_condition
    from d2nwg.targets.causal_lm.features import GRADIENT_POOLING
    from d2nwg.targets.causal_lm.finetune import precision_context

    x = zoo.class_samples(task, "support")[0]
    if module.pooling != GRADIENT_POOLING:
        return x
    with precision_context(str((zoo.manifest.get("recipe") or {}).get("precision", "32-true")), x.device):
        return gradient_condition(module, zoo.init_state() if anchor is None else anchor, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, help="a causal-lm-adapter zoo (d2nwg zoo build llm-lora)")
    parser.add_argument("--stride", type=int, default=1, help="score every STRIDE-th training task (speed)")
    parser.add_argument("--query", choices=("support", "train"), default="support", help="split the left-out task is conditioned on")
    args = parser.parse_args()

    from d2nwg.zoo.model_zoo import ModelZoo

    zoo = ModelZoo.open(args.zoo)
    if zoo.architecture.get("name") != "causal-lm-adapter":
        raise SystemExit(f"error: {args.zoo} is not a causal-LM adapter zoo")
    started = time.perf_counter()
    rows = ridge_scores(zoo, args.stride, args.query)
    for ridge, loglik, error in rows:
        print(f"ridge {ridge:8.4f}   leave-one-out test log-likelihood {loglik:8.4f}   token MSE {error:.4f}")
    tasks = len(range(0, len(zoo.members("train")), args.stride))
    print(f"best by log-likelihood: {max(rows, key=lambda r: r[1])[0]:.4f}; by token error: {min(rows, key=lambda r: r[2])[0]:.4f} "
          f"({tasks} training tasks, {time.perf_counter() - started:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
