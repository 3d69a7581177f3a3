"""`ModelZoo`: the on-disk format for checkpoints trained on many tasks, with their data.

A zoo is a directory::

    manifest.json          architecture, recipe, classes, tasks and members (the index)
    layout.json            the WeightLayout that tokenizes members
    init.safetensors       the shared initialisation (optional; baselines use it)
    data.safetensors       the class pool: per class and split, the samples ["<class>::<split>"]
    members/<id>.safetensors   one checkpoint per member, with str->str metadata

A *task* is an ordered list of class names from the pool: class i has label i.
Every write goes through a temp file and a rename, and a member is only listed in
the manifest after its file is complete, so a killed build leaves a readable zoo
that a rerun completes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from d2nwg.data.labelled import to_xy
from d2nwg.security import check_architecture_spec, check_name
from d2nwg.utils.io import atomic_write_json, load_safetensors, read_json, save_safetensors
from d2nwg.zoo.layout import WeightLayout
from d2nwg.zoo.specs import InputSpec

ZOO_FORMAT = "d2nwg-zoo/1"
SPLITS = ("train", "support", "test")


@dataclass
class Member:
    """One checkpoint of the zoo."""

    id: str
    task: str
    split: str
    seed: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The id names the member's file: from a manifest anyone can write, "../x" must not leave members/.
        check_name(self.id, "member id")

    @property
    def file(self) -> str:
        return f"members/{self.id}.safetensors"


class ModelZoo:
    """A directory of checkpoints of one architecture, each trained on a task, plus the task data.

    Example:
        >>> zoo = ModelZoo.open("runs/zoo")            # doctest: +SKIP
        >>> len(zoo), zoo.layout.num_tokens             # doctest: +SKIP
        >>> tokens = zoo.tokens(split="train")          # [N, T, chunk]  # doctest: +SKIP
    """

    def __init__(self, root: Path, manifest: dict, layout: WeightLayout):
        self.root = Path(root)
        self.manifest = manifest
        self.layout = layout
        for task in manifest["tasks"]:  # task ids name files too (conversations/<task>.<split>.jsonl)
            check_name(task, "task id")
        self._members = {m["id"]: Member(**m) for m in manifest["members"]}
        self._pool: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(
        cls,
        root: str | Path,
        *,
        architecture: Mapping,
        layout: WeightLayout,
        classes: Mapping[str, Mapping[str, torch.Tensor]],
        tasks: Mapping[str, Mapping],
        init_state: Mapping[str, torch.Tensor] | None = None,
        input_spec: InputSpec | Mapping | None = None,
        recipe: Mapping | None = None,
    ) -> ModelZoo:
        """Create a zoo, or reopen it for resuming when it was created with the same recipe.

        Args:
            architecture: ``{"name": ..., "config": {...}}`` (see `d2nwg.targets.architectures`).
            layout: the tokenizer of members (its stats are fitted later with `fit_layout`).
            classes: ``{class_name: {split: samples [n, D]}}`` for every split in ``SPLITS``.
            tasks: ``{task_id: {"classes": [...], "split": "train"|"heldout"}}``.
            init_state: the shared initialisation, if members were trained from one.
            input_spec: how raw user inputs become samples, e.g. ``InputSpec(kind="image", image_size=(8, 8))``
                (a dict is read with `InputSpec.from_dict`; ``None``: plain feature vectors).
            recipe: the build settings, compared on resume.
        """
        root = Path(root)
        recipe = json.loads(json.dumps(dict(recipe or {})))  # normalise tuples etc. for comparison
        if (root / "manifest.json").exists():
            zoo = cls.open(root)
            built = zoo.manifest.get("recipe") or {}
            if built != recipe:
                keys = sorted(k for k in set(built) | set(recipe) if built.get(k, "(unset)") != recipe.get(k, "(unset)"))
                diff = ", ".join(f"{k}: {built.get(k, '(unset)')} there, {recipe.get(k, '(unset)')} now" for k in keys)
                raise ValueError(
                    f"{root} already holds a zoo built with a different recipe ({diff}); choose another --out or delete it"
                )
            return zoo
        input_spec = _input_spec(input_spec)  # validated before anything is written
        for name, splits in classes.items():
            missing = [s for s in SPLITS if s not in splits or len(splits[s]) == 0]
            if missing:
                raise ValueError(f"class '{name}' has no samples for split(s) {missing}")
        for task_id, task in tasks.items():
            unknown = [c for c in task["classes"] if c not in classes]
            if unknown:
                raise ValueError(f"task '{task_id}' uses unknown classes {unknown}")
        root.mkdir(parents=True, exist_ok=True)
        (root / "members").mkdir(exist_ok=True)
        pool = {f"{name}::{split}": splits[split].float() for name, splits in classes.items() for split in SPLITS}
        save_safetensors(root / "data.safetensors", pool)
        if init_state is not None:
            save_safetensors(root / "init.safetensors", init_state)
        layout.save(root / "layout.json")
        manifest = {
            "format": ZOO_FORMAT,
            "architecture": dict(architecture),
            "input": input_spec.to_dict(),
            "recipe": recipe,
            "classes": list(classes),
            "tasks": {k: _task_record(v) for k, v in tasks.items()},
            "members": [],
        }
        # The manifest goes last: its presence marks a zoo whose static files are complete.
        atomic_write_json(root / "manifest.json", manifest)
        return cls(root, manifest, layout)

    @classmethod
    def open(cls, root: str | Path, *, trust_remote_code: bool | None = None) -> ModelZoo:
        """Open an existing zoo; a missing or malformed manifest or layout raises ``ValueError``.

        Args:
            root: the zoo folder.
            trust_remote_code: allow an architecture named as ``"module:callable"`` to be imported (it runs
                that module's code); ``None`` uses the ambient consent (`d2nwg.security.trust_remote_code`,
                what ``--trust-remote-code`` sets).

        Raises:
            d2nwg.security.RemoteCodeError: the manifest names code and consent is missing.
            d2nwg.security.UnsafePathError: a member or task id is not a plain name (``../x``).
            ValueError: no zoo there, or a corrupt, oversized or malformed manifest or layout.
        """
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise ValueError(f"{root} is not a model zoo (no manifest.json)")
        manifest = read_json(path, "zoo manifest")
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        if found != ZOO_FORMAT:
            raise ValueError(f"{path} has format {found!r}, expected {ZOO_FORMAT!r}")
        check_architecture_spec(manifest.get("architecture"), f"zoo {root}", trust_remote_code)
        layout = WeightLayout.load(root / "layout.json")
        try:
            return cls(root, manifest, layout)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"malformed zoo manifest {path}: {type(err).__name__}: {err}") from None

    # ------------------------------------------------------------------ members
    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Member]:
        return iter(self._members.values())

    def __contains__(self, member_id: str) -> bool:
        return member_id in self._members

    def members(self, split: str | None = None) -> list[Member]:
        """Members, optionally only those of tasks in ``split`` (``"train"`` or ``"heldout"``)."""
        return [m for m in self._members.values() if split is None or m.split == split]

    @property
    def architecture(self) -> dict:
        return self.manifest["architecture"]

    @property
    def input_spec(self) -> InputSpec:
        """How raw user inputs become this zoo's samples (old manifests without ``kind`` are inferred)."""
        return InputSpec.from_dict(self.manifest.get("input"))

    @property
    def tasks(self) -> dict[str, dict]:
        return self.manifest["tasks"]

    def train_classes(self) -> set[str]:
        """Every class that at least one training task contains."""
        return {c for t in self.tasks.values() if t["split"] == "train" for c in t["classes"]}

    def task_dataset(self, task: str) -> str | None:
        """The dataset a task's data comes from, where the zoo says: the ``dataset`` that ingest records, or, for
        zoos ingested before that record, the shared ``<dataset>/`` namespace of the task's classes. Recipe zoos
        draw every task from one class pool and record none (None)."""
        record = self.tasks[task]
        if record.get("dataset") is not None:
            return str(record["dataset"])
        if (self.manifest.get("recipe") or {}).get("name") != "ingest":
            return None
        namespaces = {c.split("/", 1)[0] for c in record["classes"] if "/" in c}
        return namespaces.pop() if len(namespaces) == 1 else None

    def split_leaks(self) -> dict[str, list[str]]:
        """Held-out tasks whose dataset a training task also uses: ``{held-out task: [train tasks]}``.

        Scores on such tasks measure a dataset the hyper-model was trained on, not an unseen one.
        Empty for recipe zoos (no dataset records) and for zoos that `d2nwg.ingest.build` builds now.
        """
        train: dict[str, list[str]] = {}
        for task, record in self.tasks.items():
            dataset = self.task_dataset(task) if record["split"] == "train" else None
            if dataset is not None:
                train.setdefault(dataset, []).append(task)
        leaks = {}
        for task, record in self.tasks.items():
            dataset = self.task_dataset(task) if record["split"] != "train" else None
            if dataset in train:
                leaks[task] = train[dataset]
        return leaks

    def split_leak_message(self) -> str | None:
        """One line with the counts when `split_leaks` finds any, else None."""
        leaks = self.split_leaks()
        if not leaks:
            return None
        heldout = sum(1 for t in self.tasks.values() if t["split"] != "train")
        task, shared = next(iter(leaks.items()))
        return (
            f"{len(leaks)} of {heldout} held-out task(s) use a dataset that a train task also uses "
            f"(e.g. '{task}' shares dataset '{self.task_dataset(task)}' with train task '{shared[0]}'), "
            f"{len({self.task_dataset(t) for t in leaks})} dataset(s) in all: their scores are not for unseen "
            "datasets; re-ingest the checkpoints (d2nwg now makes one task per dataset)"
        )

    def task_kind(self, task: str) -> str:
        """``"train"``, or the kind of a held-out task (docs/concepts/evaluation-protocol.md):

        * ``"unseen_classes"``: it contains at least one class that no training task contains,
          the honest test of "a new dataset";
        * ``"unseen_order"``: all of its classes occur in training tasks, only this
          combination and order does not.

        Derived from the task lists alone, so ingested zoos get the same split as recipes. A task record may
        state its ``kind`` instead (generative zoos, where a task is one dataset rather than a class tuple).
        """
        if self.tasks[task]["split"] == "train":
            return "train"
        if "kind" in self.tasks[task]:
            return str(self.tasks[task]["kind"])
        seen = self.train_classes()
        return "unseen_order" if all(c in seen for c in self.tasks[task]["classes"]) else "unseen_classes"

    def add(
        self,
        state_dict: Mapping[str, torch.Tensor],
        task: str,
        metrics: Mapping[str, float] | None = None,
        *,
        seed: int = 0,
        member_id: str | None = None,
        flush: bool = True,
    ) -> Member:
        """Write one member atomically; with ``flush=False`` the manifest is updated by a later `flush`."""
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'")
        member = Member(
            id=member_id or f"{task}-s{seed}",
            task=task,
            split=self.tasks[task]["split"],
            seed=seed,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
        )
        self.layout.validate(state_dict, where=f"member {member.id}")
        metadata = {
            "task": task,
            "classes": self.tasks[task]["classes"],
            "architecture": self.architecture,
            "seed": str(seed),
            "split": member.split,
            "metrics": member.metrics,
        }
        save_safetensors(self.root / member.file, dict(state_dict), metadata)
        self._members[member.id] = member
        if flush:
            self.flush()
        return member

    def flush(self) -> None:
        """Rewrite the manifest with every member added so far."""
        self.manifest["members"] = [asdict(m) for m in self._members.values()]
        atomic_write_json(self.root / "manifest.json", self.manifest)

    def load_member(self, member: Member | str) -> dict[str, torch.Tensor]:
        """A member's state_dict; a corrupt or truncated file raises ``ValueError`` naming it."""
        member = self._members[member] if isinstance(member, str) else member
        return load_safetensors(self.root / member.file)

    def state_dicts(self, split: str | None = None) -> list[dict[str, torch.Tensor]]:
        return [self.load_member(m) for m in self.members(split)]

    def tokens(self, split: str | None = "train", normalize: bool = True) -> torch.Tensor:
        """All members of ``split`` as layout tokens ``[N, T, chunk]``."""
        members = self.members(split)
        if not members:
            raise ValueError(f"the zoo at {self.root} has no members in split {split!r}")
        # One member at a time into one float32 tensor: the peak is the tokens plus one member, not every
        # state_dict plus float64 copies of all of them. `tokenize` works row by row: the same numbers.
        first = self.layout.tokenize(self.load_member(members[0]), normalize=normalize)
        out = torch.empty(len(members), *first.shape[1:], dtype=first.dtype)
        out[0] = first[0]
        for i, member in enumerate(members[1:], start=1):
            out[i] = self.layout.tokenize(self.load_member(member), normalize=normalize)[0]
        return out

    def token_bytes(self, count: int) -> int:
        """Bytes of the float32 tokens ``[count, T, chunk]`` that training reads for ``count`` members."""
        return count * self.layout.num_tokens * self.layout.chunk_size * 4

    def fit_layout(self, split: str = "train", scale: str | None = None) -> WeightLayout:
        """Fit the layout's normalisation on ``split`` members (read one at a time) and save it.

        ``scale``: `WeightLayout.fit_stats`'s (``None`` keeps the layout's, so a refit after alignment or ingest
        normalises as the recipe chose)."""
        self.layout.fit_stats((self.load_member(m) for m in self.members(split)), scale=scale)
        self.layout.save(self.root / "layout.json")
        return self.layout

    def init_state(self) -> dict[str, torch.Tensor] | None:
        path = self.root / "init.safetensors"
        return load_safetensors(path) if path.exists() else None

    # ------------------------------------------------------------------ task data
    def _class_pool(self) -> dict[str, torch.Tensor]:
        if self._pool is None:
            self._pool = load_safetensors(self.root / "data.safetensors")
        return self._pool

    def class_samples(self, task: str, split: str) -> list[torch.Tensor]:
        """Per-class samples of ``task`` in label order: a list of ``[n_c, D]``."""
        if split not in SPLITS:
            raise ValueError(f"unknown data split {split!r}; expected one of {SPLITS}")
        pool = self._class_pool()
        return [pool[f"{c}::{split}"] for c in self.tasks[task]["classes"]]

    def task_data(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [n, D], y [n])`` of ``task`` for ``split``; labels follow the task's class order."""
        return to_xy(self.class_samples(task, split))

    def summary(self) -> dict:
        """Counts, sizes and accuracy statistics (what ``d2nwg zoo info`` prints)."""
        members = self.members()
        # Generative zoos (causal-LM adapters) record the test log-likelihood of the reference responses instead.
        metric = "test_acc" if any("test_acc" in m.metrics for m in members) or not members else "test_loglik"
        accs = torch.tensor([m.metrics.get(metric, float("nan")) for m in members])
        pool = self._class_pool()
        split_sizes = {s: sum(len(pool[f"{c}::{s}"]) for c in self.manifest["classes"]) for s in SPLITS}
        by_split = {s: sum(1 for m in members if m.split == s) for s in sorted({m.split for m in members})}
        task_splits: dict[str, int] = {}
        for t in self.tasks.values():
            task_splits[t["split"]] = task_splits.get(t["split"], 0) + 1
        return {
            "root": str(self.root),
            "architecture": self.architecture,
            "members": len(members),
            "members_by_split": by_split,
            "tasks": len(self.tasks),
            "tasks_by_split": task_splits,
            "classes": len(self.manifest["classes"]),
            "params_per_member": self.layout.num_params,
            "tokens_per_member": self.layout.num_tokens,
            "chunk_size": self.layout.chunk_size,
            # What training reads (float32 tokens); beyond `ZooDataModule`'s memory_limit_mb they stay on disk.
            "token_bytes": self.token_bytes(len(members)),
            "token_bytes_by_split": {s: self.token_bytes(n) for s, n in by_split.items()},
            metric: {
                "mean": float(accs.nanmean()),
                "min": float(accs[~accs.isnan()].min()) if (~accs.isnan()).any() else float("nan"),
                "max": float(accs[~accs.isnan()].max()) if (~accs.isnan()).any() else float("nan"),
            },
            "samples_per_split": split_sizes,
        }


def member_groups(ids: Sequence[str], size: int) -> list[list[str]]:
    """Fixed-size consecutive groups: the unit of batched training and of resuming."""
    return [list(ids[i : i + size]) for i in range(0, len(ids), size)]


def _task_record(task: Mapping) -> dict:
    """A task as the manifest stores it; ``dataset`` (ingested zoos) says which dataset the task's data is, ``kind``
    (generative zoos) which kind of held-out task it is."""
    record = {"classes": list(task["classes"]), "split": task.get("split", "train")}
    if task.get("dataset") is not None:
        record["dataset"] = str(task["dataset"])
    if task.get("kind") is not None:
        record["kind"] = str(task["kind"])
    return record


def _input_spec(spec: InputSpec | Mapping | None) -> InputSpec:
    return spec if isinstance(spec, InputSpec) else InputSpec.from_dict(spec)
