"""The one table of evaluation figures: per-task row key, display label and role.

`d2nwg.evaluation.protocol` writes one row per held-out task with these keys; its summary holds
``<key>_acc`` (the mean over tasks). The Markdown report, the plots and the Hub model
card all read labels and order from `METRICS`, so a new baseline appears everywhere
once it is listed here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """One accuracy figure of a held-out task.

    Args:
        key: the per-task row key; the summary key is ``f"{key}_acc"``.
        label: display name in reports, plots and model cards.
        role: ``"reference"`` (the oracle), ``"generated"``, ``"zero-training"`` (no zoo
            training, no gradient step: the bar a generator must clear on new classes),
            ``"memorisation"`` (built from zoo members: the bar of Zeng et al. 2025), or
            ``"ablation"``.
    """

    key: str
    label: str
    role: str

    @property
    def summary_key(self) -> str:
        return f"{self.key}_acc"


METRICS: tuple[Metric, ...] = (
    Metric("oracle", "oracle (trained on the task)", "reference"),
    Metric("generated_best", "generated, best of N on support", "generated"),
    Metric("generated_mean", "generated, mean of N", "generated"),
    Metric("prototype", "prototype head (init body, support class means)", "zero-training"),
    Metric("ncm", "nearest class mean on raw features", "zero-training"),
    Metric("lda_init", "init body + LDA head on support (no zoo)", "zero-training"),
    Metric("knn_ensemble", "k-nearest weight ensemble (mean of k members)", "memorisation"),
    Metric("retrieval", "retrieval (nearest zoo member)", "memorisation"),
    Metric("retrieval_noise", "retrieval + noise (best of N on support)", "memorisation"),
    Metric("zoo_mean", "zoo mean", "memorisation"),
    Metric("init", "initialisation", "memorisation"),
    Metric("lda_zoo_mean", "zoo-mean body + LDA head on support", "ablation"),
    Metric("generated_head_only", "generated head only (rest at init)", "ablation"),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
ZERO_TRAINING_BARS = ("prototype", "ncm", "lda_init", "knn_ensemble")
"""The baselines that ``generated_minus_best_zero_training`` compares against: no gradient step on the task."""
