#!/usr/bin/env python3
"""Times one Stable Diffusion 1.5 U-Net forward in PyTorch + diffusers on the CPU, to set
beside the Rust timing of the same weights and inputs (`cargo run --release -p models-unet
--example unet_timing`; not run by CI).

The configuration of stable-diffusion-v1-5's `unet/config.json` (860 M parameters), float32,
a guidance batch of 2, a 64x64 latent (512 px), 77 text tokens of 768 channels, the same
thread count (`torch.set_num_threads`, one inter-op thread).

`--write DIR` first saves the model (diffusers' random init, seeded) and an inputs file
`DIR/inputs.safetensors` (`sample`, `timestep`, `encoder_hidden_states`), so that both
timings run the very same weights; later runs pass `--model DIR`.

    /work/pyenv/bin/python tools/bench/unet_timing.py --write target/bench/models/sd15-unet-seed0
    /work/pyenv/bin/python tools/bench/unet_timing.py --model target/bench/models/sd15-unet-seed0 --threads 1

Prints one line per forward and a JSON summary (median seconds, peak RSS) on the last line.
"""

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", help="save a seeded random SD 1.5 U-Net and inputs here, then time it")
    p.add_argument("--model", help="a U-Net folder written by --write")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repetitions", type=int, default=3)
    args = p.parse_args()

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.write:
        out = Path(args.write)
        torch.manual_seed(0)
        model = UNet2DConditionModel(**SD15).eval()
        model.save_pretrained(out, safe_serialization=True)
        g = torch.Generator().manual_seed(1)
        inputs = {
            "sample": torch.randn(2, 4, 64, 64, generator=g),
            "timestep": torch.tensor([981.0, 981.0]),
            "encoder_hidden_states": torch.randn(2, 77, 768, generator=g),
        }
        save_file(inputs, str(out / "inputs.safetensors"))
        folder = out
    else:
        folder = Path(args.model)
        model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    inputs = load_file(str(folder / "inputs.safetensors"))
    times = []
    with torch.no_grad():
        for i in range(args.warmup + args.repetitions):
            t0 = time.perf_counter()
            model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"])
            dt = time.perf_counter() - t0
            print(f"forward {i}: {dt:.3f} s{' (warmup)' if i < args.warmup else ''}", flush=True)
            if i >= args.warmup:
                times.append(dt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "pytorch", "threads": args.threads, "median_s": statistics.median(times),
                      "times_s": times, "peak_rss_bytes": peak, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
