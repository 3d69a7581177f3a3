"""How many fine-tuning steps, at which learning rate, on a support set of a causal-LM adapter zoo's task.

The ``finetune`` baseline of `d2nwg evaluate` and ``d2nwg generate --finetune-steps`` train an adapter on the
user's few records. This benchmark scores each (steps, lr) of a grid on *training* tasks only, from two starts:

* the zoo's warm start (``init.safetensors``), as the ``finetune`` baseline;
* the conditional mean fitted without the task (closed-form leave-one-out, `d2nwg.models.conditional_mean`),
  a stand-in for a generated adapter on a task the generator never saw. It predicts from the embedding of the
  task's 32 training conversations, where a generated adapter sees the 8 of its support set, so it is a
  slightly better start than a generated one would be.

Each start trains on the first ``samples_support`` training conversations of the task (what a user's support
set holds) and is scored by the mean log-likelihood of the task's test answers (nats per token,
teacher-forced through the slice; no adapter trained on them). Held-out tasks are not touched.

    python benchmarks/bench_finetune.py --zoo runs/llm-lora [--stride 8] [--ridge 0.1]
"""

from __future__ import annotations

import argparse
import itertools
import time

STEPS = (8, 16, 32)
LRS = (1e-3, 2e-3, 5e-3)


def finetune_scores(zoo, stride: int = 8, ridge: float = 0.1, steps=STEPS, lrs=LRS, seed: int = 0) -> dict:
    """``{start: {(steps, lr): mean test log-likelihood}}`` with ``(0, 0.0)`` the start itself, over every
    ``stride``-th training task of the causal-LM adapter ``zoo``; starts: ``"warm_start"`` and ``"loo_conditional_mean"``."""
    import torch

    from d2nwg.models.conditional_mean import class_means, leave_one_out
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.evaluate import warm_start
    from d2nwg.targets.causal_lm.finetune import adapter_scores, member_training, precision_context, train_adapters
    from d2nwg.targets.population import stack_state_dicts

    module = build_model(zoo.architecture).eval()
    train = zoo.members("train")
    recipe = zoo.manifest.get("recipe") or {}
    tuning = member_training(recipe, zoo.architecture["config"].get("kind", "lora"))
    support = int(recipe.get("samples_support", 8))
    cf = zoo.input_spec.condition_features
    embeddings = torch.stack([class_means(zoo.class_samples(m.task, "train"), cf) for m in train])
    loo = leave_one_out(embeddings, zoo.tokens("train"), ridge)
    picked = list(range(0, len(train), stride))
    warm = warm_start(zoo, seed)
    starts = {"warm_start": [warm] * len(picked), "loo_conditional_mean": zoo.layout.detokenize(loo[picked])}
    x = torch.stack([zoo.class_samples(train[i].task, "train")[0][:support] for i in picked])  # (P, support, D)
    test = torch.stack([zoo.class_samples(train[i].task, "test")[0] for i in picked])  # (P, n_test, D)
    scores: dict = {}
    for name, inits in starts.items():
        scores[name] = {(0, 0.0): float(adapter_scores(module, stack_state_dicts(inits), test).mean())}
        for n_steps, lr in itertools.product(steps, lrs):
            with precision_context(tuning["precision"], "cpu"):
                trained = train_adapters(module, inits, x, steps=n_steps, lr=lr, batch_size=tuning["batch_size"], seed=seed)
            scores[name][(n_steps, lr)] = float(adapter_scores(module, trained, test).mean())
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", required=True, help="a causal-lm-adapter zoo (d2nwg zoo build llm-lora)")
    parser.add_argument("--stride", type=int, default=8, help="score every STRIDE-th training task (speed)")
    parser.add_argument("--ridge", type=float, default=0.1, help="the conditional mean's ridge (configs/llm-lora.yaml)")
    args = parser.parse_args()

    from d2nwg.zoo.model_zoo import ModelZoo

    zoo = ModelZoo.open(args.zoo)
    if zoo.architecture.get("name") != "causal-lm-adapter":
        raise SystemExit(f"error: {args.zoo} is not a causal-LM adapter zoo")
    started = time.perf_counter()
    scores = finetune_scores(zoo, args.stride, args.ridge)
    for name, rows in scores.items():
        for (n_steps, lr), loglik in rows.items():
            label = "no fine-tuning" if n_steps == 0 else f"{n_steps:3d} steps at lr {lr:g}"
            print(f"{name:22s} {label:24s} test log-likelihood {loglik:8.4f}")
        best = max((k for k in rows if k[0]), key=rows.get)
        print(f"{name}: best {best[0]} steps at lr {best[1]:g}")
    tasks = len(range(0, len(zoo.members("train")), args.stride))
    print(f"({tasks} training tasks, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
