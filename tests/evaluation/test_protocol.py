"""Tests of `d2nwg.evaluation.protocol` (the §4 protocol) and `d2nwg.utils.plots` on a tiny digits zoo.

The pipeline is untrained: the tests check the protocol's bookkeeping (which split
selects, which split reports, what the oracle and retrieval are), not its quality.
"""

from __future__ import annotations

import json

import pytest
import torch

from d2nwg.evaluation.baselines import dataset_embedding, retrieve
from d2nwg.evaluation.protocol import FINETUNE_STEPS, SUMMARY_ACCURACIES, default_finetune_steps, evaluate
from d2nwg.targets.architectures import build_model
from d2nwg.targets.population import population_accuracy, stack_state_dicts
from d2nwg.targets.population import paired_accuracy
from d2nwg.utils.plots import plot_training_curves
from d2nwg.zoo.model_zoo import ModelZoo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = (
    *SUMMARY_ACCURACIES,
    "finetune_steps_to_match",
    "vae_recon_ratio",
    "novelty_ratio",
    "sample_seconds_per_task",
    "num_tasks",
    "settings",
)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def zoo(tiny_digits_zoo) -> ModelZoo:
    return tiny_digits_zoo


@pytest.fixture(scope="module")
def tiny_pipeline(make_tiny_pipeline):
    """``tiny_pipeline(zoo)`` -> a fresh untrained pipeline sized for the zoo."""
    return make_tiny_pipeline


@pytest.fixture(scope="module")
def report(zoo, tiny_pipeline, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = evaluate(
        tiny_pipeline(zoo), zoo, out, num_samples=2, num_inference_steps=2, finetune_steps=(1, 2, 5), progress=False
    )
    return result, out


# ----------------------------------------------------------------------------- evaluate
def test_summary_has_every_key_and_valid_accuracies(report):
    result, _ = report
    summary = result["summary"]
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    assert not missing, f"summary lacks {missing}"
    assert summary["num_tasks"] == 3 and len(result["per_task"]) == 3
    for key in SUMMARY_ACCURACIES:
        assert 0.0 <= summary[key] <= 1.0, (key, summary[key])
    for k, acc in result["finetune_curve"].items():
        assert 0.0 <= acc <= 1.0, (k, acc)
    assert summary["settings"]["num_samples"] == 2 and summary["settings"]["num_inference_steps"] == 2
    assert summary["sample_seconds_per_task"] > 0
    assert summary["vae_recon_ratio"] is not None and summary["vae_recon_ratio"] >= 0
    assert summary["novelty_ratio"] is not None and summary["novelty_ratio"] > 0
    match = summary["finetune_steps_to_match"]
    assert match is None or result["finetune_curve"][match] >= summary["generated_best_acc"]
    json.dumps(result)  # JSON-serialisable as returned


def test_per_task_rows_follow_the_protocol(zoo, report):
    result, _ = report
    heldout_tasks = [m.task for m in zoo.members("heldout")]
    train_ids = {m.id for m in zoo.members("train")}
    assert [r["task"] for r in result["per_task"]] == heldout_tasks
    for row in result["per_task"]:
        assert row["classes"] == zoo.tasks[row["task"]]["classes"]
        assert row["retrieval_member"] in train_ids
        assert len(row["generated"]) == 2
        assert row["generated_mean"] == pytest.approx(sum(row["generated"]) / 2)
        assert row["generated_best"] in row["generated"]
        assert set(row["finetune"]) == {1, 2, 5}


def test_oracle_is_the_member_recomputed_on_test(zoo, report):
    result, _ = report
    model = build_model(zoo.architecture)
    for row in result["per_task"]:
        x, y = zoo.task_data(row["task"], "test")
        expected = population_accuracy(model, stack_state_dicts([zoo.load_member(row["oracle_member"])]), x, y)
        assert row["oracle"] == pytest.approx(float(expected[0]))


def test_generated_best_is_selected_on_support(zoo, report, tiny_pipeline):
    """Re-generating with the documented seed reproduces the selection made on support samples."""
    result, _ = report
    pipe = tiny_pipeline(zoo)
    model = build_model(zoo.architecture)
    for i, row in list(enumerate(result["per_task"]))[:1]:  # one task keeps the test fast
        out = pipe(dataset=zoo.class_samples(row["task"], "support"), num_samples=2, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(i))
        stacked = stack_state_dicts(out.weights)
        support = population_accuracy(model, stacked, *zoo.task_data(row["task"], "support"))
        test = population_accuracy(model, stacked, *zoo.task_data(row["task"], "test"))
        assert row["generated"] == pytest.approx(test.tolist())
        assert row["generated_best"] == pytest.approx(float(test[int(support.argmax())]))
        # head-only ablation: the selected set's head (fc1) on the zoo's initial body (fc0)
        init = zoo.init_state()
        best = out.weights[int(support.argmax())]
        ablated = {k: best[k] if k.startswith("fc1.") else init[k] for k in best}
        head_only = population_accuracy(model, stack_state_dicts([ablated]), *zoo.task_data(row["task"], "test"))
        assert row["generated_head_only"] == pytest.approx(float(head_only[0]))


def test_report_files(report):
    result, out = report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["summary"]["num_tasks"] == 3
    assert on_disk["summary"]["oracle_acc"] == pytest.approx(result["summary"]["oracle_acc"])
    markdown = (out / "report.md").read_text()
    assert "| method |" in markdown and "/ oracle" in markdown
    assert "## Unseen classes: 1 task\n" in markdown and "## Unseen order" in markdown
    assert "fine-tune 5 steps from" in markdown.split("## Unseen order")[0]  # the all-tasks table has the curve too
    assert on_disk["summary_by_kind"]["unseen_classes"]["num_tasks"] == 1
    for png in ("accuracy_by_method.png", "finetune_curve.png"):
        assert png in markdown
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_max_tasks_and_bad_arguments(zoo, tiny_pipeline):
    pipe = tiny_pipeline(zoo)
    result = evaluate(pipe, zoo, num_samples=1, num_inference_steps=1, max_tasks=1, finetune_steps=(1,), progress=False)
    assert result["summary"]["num_tasks"] == 2  # one of each kind
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(pipe, zoo, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="max_tasks"):
        evaluate(pipe, zoo, max_tasks=0, progress=False)
    # max_tasks counts per kind: both kinds stay in the report
    kinds = {r["kind"] for r in result["per_task"]}
    assert kinds == {"unseen_order", "unseen_classes"}


# ----------------------------------------------------------------------------- retrieval
def test_retrieval_picks_the_member_whose_task_data_is_identical(zoo, monkeypatch):
    heldout = zoo.members("heldout")[0].task
    train = zoo.members("train")[5]
    # Give the held-out task exactly the classes (and order) of one train task: same support data.
    tasks = {k: dict(v) for k, v in zoo.tasks.items()}
    tasks[heldout]["classes"] = list(tasks[train.task]["classes"])
    monkeypatch.setitem(zoo.manifest, "tasks", tasks)
    assert torch.equal(
        dataset_embedding(zoo.class_samples(heldout, "support")), dataset_embedding(zoo.class_samples(train.task, "support"))
    )
    assert retrieve(zoo, [heldout])[0].id == train.id


def test_retrieval_rejects_an_empty_candidate_set(zoo):
    with pytest.raises(ValueError, match="candidate"):
        retrieve(zoo, [zoo.members("heldout")[0].task], candidates=[])


def test_paired_accuracy_matches_per_model_loop(zoo):
    members = zoo.members()[:4]
    sds = [zoo.load_member(m) for m in members]
    data = [zoo.task_data(m.task, "test") for m in members]
    data[1] = (data[1][0][:-3], data[1][1][:-3])  # a differently shaped dataset runs in its own group
    model = build_model(zoo.architecture)
    expected = []
    for sd, (x, y) in zip(sds, data):
        model.load_state_dict(sd)
        expected.append(float((model(x).argmax(-1) == y).float().mean()))
    assert paired_accuracy(build_model(zoo.architecture), sds, data).tolist() == pytest.approx(expected)
    # A target that asks for smaller vmapped batches (an LM's logits) gets the same figures, one weight set per call.
    import d2nwg.targets.population as population

    sizes = []

    def recording(module, stacked, x, y):
        sizes.append(next(iter(stacked.values())).shape[0])
        return real(module, stacked, x, y)

    real = population.population_accuracy
    small = build_model(zoo.architecture)
    small.eval_batch = 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(population, "population_accuracy", recording)
        assert paired_accuracy(small, sds, data).tolist() == pytest.approx(expected)
    assert sizes == [1] * len(sds)


# ----------------------------------------------------------------------------- training curves
@pytest.mark.parametrize(
    "header,rows",
    [
        ("epoch,step,vae/loss,diffusion/loss", ["0,0,1.5,", "0,1,1.2,", "1,2,,0.9", "1,3,,0.7"]),
        ("epoch,step,vae/loss,diffusion/loss", ["0,0,,", "0,1,,"]),  # NaN-only columns
        ("epoch,step,vae/mse", ["0,0,0.3"]),  # both loss columns missing
        ("epoch,step,vae/loss_step,diffusion/loss_epoch", ["0,0,nan,0.5", "0,1,1.0,0.4"]),
    ],
    ids=["normal", "nan-only", "missing", "suffixed"],
)
def test_plot_training_curves(tmp_path, header, rows):
    csv = tmp_path / "metrics.csv"
    csv.write_text("\n".join([header, *rows]) + "\n")
    png = plot_training_curves(csv, tmp_path / "curves.png")
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_training_curves_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        plot_training_curves(tmp_path / "nope.csv", tmp_path / "curves.png")


def test_default_finetune_steps_stop_at_the_members_own_training(zoo, tiny_pipeline):
    """Fine-tuning for the recipe's member steps is the oracle's own training, so the curve ends there."""
    assert default_finetune_steps({"steps": 40}) == [1, 2, 5, 10, 20, 40]
    assert default_finetune_steps({"steps": 100}) == list(FINETUNE_STEPS)
    assert default_finetune_steps({}) == list(FINETUNE_STEPS)
    steps = zoo.manifest["recipe"]["steps"]
    result = evaluate(tiny_pipeline(zoo), zoo, num_samples=1, num_inference_steps=1, progress=False)
    assert list(result["finetune_curve"]) == default_finetune_steps(zoo.manifest["recipe"])
    # same init, data, optimiser and step count as the members: the last point reproduces the oracle
    assert result["finetune_curve"][steps] == pytest.approx(result["summary"]["oracle_acc"], abs=0.01)


# ----------------------------------------------------------------------------- new baselines, by kind
def _accuracy(sd, x, y) -> float:
    """Plain forward of the digits MLP, written out (independent of the vmapped evaluation code)."""
    h = torch.relu(x @ sd["fc0.weight"].T + sd["fc0.bias"])
    return float(((h @ sd["fc1.weight"].T + sd["fc1.bias"]).argmax(1) == y).float().mean())


def test_ncm_baseline_matches_an_independent_nearest_class_mean(zoo, report):
    result, _ = report
    for row in result["per_task"]:
        support = zoo.class_samples(row["task"], "support")
        means = [s.double().mean(0) for s in support]
        x, y = zoo.task_data(row["task"], "test")
        pred = [min(range(len(means)), key=lambda k: float(((xi.double() - means[k]) ** 2).sum())) for xi in x]
        assert row["ncm"] == pytest.approx(float((torch.tensor(pred) == y).float().mean()))


def test_prototype_baseline_is_the_init_body_with_class_mean_rows(zoo, report):
    result, _ = report
    init = zoo.init_state()
    for row in result["per_task"]:
        support = zoo.class_samples(row["task"], "support")
        feats = [torch.relu(s @ init["fc0.weight"].T + init["fc0.bias"]) for s in support]
        x, y = zoo.task_data(row["task"], "test")
        h = torch.relu(x @ init["fc0.weight"].T + init["fc0.bias"])
        dist = torch.stack([((h - f.mean(0)) ** 2).sum(1) for f in feats], 1)  # nearest class mean in feature space
        assert row["prototype"] == pytest.approx(float((dist.argmin(1) == y).float().mean()), abs=1e-6)


def test_lda_baselines_put_an_lda_head_on_the_init_and_zoo_mean_bodies(zoo, report):
    from d2nwg.targets.heads import lda_cv_head

    result, _ = report
    train = [zoo.load_member(m) for m in zoo.members("train")]
    bodies = {"lda_init": zoo.init_state(), "lda_zoo_mean": {k: sum(sd[k] for sd in train) / len(train) for k in train[0]}}
    for row in result["per_task"]:
        xs, ys = zoo.task_data(row["task"], "support")
        x, y = zoo.task_data(row["task"], "test")
        for key, body in bodies.items():
            w, b = lda_cv_head(torch.relu(xs @ body["fc0.weight"].T + body["fc0.bias"]), ys, len(row["classes"]))
            expected = _accuracy({**body, "fc1.weight": w, "fc1.bias": b}, x, y)
            assert row[key] == pytest.approx(expected, abs=1e-6), key


def test_knn_ensemble_averages_the_five_nearest_train_members(zoo, report):
    result, _ = report
    train = zoo.members("train")
    emb = {m.id: torch.cat([c.mean(0) for c in zoo.class_samples(m.task, "support")]) for m in train}
    for row in result["per_task"]:
        q = torch.cat([c.mean(0) for c in zoo.class_samples(row["task"], "support")])
        nearest = sorted(train, key=lambda m: float((emb[m.id] - q).norm()))[:5]
        sds = [zoo.load_member(m) for m in nearest]
        mean = {k: sum(sd[k].double() for sd in sds) / len(sds) for k in sds[0]}
        x, y = zoo.task_data(row["task"], "test")
        assert row["knn_ensemble"] == pytest.approx(_accuracy({k: v.float() for k, v in mean.items()}, x, y), abs=1e-6)
        assert nearest[0].id == row["retrieval_member"]


def test_summary_by_kind_splits_the_held_out_tasks(zoo, report):
    result, _ = report
    by_kind = result["summary_by_kind"]
    assert set(by_kind) == {"unseen_order", "unseen_classes"}
    for kind, summary in by_kind.items():
        rows = [r for r in result["per_task"] if r["kind"] == kind]
        assert rows and all(r["kind"] == zoo.task_kind(r["task"]) for r in rows)
        assert summary["num_tasks"] == len(rows)
        for key in ("generated_best", "prototype", "ncm", "knn_ensemble", "oracle"):
            assert summary[f"{key}_acc"] == pytest.approx(sum(r[key] for r in rows) / len(rows))
        bars = max(summary[k] for k in ("prototype_acc", "ncm_acc", "lda_init_acc", "knn_ensemble_acc"))
        assert summary["generated_minus_best_zero_training"] == pytest.approx(summary["generated_best_acc"] - bars)
    # Per class: unseen-class tasks report their unseen classes apart.
    unseen_rows = [r for r in result["per_task"] if r["kind"] == "unseen_classes"]
    assert all(not all(r["class_seen"]) for r in unseen_rows)
    assert by_kind["unseen_classes"]["generated_best_acc_unseen_classes"] is not None
    assert by_kind["unseen_order"]["generated_best_acc_unseen_classes"] is None


def test_baselines_can_be_selected_and_unknown_names_are_listed(zoo, tiny_pipeline):
    pipe = tiny_pipeline(zoo)
    result = evaluate(pipe, zoo, num_samples=1, num_inference_steps=1, max_tasks=1, baselines=["oracle", "ncm"], progress=False)
    row = result["per_task"][0]
    assert "ncm" in row and "oracle" in row and "retrieval" not in row and "finetune" not in row
    assert result["summary"]["retrieval_acc"] is None
    with pytest.raises(ValueError, match="known: .*knn_ensemble"):
        evaluate(pipe, zoo, baselines=["nope"], progress=False)


def test_lda_pipeline_reports_solved_heads_and_the_decoded_head_ablation(zoo, tiny_pipeline):
    pipe = tiny_pipeline(zoo, head_solver="lda")
    result = evaluate(pipe, zoo, num_samples=2, num_inference_steps=2, max_tasks=1, baselines=["oracle"], progress=False)
    assert result["summary"]["settings"]["head_solver"] == "lda"
    model = build_model(zoo.architecture)
    init = zoo.init_state()
    for i, row in enumerate(result["per_task"]):
        out = pipe(dataset=zoo.class_samples(row["task"], "support"), num_samples=2, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(i))
        test = population_accuracy(model, stack_state_dicts(out.weights), *zoo.task_data(row["task"], "test"))
        support = population_accuracy(model, stack_state_dicts(out.weights), *zoo.task_data(row["task"], "support"))
        assert row["generated"] == pytest.approx(test.tolist())
        # the ablation keeps the *decoded* head (not the solved one) on the init body
        decoded = pipe.layout.detokenize(out.tokens)[int(support.argmax())]
        ablated = {k: decoded[k] if k.startswith("fc1.") else init[k] for k in decoded}
        expected = population_accuracy(model, stack_state_dicts([ablated]), *zoo.task_data(row["task"], "test"))
        assert row["generated_head_only"] == pytest.approx(float(expected[0]))
