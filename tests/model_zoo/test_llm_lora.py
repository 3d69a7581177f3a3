"""The llm-lora recipe on a tiny chat Llama: tasks, splits, cached data, trained members, resume."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.llm import write_chat_llama

TINY = dict(
    layers="2,3", r=2, unseen_outputs="long-it", num_new_combination_tasks=2, num_train_tasks=6, num_unseen_output_tasks=4,
    samples_train=8, samples_support=4, samples_test=4, max_length=100, response_window=30,
    steps=15, lr=1e-2, batch_size=8, group_size=4, warm_start_steps=10,
)


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, tiny_llama):
    return write_chat_llama(tmp_path_factory.mktemp("chat_llama") / "model", tiny_llama, seed=5)


@pytest.fixture(scope="module")
def llm_zoo(tmp_path_factory, chat_llama):
    from model_zoo import RECIPES

    out = tmp_path_factory.mktemp("llm_zoo") / "zoo"
    return RECIPES.get("llm-lora")(out, base=chat_llama, **TINY)


def test_date_family_has_at_least_256_tasks_and_unseen_outputs():
    from model_zoo.date_formats import all_tasks, split_tasks

    assert len(all_tasks()) >= 256
    tasks = split_tasks(["long-it", "dmy-space"], 32, None, seed=0)
    train_outputs = {t.split("__")[1] for t, v in tasks.items() if v["split"] == "train"}
    train_inputs = {t.split("__")[0] for t, v in tasks.items() if v["split"] == "train"}
    assert {"long-it", "dmy-space"}.isdisjoint(train_outputs)
    combos = [t for t, v in tasks.items() if v.get("kind") == "new_combination"]
    assert len(combos) == 32
    for t in combos:  # both formats seen in training, the pair never
        source, target = t.split("__")
        assert source in train_inputs and target in train_outputs
    assert all(v.get("kind") == "unseen_output" for t, v in tasks.items() if t.split("__")[1] in {"long-it", "dmy-space"})
    with pytest.raises(ValueError, match="unknown output formats"):
        split_tasks(["long-xx"], 1, None, seed=0)
    # A small zoo keeps every held-out pair's formats among its few training tasks.
    small = split_tasks(["long-it"], 12, 32, seed=0)
    kept = [t.split("__") for t, v in small.items() if v["split"] == "train"]
    combos = [t.split("__") for t, v in small.items() if v.get("kind") == "new_combination"]
    assert len(kept) == 32 and len(combos) == 12
    assert all(a in {p[0] for p in kept} and b in {p[1] for p in kept} for a, b in combos)


def test_unknown_precision_fails_before_any_work(chat_llama, tmp_path):
    from model_zoo import RECIPES

    with pytest.raises(ValueError, match="unknown precision"):
        RECIPES.get("llm-lora")(tmp_path / "zoo", base=chat_llama, **{**TINY, "precision": "fp8"})
    assert not (tmp_path / "zoo").exists()


def test_conversations_have_one_right_answer_and_distinct_dates():
    from model_zoo.date_formats import conversations

    items = conversations("ymd-dash__dmy-slash", 20, seed=1)
    prompts = [c[1]["content"] for c in items]
    assert len(set(prompts)) == 20
    for c in items:
        y, m, d = c[1]["content"].split("-")
        assert c[2]["content"] == f"{d}/{m}/{y}"
    assert conversations("ymd-dash__dmy-slash", 20, seed=1) == items  # seeded


def test_zoo_splits_data_and_trained_members(llm_zoo):
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.evaluate import read_split
    from d2nwg.targets.causal_lm.finetune import adapter_scores
    from d2nwg.targets.population import stack_state_dicts

    kinds = {t: llm_zoo.task_kind(t) for t in llm_zoo.tasks}
    assert sorted(set(kinds.values())) == ["new_combination", "train", "unseen_output"]
    assert len(llm_zoo.members()) == len(llm_zoo.tasks) == 6 + 2 + 4
    assert llm_zoo.input_spec.kind == "generative-text"
    task = next(t for t, k in kinds.items() if k == "unseen_output")
    test = read_split(llm_zoo, task, "test")
    assert len(test) == 4 and test[0][-1]["role"] == "assistant"
    member = next(m for m in llm_zoo.members() if m.task == task)
    assert set(member.metrics) == {"test_loglik"}  # what `zoo info` shows; the evaluation measures the rest
    # Training raised the response log-likelihood of every member above the shared initialisation's (the warm start,
    # which already took what the tasks share, so the member's own gain is smaller than from a random init).
    model = build_model(llm_zoo.architecture)
    init = llm_zoo.init_state()
    # The shared initialisation is the trained warm start: peft initialises LoRA's B to zero.
    assert any(v.abs().sum() > 0 for k, v in init.items() if "lora_B" in k)
    for m in llm_zoo.members("train")[:3]:
        x = llm_zoo.class_samples(m.task, "train")[0]
        before, after = adapter_scores(model, stack_state_dicts([init, llm_zoo.load_member(m)]), x)
        assert float(after) > float(before) + 0.03
        test = adapter_scores(model, stack_state_dicts([llm_zoo.load_member(m)]), llm_zoo.class_samples(m.task, "test")[0])
        assert m.metrics["test_loglik"] == pytest.approx(float(test[0]), abs=1e-5)
    # Tokens carry the task deltas at unit scale: the spread around the element-wise mean, which the VAE removes.
    tokens = llm_zoo.tokens("train").double()
    residual = (tokens - tokens.mean(0)).pow(2).sum((0, 2)) / (llm_zoo.layout.padding_mask().sum(1) * len(tokens))
    per_tensor = torch.zeros(len(llm_zoo.layout.tensors), dtype=torch.float64).index_add_(0, llm_zoo.layout.token_layer, residual)
    per_tensor /= torch.bincount(llm_zoo.layout.token_layer)
    assert ((per_tensor.sqrt() > 2**-0.6) & (per_tensor.sqrt() < 2**0.6)).all(), per_tensor.sqrt()


def test_rebuild_resumes_without_retraining(llm_zoo, chat_llama):
    from model_zoo import RECIPES

    before = {m.id: llm_zoo.load_member(m) for m in llm_zoo.members()}
    again = RECIPES.get("llm-lora")(llm_zoo.root, base=chat_llama, **TINY)
    for m in again.members():
        for k, v in again.load_member(m).items():
            assert torch.equal(v, before[m.id][k])


def test_member_training_fallback_matches_the_recipes_defaults():
    # MEMBER_TRAINING stands in for a recipe (ingested zoos, pipelines exported without provenance): it must say
    # what the recipes really do.
    from dataclasses import asdict

    from d2nwg.targets.causal_lm.finetune import MEMBER_TRAINING
    from model_zoo import RECIPES

    for name, kinds in (("llm-lora", ["lora"]), ("llm-miss", ["miss", "miss-bat"])):
        recipe = asdict(RECIPES.get(name).settings_cls())
        expected = {"steps": recipe["steps"], "lr": recipe["member_lr"] or recipe["lr"], "batch_size": recipe["batch_size"],
                    "precision": recipe["precision"]}  # fmt: skip
        for kind in kinds:
            assert MEMBER_TRAINING[kind] == expected, kind


def test_member_lr_trains_members_apart_from_the_warm_start(llm_zoo, chat_llama, tmp_path):
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.finetune import member_training, train_adapters
    from model_zoo import RECIPES

    # A zoo built before member_lr existed records no such key, so it still resumes (and reopens) unchanged.
    assert "member_lr" not in llm_zoo.manifest["recipe"]
    small = {**TINY, "num_train_tasks": 2, "num_new_combination_tasks": 1, "num_unseen_output_tasks": 1, "steps": 4}
    zoo = RECIPES.get("llm-lora")(tmp_path / "zoo", base=chat_llama, **small, member_lr=0.05)
    assert zoo.manifest["recipe"]["member_lr"] == 0.05 and zoo.manifest["recipe"]["lr"] == TINY["lr"]
    assert member_training(zoo.manifest["recipe"], "lora")["lr"] == 0.05  # what the fine-tuning rows scale
    # Each member is the warm start after `steps` AdamW steps at member_lr, not at the warm start's lr.
    model, init = build_model(zoo.architecture), zoo.init_state()
    member = zoo.members("train")[0]
    x = zoo.class_samples(member.task, "train")[0][None]
    stored = zoo.load_member(member)
    for lr, same in ((0.05, True), (TINY["lr"], False)):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the recipe's precision (bf16-mixed)
            trained = train_adapters(model, init, x, steps=4, lr=lr, batch_size=TINY["batch_size"], seed=0)
        close = all(torch.allclose(trained[k][0], v, atol=1e-5) for k, v in stored.items())
        assert close == same, lr
    with pytest.raises(ValueError, match=r"different recipe \(member_lr: 0.05 there, \(unset\) now\)"):  # named
        RECIPES.get("llm-lora")(tmp_path / "zoo", base=chat_llama, **small)


@pytest.fixture(scope="module")
def llm_pipeline_dir(tmp_path_factory, llm_zoo, make_tiny_pipeline):
    folder = tmp_path_factory.mktemp("llm_pipeline") / "pipeline"
    make_tiny_pipeline(llm_zoo, conditional_mean=True).save_pretrained(folder)
    return folder


def run_cli(argv: list[str]) -> tuple[int, str]:
    import io
    from contextlib import redirect_stdout

    from d2nwg.commands import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def test_evaluate_reports_exact_match_for_every_method_and_kind(llm_zoo, llm_pipeline_dir, tmp_path):
    import json

    from d2nwg.targets.causal_lm.evaluate import METHODS

    code, printed = run_cli([
        "evaluate", "--pipeline", str(llm_pipeline_dir), "--zoo", str(llm_zoo.root), "--out", str(tmp_path / "ev"),
        "--num-samples", "2", "--max-tasks", "1", "--steps", "2", "--k-shot", "2", "--multitask-steps", "5",
        "--max-new-tokens", "12",
    ])  # fmt: skip
    assert code == 0, printed
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert set(report["summary_by_kind"]) == {"new_combination", "unseen_output"}
    for method in METHODS:
        assert 0.0 <= report["summary"][f"{method}_em"] <= 1.0
        assert report["summary"][f"{method}_loglik"] < 0.0
    for row in report["tasks"]:
        # The oracle was trained on the task: its reference responses are likelier than under the bare base.
        assert row["oracle_loglik"] > row["base_loglik"]
        assert row["retrieved"] in llm_zoo.tasks and llm_zoo.tasks[row["retrieved"]]["split"] == "train"
    assert "multitask" in printed and "finetune" in printed and "unseen_output" in printed
    # The fine-tuning rows scale the members' own training (the zoo's recipe): all / half its steps, a fifth of its lr.
    recipe = llm_zoo.manifest["recipe"]
    tuning = report["summary"]["finetune_settings"]
    assert tuning["finetune"]["steps"] == recipe["steps"] and tuning["generated_finetune"]["steps"] == round(recipe["steps"] / 2)
    for settings in tuning.values():
        assert settings["lr"] == pytest.approx(recipe["lr"] / 5) and settings["batch_size"] == recipe["batch_size"]
    # An untrained tiny pipeline: its samples are reported against the zoo's spacing, and trust warnings are lines.
    assert report["summary"]["within_task_spread_ratio"] is None or report["summary"]["within_task_spread_ratio"] >= 0
    assert all(isinstance(w, str) and "\n" not in w for w in report["warnings"])
    assert list((llm_zoo.root / "baselines").glob("multitask-*.safetensors"))  # cached for the next run


def test_generate_writes_a_peft_folder_that_reproduces_the_printed_exact_match(llm_zoo, llm_pipeline_dir, tmp_path):
    import json
    import re

    from peft import AutoPeftModelForCausalLM

    from d2nwg.data.instructions import decode_response, encode_prompts, stop_token_ids
    from d2nwg.targets.adapters.frozen_base import load_tokenizer
    from d2nwg.targets.causal_lm.decoding import exact_match, references
    from d2nwg.targets.causal_lm.evaluate import read_split

    task = next(t for t in llm_zoo.tasks if llm_zoo.task_kind(t) == "unseen_output")
    records = read_split(llm_zoo, task, "support")
    dataset = tmp_path / "task.jsonl"
    # No "system" key: the pipeline gives such records the zoo's own (empty) system message.
    dataset.write_text("".join(json.dumps({"prompt": c[1]["content"], "response": c[2]["content"]}) + "\n" for c in records))
    out = tmp_path / "adapter"
    code, printed = run_cli(["generate", "--pipeline", str(llm_pipeline_dir), "--dataset", str(dataset), "--out", str(out), "--num-samples", "3", "--steps", "2"])
    assert code == 0, printed
    printed_em = float(re.search(r"exact match on the 4 records \(greedy\): ([0-9.]+)", printed).group(1))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == llm_zoo.architecture["config"]["base"]
    model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    tokenizer = load_tokenizer(config["base_model_name_or_path"])
    answers = []
    for ids in encode_prompts(tokenizer, records):
        generated = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=stop_token_ids(tokenizer))
        answers.append(decode_response(tokenizer, generated[0, len(ids):]))
    assert exact_match(answers, references(records)) == pytest.approx(printed_em, abs=1e-4)
    assert len(list((out / "samples").glob("*.safetensors"))) == 3


def test_generate_can_fine_tune_the_chosen_adapter_on_the_records(llm_zoo, llm_pipeline_dir, tmp_path):
    import json

    from d2nwg.targets.causal_lm.decoding import AdapterGenerator, peft_keys
    from d2nwg.targets.causal_lm.evaluate import read_split
    from d2nwg.targets.causal_lm.finetune import MEMBER_TRAINING
    from d2nwg.utils.io import load_safetensors

    task = next(t for t in llm_zoo.tasks if llm_zoo.task_kind(t) == "unseen_output")
    records = read_split(llm_zoo, task, "support")
    dataset = tmp_path / "task.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": c[1]["content"], "response": c[2]["content"]}) + "\n" for c in records))
    runs = {}
    for name, extra in (("plain", []), ("tuned", ["--finetune-steps", "8", "--finetune-lr", "0.01"]), ("default", ["--finetune-steps", "2"])):
        code, printed = run_cli(["generate", "--pipeline", str(llm_pipeline_dir), "--dataset", str(dataset), "--out",
                                 str(tmp_path / name), "--num-samples", "3", "--steps", "2", *extra])  # fmt: skip
        assert code == 0, printed
        runs[name] = json.loads((tmp_path / name / "generation.json").read_text()), printed
    (plain, _), (tuned, printed), (default, _) = runs["plain"], runs["tuned"], runs["default"]
    assert plain["finetune"] is None and tuned["finetune"]["steps"] == 8 and tuned["finetune"]["lr"] == 0.01
    assert "fine-tuned on them for 8 steps at lr 0.01" in printed
    # Without --finetune-lr: a fifth of the members' lr, here the recipes' LoRA default (the pipeline has no provenance).
    assert default["finetune"] == {**MEMBER_TRAINING["lora"], "steps": 2, "lr": pytest.approx(MEMBER_TRAINING["lora"]["lr"] / 5)}
    # The same sample is chosen; the written adapter is that sample moved by training towards the records.
    assert tuned["best"] == plain["best"]
    best = peft_keys(load_safetensors(tmp_path / "tuned" / "samples" / f"sample_{tuned['best']:02d}.safetensors"))
    written = load_safetensors(tmp_path / "tuned" / "adapter_model.safetensors")
    assert written.keys() == best.keys()
    assert not all(torch.allclose(written[k], best[k]) for k in best)
    generator = AdapterGenerator(llm_zoo.architecture)
    generator.set_adapter(best)
    before = sum(generator.response_loglik(records))
    generator.set_adapter(written)
    assert sum(generator.response_loglik(records)) > before


def test_finetune_options_are_refused_where_they_do_not_apply(tiny_digits_zoo, make_tiny_pipeline, llm_pipeline_dir, tmp_path, capsys):
    from d2nwg.commands import main

    make_tiny_pipeline(tiny_digits_zoo).save_pretrained(tmp_path / "p")
    for argv, message in (
        (["generate", "--pipeline", str(tmp_path / "p"), "--dataset", str(tmp_path), "--out", str(tmp_path / "o"), "--finetune-steps", "3"],
         "apply to causal-LM adapter pipelines only"),
        (["evaluate", "--pipeline", str(tmp_path / "p"), "--zoo", str(tiny_digits_zoo.root), "--out", str(tmp_path / "e"), "--finetune-lr", "0.1"],
         "apply to generative (causal-LM adapter) zoos only"),
        (["generate", "--pipeline", str(llm_pipeline_dir), "--dataset", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"), "--finetune-lr", "0.1"],
         "--finetune-lr needs --finetune-steps"),
    ):  # fmt: skip
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err and message in err, err
        assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_bad_jsonl_record_is_one_error_line(llm_pipeline_dir, tmp_path, capsys):
    from d2nwg.commands import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    code = main(["generate", "--pipeline", str(llm_pipeline_dir), "--dataset", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "line 2" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_generate_refuses_a_full_out_and_names_a_too_long_record(llm_pipeline_dir, tmp_path, capsys):
    from d2nwg.commands import main

    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "2001-02-03", "response": "03/02/2001"}\n' * 3)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["generate", "--pipeline", str(llm_pipeline_dir), "--dataset", str(good), "--out", str(full)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "a", "response": "b"}\n' + json_line("x" * 400))
    assert main(["generate", "--pipeline", str(llm_pipeline_dir), "--dataset", str(long), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"record 2 of {long}" in err and "more than max_length=100" in err and "Traceback" not in err


def json_line(prompt: str) -> str:
    import json

    return json.dumps({"prompt": prompt, "response": "y"}) + "\n"


def test_base_option_points_a_causal_lm_pipeline_at_a_moved_base(llm_zoo, llm_pipeline_dir, tmp_path):
    import shutil

    from d2nwg.targets.causal_lm.evaluate import read_split

    moved = shutil.copytree(llm_zoo.architecture["config"]["base"], tmp_path / "moved-base")
    records = read_split(llm_zoo, next(iter(llm_zoo.tasks)), "support")
    dataset = tmp_path / "task.jsonl"
    dataset.write_text("".join(json_line(c[1]["content"]).replace('"y"', f'"{c[2]["content"]}"') for c in records))
    out = tmp_path / "adapter"
    code, printed = run_cli(["generate", "--pipeline", str(llm_pipeline_dir), "--dataset", str(dataset), "--out", str(out),
                             "--base", str(moved), "--num-samples", "2", "--steps", "2"])  # fmt: skip
    assert code == 0, printed
    import json

    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(moved)


def test_ridge_benchmark_scores_every_ridge_on_training_tasks(llm_zoo):
    import importlib.util
    from pathlib import Path

    from d2nwg.models import ConditionalMean
    from d2nwg.models.conditional_mean import RIDGE_GRID, class_means

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ridge.py"
    spec = importlib.util.spec_from_file_location("bench_ridge", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.ridge_scores(llm_zoo, stride=2)  # queried at each left-out task's support records
    # The zoo stores no gradient block for a training task's support records; the benchmark takes it as generation does.
    from d2nwg.targets.architectures import build_model

    module = build_model(llm_zoo.architecture)
    h, task = module.hidden, llm_zoo.members("train")[0].task
    assert not llm_zoo.class_samples(task, "support")[0][:, h : 2 * h].any()
    assert abs(float(bench.support_features(llm_zoo, module, task)[0, h : 2 * h].norm()) - 1) < 1e-4
    assert [r[0] for r in rows] == list(RIDGE_GRID)
    assert all(torch.isfinite(torch.tensor(r[1])) and r[1] < 0 for r in rows)
    assert [r[1] for r in rows] != [r[1] for r in bench.ridge_scores(llm_zoo, stride=2, query="train")]
    rows = bench.ridge_scores(llm_zoo, stride=2, query="train")
    # A member left out of the fit is predicted worse than when it is in it.
    train = llm_zoo.members("train")
    cf = llm_zoo.input_spec.condition_features
    e = torch.stack([class_means(llm_zoo.class_samples(m.task, "train"), cf) for m in train])
    tokens = llm_zoo.tokens("train")
    for ridge, _, loo_error in rows[::4]:
        _, fitted = ConditionalMean.fit(e, tokens, ridge, blocks=llm_zoo.input_spec.condition_blocks)
        assert loo_error > float((fitted - tokens)[::2].pow(2).mean())


def test_finetune_benchmark_scores_both_starts_on_training_tasks(llm_zoo):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_finetune.py"
    spec = importlib.util.spec_from_file_location("bench_finetune", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    scores = bench.finetune_scores(llm_zoo, stride=2, steps=(4,), lrs=(1e-2,))
    assert set(scores) == {"warm_start", "loo_conditional_mean"}
    for rows in scores.values():
        assert set(rows) == {(0, 0.0), (4, 1e-2)} and all(v < 0 for v in rows.values())
        # Training on a task's own records makes its unseen test answers likelier than the start did.
        assert rows[(4, 1e-2)] > rows[(0, 0.0)]


def test_vocab_ceiling_counts_test_answers_whose_words_members_write(llm_zoo, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_vocab_ceiling.py"
    spec = importlib.util.spec_from_file_location("bench_vocab_ceiling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.words("4 ottobre 1957") == {"ottobre"} and bench.words("2023/04/17") == set()
    assert bench.coverage(["4 ottobre 1957", "4 maggio 1957", "04.05.1957"], {"ottobre"}) == 2 / 3
    rows = bench.ceilings(llm_zoo)
    assert sorted(r["task"] for r in rows) == sorted(t for t, r in llm_zoo.tasks.items() if r["split"] != "train")
    assert all(0 <= r[c] <= 1 for r in rows for c in ("support", "train", "zoo"))
    # No training task writes Italian, so some Italian test answer has a word no member writes; the tasks' own
    # training answers hold more of their words than the zoo's do.
    italian = [r for r in rows if r["task"].endswith("__long-it")]
    assert italian and all(r["zoo"] < 1 for r in italian)
    assert sum(r["train"] for r in italian) > sum(r["zoo"] for r in italian)
    numeric = [r for r in rows if not r["task"].split("__")[1].startswith(("long-", "medium-"))]
    assert all(r["zoo"] == r["support"] == 1 for r in numeric)  # numeric outputs have no words
    bench.main(["--zoo", str(llm_zoo.root)])
    printed = capsys.readouterr().out
    assert all(f"| {r['task']} | {r['kind']} |" in printed for r in rows) and "| mean, all (" in printed


def test_zoo_conditions_on_task_gradients_at_its_warm_start(llm_zoo, llm_pipeline_dir):
    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
    from d2nwg.targets.architectures import build_model
    from d2nwg.targets.causal_lm.conditioning import gradient_condition

    model = build_model(llm_zoo.architecture)
    h = model.hidden
    spec = llm_zoo.input_spec
    assert (spec.condition_features, spec.condition_blocks) == (2 * h, 2)
    task = llm_zoo.members("train")[0].task
    heldout = next(t for t, r in llm_zoo.tasks.items() if r["split"] != "train")
    # The block where something reads it: a training task's train records (the fit), a held-out task's support
    # records (what it is generated from).
    for t, split in ((task, "train"), (heldout, "support")):
        x = llm_zoo.class_samples(t, split)[0]
        assert abs(float(x[0, h : 2 * h].norm()) - 1) < 1e-4
        # Stored at the warm start in the recipe's precision (bf16): recomputed in float32 it points the same way.
        again = gradient_condition(model, llm_zoo.init_state(), x)[0, h : 2 * h]
        assert float(again @ x[0, h : 2 * h]) > 0.95
    assert not llm_zoo.class_samples(task, "test")[0][:, h : 2 * h].any()  # nothing conditions on test records
    # Nothing reads these: they are not computed (bench_ridge takes a training task's support block itself).
    assert not llm_zoo.class_samples(task, "support")[0][:, h : 2 * h].any()
    assert not llm_zoo.class_samples(heldout, "train")[0][:, h : 2 * h].any()
    # Tasks pull the warm start apart: their blocks differ.
    blocks = torch.stack([llm_zoo.class_samples(m.task, "train")[0][0, h : 2 * h] for m in llm_zoo.members("train")])
    assert float((blocks @ blocks.T).triu(1).max()) < 0.999
    # The pipeline carries the warm start exactly, for `d2nwg generate` to take a user's gradient at.
    anchor = D2NWGPipeline.from_pretrained(llm_pipeline_dir).anchor_state()
    init = llm_zoo.init_state()
    assert anchor.keys() == init.keys() and all(torch.equal(anchor[k], init[k]) for k in init)


def test_trained_pipeline_keeps_the_zoo_gradient_anchor_and_block_kernel(llm_zoo, tmp_path):
    from pathlib import Path

    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
    from d2nwg.training.lightning_cli import train

    config = Path(__file__).resolve().parents[2] / "configs" / "llm-lora.yaml"
    folder = train(
        tmp_path / "run", str(config), str(llm_zoo.root),
        ["model.vae_steps=2", "model.diffusion_steps=2", "data.batch_size=4", "data.samples_per_class=4", "trainer.default_root_dir=" + str(tmp_path / "run")],
        progress_bar=False,
    )  # fmt: skip
    pipe = D2NWGPipeline.from_pretrained(folder)
    assert pipe.conditional_mean.config.blocks == 2
    anchor, init = pipe.anchor_state(), llm_zoo.init_state()
    assert all(torch.equal(anchor[k], init[k]) for k in init)
    # The regression reproduces a training member's tokens from its own task's conditioning (ridge 0.1: closely).
    member = llm_zoo.members("train")[0]
    prior = pipe.prior_tokens(llm_zoo.class_samples(member.task, "train"))[0]
    tokens = llm_zoo.tokens("train")
    assert float((prior - tokens[0]).pow(2).mean()) < float((tokens.mean(0) - tokens[0]).pow(2).mean())
