#!/usr/bin/env python3
"""Times one PixArt transformer forward in PyTorch + diffusers on the CPU, to set beside
`harness bench` (not run by CI).

The same configuration as the Rust benchmark: PixArt-XL-2-512x512's architecture (hidden
1152, 16 heads, 28 layers unless told otherwise), float32, a guidance batch of 2, a random
120-token caption of 4096 channels, a 64x64 latent (512 px), and the same thread count
(`torch.set_num_threads`, one inter-op thread).

Weights: pass `--model DIR`, the folder `harness bench` wrote for its preset
(`target/bench/models/PixArt-XL-2-512x512-L28-seed0`), to time the very same weights; without
it the model is built from the config with diffusers' own random init (the time does not
depend on the values).

    /work/pyenv/bin/python tools/bench/pytorch_timing.py --model target/bench/models/... \
        --threads 1 --resolution 512 --repetitions 3

Prints one line per forward and a JSON summary (median seconds per forward) on the last line.
"""

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a diffusers transformer folder (config.json + safetensors)")
    p.add_argument("--layers", type=int, default=28, help="layers when building from the config")
    p.add_argument("--resolution", type=int, default=512, help="image size in pixels (latent = /8)")
    p.add_argument("--batch", type=int, default=2, help="evaluation batch (2 = guidance pair)")
    p.add_argument("--text-tokens", type=int, default=120)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards first")
    p.add_argument("--repetitions", type=int, default=3, help="timed forwards (median reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(args.seed)
    if args.model:
        model = PixArtTransformer2DModel.from_pretrained(args.model, torch_dtype=torch.float32)
    else:
        model = PixArtTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=args.layers,
            cross_attention_dim=1152,
            attention_bias=True,
            sample_size=64,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=4096,
        )
    model.eval()
    latent = args.resolution // 8
    b = args.batch
    x = torch.randn(b, 4, latent, latent)
    t = torch.full((b,), 500.0)
    text = torch.randn(b, args.text_tokens, 4096)
    mask = torch.ones(b, args.text_tokens)
    added = {"resolution": None, "aspect_ratio": None}
    layers = model.config.num_layers
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.repetitions):
            start = time.perf_counter()
            model(
                x,
                encoder_hidden_states=text,
                encoder_attention_mask=mask,
                timestep=t,
                added_cond_kwargs=added,
                return_dict=False,
            )
            elapsed = time.perf_counter() - start
            tag = "warm-up" if i < args.warmup else "timed"
            print(f"{tag} forward {i}: {elapsed:.3f} s", flush=True)
            if i >= args.warmup:
                times.append(elapsed)
    summary = {
        "framework": f"torch {torch.__version__}",
        "layers": layers,
        "resolution": args.resolution,
        "tokens": (latent // 2) ** 2,
        "batch": b,
        "threads": args.threads,
        "forward_seconds": times,
        "median_forward_seconds": statistics.median(times),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
