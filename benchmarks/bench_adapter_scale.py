"""How d2nwg scales with adapter size: rank-8 q_proj/v_proj LoRA zoos up to Llama-3-8B shapes.

For three sizes (the largest is Llama-3-8B: hidden 4096, 32 layers, v_proj out 1024
from 8 KV heads of 128, so 3.4M LoRA numbers per adapter) it builds a synthetic zoo
of random low-rank-ish adapters and measures, on CPU:

- ``train``: tokenize the zoo (fit stats + tokens), VAE-encode a batch, one VAE
  optimiser step and one diffusion optimiser step (dataset encoder + denoiser);
- ``sample``: build a `D2NWGPipeline` and sample one adapter (DDIM).

Each (size, phase) runs in a fresh subprocess so that its peak RSS
(``resource.getrusage``), minus the RSS after imports, is that phase's peak memory.
The token size grows with the hidden width (one token = one row of ``lora_A``), so
the token count and every per-token cost grow linearly with the adapter. Hyper-model
widths are small on purpose: this measures the data path, not a good generator.

Usage::

    python benchmarks/bench_adapter_scale.py [--out bench_adapter_scale.json] [--sizes s m l]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    # name: (hidden, layers, v_proj out) -- l is Llama-3-8B
    "s": (1024, 8, 256),
    "m": (2048, 16, 512),
    "l": (4096, 32, 1024),
}
RANK = 8
MEMBERS = 8  # synthetic zoo size
BATCH = 4  # members per train step
CLASSES, FEATURES, SAMPLES = 4, 16, 8


def rss_mb() -> float:
    """Current resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def lora_state_dict(hidden: int, layers: int, v_out: int, generator) -> dict:
    """A rank-8 q/v LoRA state_dict under peft's Llama key names."""
    import torch

    sd = {}
    for i in range(layers):
        for proj, out in (("q_proj", hidden), ("v_proj", v_out)):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            sd[f"{key}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) / hidden**0.5
            sd[f"{key}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) * 0.01
    return sd


def run_phase(size: str, phase: str) -> dict:
    """One measurement in this process; returns timings (s) and peak memory above the post-import RSS (MiB)."""
    import torch
    from diffusers import DDIMScheduler

    from d2nwg.pipelines.pipeline_d2nwg import D2NWGPipeline
    from d2nwg.training.lightning_module import D2NWGModule, DenoiserSettings, EncoderSettings, VAESettings
    from d2nwg.zoo.layout import WeightLayout

    torch.set_num_threads(1)
    hidden, layers, v_out = SIZES[size]
    base_rss = rss_mb()
    g = torch.Generator().manual_seed(0)
    result: dict = {"size": size, "phase": phase, "hidden": hidden, "layers": layers}

    # The sample phase only needs the layout: its peak must not include building the zoo.
    t = time.perf_counter()
    zoo = [lora_state_dict(hidden, layers, v_out, g) for _ in range(MEMBERS if phase == "train" else 1)]
    layout = WeightLayout.from_state_dict(zoo[0], chunk_size=hidden)
    if phase == "train":
        layout.fit_stats(zoo)
        tokens = layout.tokenize(zoo)  # (N, T, hidden)
        result["tokenize_s"] = time.perf_counter() - t
    result.update(params=layout.num_params, tokens=layout.num_tokens, chunk=hidden)

    module = D2NWGModule(
        vae=VAESettings(latent_channels=32, merge=4, hidden_dim=64, depth=1),
        encoder=EncoderSettings(dim=32, num_inducing=4, depth=1),
        denoiser=DenoiserSettings(dim=64, depth=2),
    )
    module.build(layout.num_tokens, layout.chunk_size, FEATURES, CLASSES)
    class_sets = torch.randn(BATCH, CLASSES, SAMPLES, FEATURES, generator=g)
    if phase == "train":
        mask = layout.padding_mask()
        batch = tokens[:BATCH]
        t = time.perf_counter()
        with torch.no_grad():
            latents, _ = module.vae.encode(batch)
        result["vae_encode_s"] = time.perf_counter() - t

        vae_opt = torch.optim.AdamW(module.vae.parameters(), lr=1e-3)
        t = time.perf_counter()
        module.vae.train()
        module.vae.loss(batch, mask)["loss"].backward()
        vae_opt.step()
        result["vae_step_s"] = time.perf_counter() - t

        diff_opt = torch.optim.AdamW(module.diffusion_parameters(), lr=3e-4)
        t = time.perf_counter()
        module.diffusion_loss(latents, class_sets)["loss"].backward()
        diff_opt.step()
        result["diffusion_step_s"] = time.perf_counter() - t
        result["latent_shape"] = list(latents.shape)
    else:
        del zoo
        vae, encoder, denoiser = module.export_networks()
        target = {"architecture": {"name": "lora-llama"}, "layout": layout.to_dict(), "feature": "identity", "num_classes": CLASSES}
        pipe = D2NWGPipeline(vae, encoder, denoiser, DDIMScheduler(clip_sample=False), target)
        pipe.set_progress_bar_config(disable=True)
        t = time.perf_counter()
        out = pipe(dataset=list(class_sets[0]), num_samples=1, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
        result["sample_s"] = time.perf_counter() - t
        layout.validate(out.weights[0])
        result["sampled_params"] = sum(v.numel() for v in out.weights[0].values())
    # ru_maxrss can lag the resident set on Linux (it read below the starting RSS when this ran first in the
    # test session): a peak is at least the current and the starting RSS.
    result["peak_mb"] = max(peak_mb(), rss_mb(), base_rss) - base_rss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_adapter_scale.json")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--phase", choices=["train", "sample"], help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.sizes[0], args.phase)))
        return

    rows = []
    for size in args.sizes:
        row: dict = {}
        for phase in ("train", "sample"):
            cmd = [sys.executable, __file__, "--phase", phase, "--sizes", size]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            part = json.loads(done.stdout.strip().splitlines()[-1])
            row.update({k: v for k, v in part.items() if k not in ("phase", "peak_mb")})
            row[f"{phase}_peak_mb"] = part["peak_mb"]
        rows.append(row)
        print(
            f"{size}: {row['params'] / 1e6:.2f}M params, {row['tokens']} tokens x {row['chunk']} | "
            f"tokenize {row['tokenize_s']:.2f}s, encode {row['vae_encode_s']:.3f}s, "
            f"VAE step {row['vae_step_s']:.3f}s, diffusion step {row['diffusion_step_s']:.3f}s, "
            f"train peak {row['train_peak_mb']:.0f} MiB | sample {row['sample_s']:.2f}s, peak {row['sample_peak_mb']:.0f} MiB",
            flush=True,
        )
    # Linearity: peak memory per million adapter numbers should stay roughly constant.
    for row in rows:
        row["train_mb_per_mparam"] = row["train_peak_mb"] / (row["params"] / 1e6)
        row["sample_mb_per_mparam"] = row["sample_peak_mb"] / (row["params"] / 1e6)
    Path(args.out).write_text(json.dumps({"rank": RANK, "members": MEMBERS, "batch": BATCH, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
