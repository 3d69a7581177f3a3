"""Zoos whose members have BatchNorm / LayerNorm / GroupNorm: buffers end to end (issue 12, item 1).

Members are saved from ``state_dict()`` after training in train mode, so they hold ``running_mean``,
``running_var`` and int64 ``num_batches_tracked``, as users' checkpoints do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.fixtures.norm_models import BNCNN, BNMLP, GNCNN, LNMLP

from d2nwg.commands import main
from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
from d2nwg.targets.population import population_logits, stack_state_dicts, train_population
from d2nwg.utils.io import load_safetensors
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.model_zoo import ModelZoo

SIDE, CLASSES, PER_CLASS = 4, 3, 20


def pixel_blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``CLASSES`` blobs of ``SIDE*SIDE`` features in [0, 1] (pixel-like)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.2, 0.8, size=(CLASSES, SIDE * SIDE))
    x = np.concatenate([np.clip(c + rng.normal(0, 0.1, size=(PER_CLASS, SIDE * SIDE)), 0, 1) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(CLASSES), PER_CLASS)


def train_member(factory, x: torch.Tensor, y: torch.Tensor, seed: int, steps: int = 30) -> dict[str, torch.Tensor]:
    """Plain full-batch Adam in train mode (BatchNorm on batch statistics, running stats updated)."""
    torch.manual_seed(seed)
    model = factory()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_norm_workspace(root: Path, factory, num_datasets: int = 6, heldout: int = 2) -> Path:
    """datasets/d<i>.npz, checkpoints/m<i>.pt (``torch.save`` of a state_dict), mapping.csv (last ``heldout`` held out)."""
    (root / "datasets").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    rows = ["checkpoint,dataset,split"]
    for d in range(num_datasets):
        x, y = pixel_blobs(d)
        np.savez(root / "datasets" / f"d{d}.npz", x=x, y=y)
        torch.save(train_member(factory, torch.tensor(x), torch.tensor(y), seed=d), root / "checkpoints" / f"m{d}.pt")
        rows.append(f"m{d}.pt,d{d},{'heldout' if d >= num_datasets - heldout else 'train'}")
    (root / "mapping.csv").write_text("\n".join(rows) + "\n")
    return root


def ingest_argv(ws: Path, out: Path, arch: str = "tests.fixtures.norm_models:BNCNN", *extra: str) -> list[str]:
    return [
        "zoo", "ingest", "--checkpoints", str(ws / "checkpoints"), "--datasets", str(ws / "datasets"),
        "--mapping", str(ws / "mapping.csv"), "--arch", arch, "--chunk-size", "8", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def bn_workspace(tmp_path_factory) -> Path:
    return write_norm_workspace(tmp_path_factory.mktemp("bn") / "ws", BNCNN)


@pytest.fixture(scope="module")
def bn_zoo(bn_workspace, tmp_path_factory) -> ModelZoo:
    out = tmp_path_factory.mktemp("bnzoo") / "zoo"
    assert main(ingest_argv(bn_workspace, out)) == 0
    return ModelZoo.open(out)


def saved_accuracy(ws: Path, zoo: ModelZoo, member, factory) -> float:
    """Accuracy of the checkpoint file as saved (eval mode, its own running statistics) on the member's test split."""
    name = zoo.manifest["recipe"]["sources"][member.id]
    model = factory()
    model.load_state_dict(torch.load(ws / "checkpoints" / name, weights_only=True))
    x, y = zoo.task_data(member.task, "test")
    with torch.no_grad():
        return float((model.eval()(x).argmax(-1) == y).float().mean())


# ----------------------------------------------------------------------------- layout
def test_layout_generates_float_running_stats_with_positive_variance_and_never_integer_buffers():
    sd = train_member(BNCNN, torch.rand(12, SIDE * SIDE), torch.arange(12) % CLASSES, seed=0, steps=3)
    layout = WeightLayout.from_state_dict(sd, chunk_size=8)
    kinds = {t.name: t.transform for t in layout.tensors}
    assert kinds["bn.running_var"] == "log" and kinds["bn.running_mean"] == "identity"
    assert "bn.num_batches_tracked" not in kinds
    layout.fit_stats([sd])
    restored = layout.detokenize(layout.tokenize(sd, dtype=torch.float64))[0]
    assert torch.allclose(restored["bn.running_var"], sd["bn.running_var"], rtol=1e-6, atol=0)
    # Any decoded tokens (e.g. from an untrained generator) give positive variances.
    wild = layout.detokenize(10 * torch.randn(4, layout.num_tokens, 8))
    assert all((w["bn.running_var"] > 0).all() for w in wild)
    # The transform survives JSON; identity tensors write no key (older readers keep working).
    assert WeightLayout.from_json(layout.to_json()) == layout
    assert "transform" not in json.dumps(layout.to_dict()["tensors"][0])
    with pytest.raises(ValueError, match="negative"):
        layout.validate({**sd, "bn.running_var": -sd["bn.running_var"]})


# ----------------------------------------------------------------------------- functional members
@pytest.mark.parametrize("factory", [BNCNN, BNMLP, LNMLP, GNCNN], ids=lambda f: f.__name__)
def test_population_logits_run_members_in_eval_mode_without_touching_shared_buffers(factory):
    x, y = torch.rand(15, SIDE * SIDE), torch.arange(15) % CLASSES
    members = [train_member(factory, x, y, seed=s, steps=4) for s in range(3)]
    module = factory()  # train mode, fresh buffers: the function-space loss's target is built like this
    before = {k: v.clone() for k, v in module.state_dict().items()}
    layout = WeightLayout.from_state_dict(members[0])
    stacked = stack_state_dicts([{k: m[k] for k in layout.names} for m in members])
    logits = population_logits(module, stacked, x)
    for i, sd in enumerate(members):
        reference = factory()
        reference.load_state_dict(sd)
        with torch.no_grad():
            assert torch.allclose(logits[i], reference.eval()(x), atol=1e-5)
    assert module.training and all(m.training for m in module.modules())  # mode restored
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    # Gradients reach decoded running statistics (the VAE's function-space loss trains them).
    grads = {k: v.clone().requires_grad_(True) for k, v in stacked.items()}
    population_logits(module, grads, x).logsumexp(-1).sum().backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for k, v in grads.items() if "running_var" in k)


def test_train_population_with_batchnorm_matches_per_member_training():
    """Stacked training = each member trained alone in train mode (batch statistics, own running stats)."""
    n, steps = 3, 5
    x = torch.rand(n, 12, SIDE * SIDE)
    y = torch.stack([torch.randperm(12) % CLASSES for _ in range(n)])
    torch.manual_seed(0)
    module = BNCNN()
    init = {k: v.clone() for k, v in module.state_dict().items() if v.is_floating_point()}  # what evaluate passes
    # SGD: Adam would turn the ~0 gradient of the conv bias before BatchNorm into full-size noisy steps.
    optim = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
    trained, curves = train_population(module, init, x, y, steps=steps, **optim, record_at=[0, steps], eval_x=x, eval_y=y)
    assert torch.equal(module.bn.running_var, torch.ones(8))  # the module's own buffers untouched
    for i in range(n):
        ref = BNCNN()
        ref.load_state_dict(init, strict=False)
        opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x[i]), y[i], reduction="none").mean().backward()
            opt.step()
        for k, v in ref.state_dict().items():
            assert torch.allclose(trained[k][i].to(v.dtype), v, atol=1e-4), k
        with torch.no_grad():
            acc = float((ref.eval()(x[i]).argmax(-1) == y[i]).float().mean())
        assert float(curves[steps][i]) == pytest.approx(acc)
    assert int(trained["bn.num_batches_tracked"][0]) == steps


# ----------------------------------------------------------------------------- ingest
def test_ingest_records_each_checkpoints_accuracy_as_saved(bn_workspace, bn_zoo):
    assert {t.name: t.transform for t in bn_zoo.layout.tensors}["bn.running_var"] == "log"
    for member in bn_zoo:
        assert member.metrics["test_acc"] == pytest.approx(saved_accuracy(bn_workspace, bn_zoo, member, BNCNN))
        assert (bn_zoo.load_member(member)["bn.running_var"] > 0).all()


def test_ingest_excluding_running_stats_still_scores_checkpoints_as_saved_and_warns(bn_workspace, bn_zoo, tmp_path, capsys):
    out = tmp_path / "zoo"
    assert main(ingest_argv(bn_workspace, out, "tests.fixtures.norm_models:BNCNN", "--exclude", "*running_*")) == 0
    err = capsys.readouterr().err
    assert "warning: running statistics ['bn.running_mean', 'bn.running_var'] are not in the layout" in err
    zoo = ModelZoo.open(out)
    assert not any("running" in n for n in zoo.layout.names)
    with_stats = {m.id: m.metrics for m in bn_zoo}
    for member in zoo:
        # The same numbers as with the statistics in the layout, not those of fresh (0, 1) statistics.
        assert member.metrics == with_stats[member.id]
        assert member.metrics["test_acc"] == pytest.approx(saved_accuracy(bn_workspace, zoo, member, BNCNN))


@pytest.mark.parametrize("factory", [BNMLP, LNMLP, GNCNN], ids=lambda f: f.__name__)
def test_ingest_other_normalisation_zoos(tmp_path, factory):
    ws = write_norm_workspace(tmp_path / "ws", factory, num_datasets=3, heldout=1)
    assert main(ingest_argv(ws, tmp_path / "zoo", f"tests.fixtures.norm_models:{factory.__name__}")) == 0
    zoo = ModelZoo.open(tmp_path / "zoo")
    if factory is BNMLP:
        assert "1.running_var" in zoo.layout.names and "1.num_batches_tracked" not in zoo.layout.names
    assert not any(t.transform == "log" for t in zoo.layout.tensors if "running_var" not in t.name)
    for member in zoo:
        assert member.metrics["test_acc"] == pytest.approx(saved_accuracy(ws, zoo, member, factory))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_batchnorm_zoo_end_to_end(bn_zoo, bn_workspace, tmp_path, capsys):
    """ingest -> train -> evaluate (fine-tuning baseline included) -> generate: no traceback, positive
    running variances, finite outputs."""
    run, report, gen = tmp_path / "run", tmp_path / "report", tmp_path / "gen"
    tiny = {
        "model.vae_steps": 3, "model.diffusion_steps": 3, "model.vae.hidden_dim": 16, "model.vae.latent_channels": 8,
        "model.encoder.dim": 16, "model.denoiser.dim": 16, "model.denoiser.depth": 1, "data.batch_size": 4,
        "trainer.enable_progress_bar": "false",
    }  # fmt: skip
    sets = [a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]
    assert main(["train", "--zoo", str(bn_zoo.root), "--out", str(run), *sets]) == 0
    assert main([
        "evaluate", "--pipeline", str(run / "pipeline"), "--zoo", str(bn_zoo.root), "--out", str(report),
        "--num-samples", "2", "--steps", "3", "--baselines", "oracle", "retrieval_noise", "finetune",
    ]) == 0  # fmt: skip
    assert main([
        "generate", "--pipeline", str(run / "pipeline"), "--dataset", str(bn_workspace / "datasets" / "d5.npz"),
        "--out", str(gen), "--num-samples", "3", "--steps", "3", "--select", "support",
    ]) == 0  # fmt: skip
    assert "Traceback" not in capsys.readouterr().err
    stats = D2NWGPipeline.from_pretrained(run / "pipeline").target_spec.data_stats
    assert 0.0 <= stats["features"]["min"] < stats["features"]["max"] <= 1.0  # the pixel-like zoo's range
    assert len(stats["embeddings"]) == len(bn_zoo.members("train"))
    rows = json.loads((report / "report.json").read_text())["per_task"]
    saved = {m.id: m.metrics["test_acc"] for m in bn_zoo}
    assert rows and all(r["oracle"] == pytest.approx(saved[r["oracle_member"]]) for r in rows)
    assert all(len(r["finetune"]) > 0 and all(0 <= a <= 1 for a in r["finetune"].values()) for r in rows)
    import d2nwg

    x, _ = np.load(bn_workspace / "datasets" / "d5.npz").values()
    for path in sorted(gen.glob("*.safetensors")):
        weights = load_safetensors(path)
        assert (weights["bn.running_var"] > 0).all(), path.name
        assert all(torch.isfinite(v).all() for v in weights.values()), path.name
    with torch.no_grad():
        assert torch.isfinite(d2nwg.load_model(gen)(torch.tensor(x))).all()
