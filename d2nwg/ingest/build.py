"""Build a `ModelZoo` from a user's own checkpoints (``d2nwg zoo ingest``).

Inputs:

* a folder of checkpoints, all of one architecture, at any depth below it:

  - checkpoint files: ``*.safetensors``, or ``*.pt``/``*.pth``/``*.bin`` and Lightning ``*.ckpt`` read with
    ``torch.load(weights_only=True)`` (weights at the top level or under ``state_dict``; optimizer states and
    the like are ignored);
  - *model folders* of population-of-models zoos: ``<model>/checkpoint_<epoch>/checkpoints`` (a
    ``torch.save`` state_dict without a suffix) beside ``<model>/result.json`` (JSON lines of per-epoch
    metrics). The mapping names the model folder (its path below the checkpoint folder, or its bare name
    when that is unique); ``epochs`` (``--epochs``) picks ``last`` (default), ``all`` or the last N epochs,
    each one a member, and each member's metrics gain the numbers of its epoch's ``result.json`` line as
    ``reported_<key>``;

* a folder of datasets (image folders of class subfolders, ``.npz`` with ``x``/``y``
  or ``.csv`` with a label column), read with `d2nwg.data.labelled.load_dataset`;
* a mapping file saying which dataset each checkpoint (or model folder) was trained on, as CSV with
  columns ``checkpoint,dataset[,split][,run]`` or JSON ``{checkpoint: dataset}`` /
  ``{checkpoint: {"dataset": ..., "split": ..., "run": ...}}`` (``group`` may stand for ``run``).

**Tasks are datasets.** Each dataset's samples are split per class into train/support/test; its classes
enter the zoo's class pool as ``"<dataset>/<class>"``, and the dataset becomes one task (its classes in
label order, named by the dataset) whose members are every checkpoint mapped to it: several epochs of one
run, several runs. Label order is the sorted class names, numerically when every name is an integer (so
``.npz`` labels ``0..10`` keep their ids). The held-out choice is made per task, so a dataset is never on both
sides; a ``run``/``group`` value shared by checkpoints of different datasets keeps those datasets on one
side too. The manifest records each task's dataset, which `d2nwg.zoo.model_zoo.ModelZoo.split_leaks` checks.

Every checkpoint is checked before anything is written: it must load, hold every
layout tensor with the right shape and finite values, hold no unexpected tensor
among those the include/exclude globs select, and the model's output width must
equal its dataset's class count. A key prefix shared by every key (``module.``,
``model.``, ``_orig_mod.``) is stripped with a notice when that makes the keys
match; a prefix that stripping does not fix is reported as such. Bad checkpoints are
collected and reported together (`BadCheckpointsError`) unless ``skip_bad`` leaves
them out. The zoo is written into a temp folder and renamed into place, so a failure
leaves no output.

Buffers: float running statistics (BatchNorm ``running_mean``/``running_var``) are
floating tensors, so the layout holds them by default and the hyper-model generates
them (``running_var`` in log space, always positive: `d2nwg.zoo.layout`). Integer buffers
(``num_batches_tracked``) are never in the layout. Member accuracies are those of the
checkpoint as saved: eval mode, with its own running statistics, even when
``--exclude`` leaves them out of the layout (a warning then says that the zoo and
generated models use the architecture's initial statistics).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from d2nwg.ingest.checkpoints import build_target
from d2nwg.ingest.datasets import read_datasets
from d2nwg.ingest.discovery import discover
from d2nwg.ingest.settings import check_new_folder, parse_settings
from d2nwg.ingest.tasks import check_head_size, group_into_tasks, split_tasks
from d2nwg.ingest.validation import validate_checkpoints
from d2nwg.ingest.writing import ingest_recipe, write_zoo
from d2nwg.security import allow_code_name, is_code_name
from d2nwg.zoo.model_zoo import ModelZoo


# ----------------------------------------------------------------------------- ingest
def ingest(
    checkpoints: str | Path,
    datasets: str | Path,
    mapping: str | Path,
    arch: str,
    out: str | Path,
    *,
    warn: Callable[[str], None] | None = None,
    align: bool = False,
    **options,
) -> ModelZoo:
    """Build a zoo at ``out`` from the checkpoints in ``checkpoints`` (see the module docstring).

    Args:
        checkpoints: folder of ``*.safetensors``/``*.pt``/``*.pth``/``*.ckpt``/``*.bin`` state_dicts, or of model
            folders (``<model>/checkpoint_<epoch>/checkpoints`` + ``result.json``), at any depth.
        datasets: folder holding the datasets the mapping names.
        mapping: CSV ``checkpoint,dataset[,split][,run]`` or JSON mapping file (see the module docstring).
        arch: a registered architecture name or ``"module:callable"``; ``arch_config`` its arguments.
        out: the new zoo folder (must not exist or be empty).
        options: the keyword settings of `parse_settings` (one signature for both), described here:
        include, exclude: globs selecting the tensors that make up the layout.
        chunk_size: numbers per weight token.
        heldout_fraction: share of datasets (tasks; runs/groups joined) without a mapped split that are held out.
        split_fractions: per-class train/support/test fractions of every dataset.
        seed: seeds the data splits, the held-out choice and the architecture's initialisation.
        skip_bad: leave bad checkpoints out (reported through ``warn``) instead of raising.
        image_size: ``H,W`` image folders are resized to.
        label_column: label column of ``.csv`` datasets.
        warn: receives one line per warning (skipped or unmapped checkpoints, stripped key prefixes).
        epochs: which epochs of each model folder become members: ``"last"``, ``"all"`` or the last N.
        align: permute every member's hidden units into the basin of one reference member
            (weight matching, `d2nwg.zoo.alignment.align_zoo_dir`; ``alignment.json`` records it), for
            checkpoints trained from different random initialisations.

    Raises:
        BadCheckpointsError: bad checkpoints without ``skip_bad`` (nothing is written).
        ValueError: any other problem with the inputs (nothing is written).

    Example:
        >>> zoo = ingest("ckpts", "data", "map.csv", "mlp", "runs/zoo", arch_config={"hidden": [32]})  # doctest: +SKIP
    """
    warn = warn or (lambda message: None)
    if is_code_name(arch):  # the caller's own builder: consent given by passing it (a zoo read later asks again)
        allow_code_name(arch)
    settings = parse_settings(arch, **options)
    out = check_new_folder(out)
    sources = discover(checkpoints, datasets, mapping, warn, settings.epochs)
    data, input_spec = read_datasets(sources, settings)
    target = build_target(settings)
    good, bad = validate_checkpoints(sources, data, target, settings.skip_bad, warn)
    tasks = group_into_tasks(good)
    task_splits = split_tasks(tasks, settings.heldout_fraction, settings.seed)
    check_head_size(tasks, data)
    recipe = ingest_recipe(settings, sources, tasks, bad)
    if not align:
        return write_zoo(out, tasks, task_splits, data, target, input_spec, recipe)
    # Align as a last transform: written unaligned into a temp sibling, then permuted into ``out``.
    from d2nwg.zoo.alignment import align_zoo_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.unaligned-") as tmp:
        write_zoo(Path(tmp) / "zoo", tasks, task_splits, data, target, input_spec, recipe)
        return align_zoo_dir(Path(tmp) / "zoo", out, seed=settings.seed)
