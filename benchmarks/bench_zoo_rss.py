"""Peak memory of ``d2nwg train`` as the zoo grows: it should stay flat, since large zoos are read lazily.

For each zoo size (default 250, 1,000 and 4,000 members) it builds a synthetic zoo of the 3.4M-parameter
adapter shape of `bench_adapter_scale` (size ``l``: rank-8 q/v LoRA of Llama-3-8B, 32 layers, 832 tokens of
4096 numbers), stored as fp16 safetensors (6.8 MB a member, 27 GB for 4,000), then runs a few steps of both
stages of ``d2nwg train`` (its LightningCLI and `d2nwg.training.stages.fit_stages`, without the pipeline export) in a
fresh process and reads that process's peak RSS (``os.wait4``). The float32
tokens of these zoos (3.4 GB to 54 GB) exceed ``data.memory_limit_mb``, so the DataModule reads members from
disk (`d2nwg.zoo.streamed_tokens.MemberTokens`); the diffusion stage still holds the zoo's latents in memory
(208 x 32 float32 numbers a member: 27 KB, 0.1 GB for 4,000).

The export is left out because the provenance it records (`d2nwg.training.provenance.zoo_record`: nearest-member
distances over up to 500 reference members, read 256 at a time in float64) holds ~20 GB for 250 members of
this size; that is the export's memory, not training's.

Members are written directly (one safetensors header, then slices of one pool of random fp16 numbers),
without training; the zoos share their member files through hard links. Everything under ``--root`` is
deleted at the end unless ``--keep``.

Usage::

    python benchmarks/bench_zoo_rss.py [--sizes 250 1000 4000] [--root /tmp/h14/rss] [--out bench_zoo_rss.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, LAYERS, V_OUT, RANK = 4096, 32, 1024, 8  # bench_adapter_scale size "l"
CLASSES, FEATURES, SAMPLES, TASKS = 8, 16, 32, 16
TRAIN = {
    "model.vae_steps": 3, "model.diffusion_steps": 2, "model.vae.function_weight": 0, "model.head_solver": "generated",
    "model.vae.latent_channels": 32, "model.vae.merge": 4, "model.vae.hidden_dim": 64, "model.vae.depth": 1,
    "model.encoder.dim": 32, "model.encoder.num_inducing": 4, "model.encoder.depth": 1,
    "model.denoiser.dim": 64, "model.denoiser.depth": 2, "data.batch_size": 4, "data.samples_per_class": 8,
    "trainer.enable_progress_bar": "false", "checkpoint.every_n_train_steps": 0,
}  # fmt: skip
"""A few steps of both stages with the hyper-model widths of bench_adapter_scale (no function-space loss:
the synthetic members have no network to run; the manifest names a placeholder MLP that export reads)."""


def template() -> dict:
    """The adapter's tensors (fp16 zeros) under peft's Llama key names."""
    import torch

    sd = {}
    for i in range(LAYERS):
        for proj, out in (("q_proj", HIDDEN), ("v_proj", V_OUT)):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            sd[f"{key}.lora_A.weight"] = torch.zeros(RANK, HIDDEN, dtype=torch.float16)
            sd[f"{key}.lora_B.weight"] = torch.zeros(out, RANK, dtype=torch.float16)
    return sd


def write_members(pool_dir: Path, count: int) -> tuple[bytes, int]:
    """Write ``count`` member files into ``pool_dir`` (skipping those already there); returns (header, body size)."""
    import torch

    from d2nwg.utils.io import safetensors_bytes

    blob = safetensors_bytes(template())
    header_len = 8 + int.from_bytes(blob[:8], "little")
    header, body = blob[:header_len], len(blob) - header_len
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(body // 2 + 2**20, generator=g) * 0.01).to(torch.float16).numpy().tobytes()
    pool_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = pool_dir / f"m{i}.safetensors"
        if path.exists():
            continue
        offset = 2 * ((i * 7919) % 2**20)  # each member its own slice of the pool
        with open(path.with_suffix(".tmp"), "wb") as f:
            f.write(header)
            f.write(memoryview(pool)[offset : offset + body])
        os.replace(path.with_suffix(".tmp"), path)
    return header, body


def build_zoo(root: Path, pool_dir: Path, count: int) -> Path:
    """A zoo of ``count`` members whose files are hard links into ``pool_dir``."""
    import torch

    from d2nwg.zoo.layout import WeightLayout
    from d2nwg.zoo.model_zoo import Member, ModelZoo

    zoo_dir = root / f"zoo{count}"
    if (zoo_dir / "manifest.json").exists():
        return zoo_dir
    g = torch.Generator().manual_seed(1)
    classes = {f"c{k}": {s: torch.randn(SAMPLES, FEATURES, generator=g) for s in ("train", "support", "test")} for k in range(CLASSES)}
    tasks = {f"t{t}": {"classes": [f"c{(t + j) % CLASSES}" for j in range(4)], "split": "train"} for t in range(TASKS)}
    tasks["h0"] = {"classes": ["c1", "c0", "c3", "c2"], "split": "heldout"}
    layout = WeightLayout.from_state_dict(template(), chunk_size=HIDDEN)
    zoo = ModelZoo.create(
        zoo_dir, architecture={"name": "mlp", "config": {"in_features": FEATURES, "num_classes": 4}}, layout=layout,
        classes=classes, tasks=tasks, recipe={"name": "synthetic-rss", "members": count},
    )  # fmt: skip
    for i in range(count):
        member = Member(id=f"t{i % TASKS}-s{i // TASKS}", task=f"t{i % TASKS}", split="train", seed=i // TASKS)
        os.link(pool_dir / f"m{i}.safetensors", zoo_dir / member.file)
        zoo._members[member.id] = member
    zoo.flush()
    # Normalisation statistics from a few members: as good as all of them for this synthetic data, and quick.
    zoo.layout.fit_stats(zoo.load_member(m) for m in zoo.members()[:8])
    zoo.layout.save(zoo_dir / "layout.json")
    return zoo_dir


def worker(zoo: str, run: str) -> None:
    """What ``d2nwg train`` does (`d2nwg.training.lightning_cli.train`), less the `ExportPipeline` callback."""
    from d2nwg.training.callbacks import ExportPipeline
    from d2nwg.training.lightning_cli import make_cli, train_args
    from d2nwg.training.stages import fit_stages

    overrides = [f"{k}={v}" for k, v in TRAIN.items()] + ["trainer.accelerator=cpu"]
    cli = make_cli(train_args(None, zoo, overrides), run=False, out=run)
    cli.trainer.callbacks[:] = [c for c in cli.trainer.callbacks if not isinstance(c, ExportPipeline)]
    fit_stages(cli.trainer, cli.model, cli.datamodule)
    assert cli.trainer.global_step == TRAIN["model.vae_steps"] + TRAIN["model.diffusion_steps"]


def measure(zoo_dir: Path, run: Path) -> dict:
    """Train on ``zoo_dir`` in a child process; its peak RSS (MiB) and wall time (s)."""
    cmd = [sys.executable, __file__, "--worker", str(zoo_dir), str(run)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr_file = proc.stderr
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss in KiB
    err = stderr_file.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"d2nwg train failed on {zoo_dir}:\n{err[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "train_wall_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000])
    parser.add_argument("--root", default="/tmp/h14/rss", help="scratch folder for the zoos (needs 6.8 MB a member)")
    parser.add_argument("--out", default="bench_zoo_rss.json")
    parser.add_argument("--keep", action="store_true", help="keep the zoos under --root")
    parser.add_argument("--worker", nargs=2, metavar=("ZOO", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    root = Path(args.root)
    rows = []
    try:
        t = time.perf_counter()
        write_members(root / "pool", max(args.sizes))
        print(f"wrote {max(args.sizes)} members in {time.perf_counter() - t:.0f}s", flush=True)
        for count in sorted(args.sizes):
            t = time.perf_counter()
            zoo_dir = build_zoo(root, root / "pool", count)
            built = time.perf_counter() - t
            from d2nwg.zoo.model_zoo import ModelZoo

            info = ModelZoo.open(zoo_dir).summary()
            row = {"members": count, "token_bytes": info["token_bytes"], "params_per_member": info["params_per_member"],
                   "disk_bytes": sum(f.stat().st_size for f in (zoo_dir / "members").iterdir()), "zoo_build_s": built,
                   **measure(zoo_dir, root / f"run{count}")}  # fmt: skip
            rows.append(row)
            print(
                f"{count:>5} members: {row['disk_bytes'] / 1e9:5.1f} GB fp16 on disk, {row['token_bytes'] / 1e9:5.1f} GB of "
                f"float32 tokens -> peak RSS {row['peak_rss_mib']:.0f} MiB (train {row['train_wall_s']:.0f}s)",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0]["peak_rss_mib"]
    for row in rows:
        row["rss_vs_smallest"] = row["peak_rss_mib"] / base
    flat = all(abs(r["rss_vs_smallest"] - 1) <= 0.2 for r in rows)
    ratios = ", ".join(f"{r['rss_vs_smallest']:.2f}" for r in rows)
    print(f"peak RSS within 20% of the smallest zoo's: {flat} (ratios {ratios})")
    Path(args.out).write_text(json.dumps({"shape": "lora-llama3-8b q/v r8 fp16", "train": TRAIN, "rows": rows, "flat": flat}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
