"""Steps per second of the default digits training, one process vs 2-process DDP, on this machine's CPUs.

One invocation measures both, one after the other, so the ratio comes from one run on one machine state.
Each setting runs ``configs/digits.yaml`` (64 members per process per step) for ``--vae-steps`` +
``--diffusion-steps`` steps as ``d2nwg train`` does (one fit per stage), in a fresh subprocess; rank 0 times
every optimiser step with a callback. A stage's rate leaves out its first ``WARMUP`` steps (the diffusion
stage's first step also encodes the zoo). Lightning's ddp launcher re-runs this script for rank 1, which is
why the measuring worker is this file itself (``--worker``).

Usage::

    python benchmarks/bench_ddp_speed.py --zoo /tmp/exp/bench-final/zoo [--out bench_ddp_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 5


def worker(args: argparse.Namespace) -> None:
    """Train once with ``args.devices`` CPU processes; rank 0 writes the step times to ``args.result``."""
    import lightning as L

    from d2nwg.training.lightning_cli import make_cli, train_args
    from d2nwg.training.stages import fit_stages

    class StepClock(L.Callback):
        def __init__(self):
            self.times: list[tuple[int, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append((trainer.global_step, time.perf_counter()))

    overrides = [
        f"model.vae_steps={args.vae_steps}", f"model.diffusion_steps={args.diffusion_steps}",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", f"trainer.devices={args.devices}",
        "checkpoint.every_n_train_steps=0",
    ]  # fmt: skip
    cli = make_cli(train_args(str(ROOT / "configs" / "digits.yaml"), args.zoo, overrides), run=False, out=args.run)
    clock = StepClock()
    cli.trainer.callbacks.append(clock)
    start = time.perf_counter()
    fit_stages(cli.trainer, cli.model, cli.datamodule)
    if cli.trainer.is_global_zero:
        Path(args.result).write_text(json.dumps({"times": clock.times, "wall_s": time.perf_counter() - start}))


def rate(times: list[tuple[int, float]], first: int, last: int) -> float:
    """Steps per second between the ends of steps ``first`` and ``last`` (global_step after the step)."""
    at = dict(times)
    return (last - first) / (at[last] - at[first])


def measure(zoo: str, devices: int, vae_steps: int, diffusion_steps: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--worker", "--zoo", zoo, "--devices", str(devices), "--run", f"{tmp}/run",
               "--result", str(result), "--vae-steps", str(vae_steps), "--diffusion-steps", str(diffusion_steps)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        data = json.loads(result.read_text())
    times, total = data["times"], vae_steps + diffusion_steps
    vae = rate(times, WARMUP, vae_steps)
    diffusion = rate(times, vae_steps + WARMUP, total)
    # Both stages' measured steps over the time they took (the boundary checkpoint + zoo encoding left out).
    at = dict(times)
    span = (at[vae_steps] - at[WARMUP]) + (at[total] - at[vae_steps + WARMUP])
    overall = (total - 2 * WARMUP) / span
    return {"devices": devices, "vae_steps_per_s": vae, "diffusion_steps_per_s": diffusion, "steps_per_s": overall,
            "members_per_s": overall * 64 * devices, "wall_s": data["wall_s"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True, help="the default digits zoo (d2nwg zoo build digits)")
    parser.add_argument("--out", default="bench_ddp_speed.json")
    parser.add_argument("--vae-steps", type=int, default=100)
    parser.add_argument("--diffusion-steps", type=int, default=100)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = [measure(args.zoo, devices, args.vae_steps, args.diffusion_steps) for devices in (1, 2)]
    ratio = rows[1]["steps_per_s"] / rows[0]["steps_per_s"]
    for row in rows:
        print(
            f"{row['devices']} process(es): {row['steps_per_s']:.2f} steps/s (VAE {row['vae_steps_per_s']:.2f}, "
            f"diffusion {row['diffusion_steps_per_s']:.2f}), {row['members_per_s']:.0f} members/s, wall {row['wall_s']:.0f}s"
        )
    print(f"2-process DDP / single process: {ratio:.2f}x steps/s, {2 * ratio:.2f}x members/s (64 members per process per step)")
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows, "steps_ratio": ratio}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
