#!/usr/bin/env python3
"""Times Stable Diffusion's VAE decoder in PyTorch + diffusers on the CPU, beside
`cargo run --release -p models-vae --example vae_split -- 1 SIDE THREADS` (its `decode` line on
stderr is the decode alone; not run by CI).

The configuration of `stabilityai/sd-vae-ft-mse` (the one the example embeds), diffusers'
random init (seeded), float32, batch 1, a `SIDE x SIDE` latent of 4 channels (`SIDE · 8`
pixels), `--threads` intra-op threads. Timing does not depend on the weights' values, so
both sides use their own random weights. Prints one line per decode (the first is cold, as
the example's single decode is) and a JSON summary.

    /work/venv-torch/bin/python tools/bench/vae_timing.py --side 64 --threads 1
"""

import argparse
import json
import resource
import time

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repetitions", type=int, default=2)
    a = p.parse_args()
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE).eval()
    z = torch.randn(1, 4, a.side, a.side)
    times = []
    with torch.no_grad():
        for i in range(a.repetitions):
            t = time.perf_counter()
            vae.decode(z).sample
            times.append(time.perf_counter() - t)
            print(f"decode {i}: {times[-1]:.3f} s{' (cold)' if i == 0 else ''}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "pytorch", "side": a.side, "threads": a.threads, "times_s": times,
                      "peak_rss_bytes": rss, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
