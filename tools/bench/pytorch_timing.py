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

`--kernels` times, instead of the model, the kernels that `cargo bench -p kernels` times (the
same shapes, names and thread count): self-attention over 1024 tokens, cross-attention to 120
text tokens, the 2048x1152x4608 linear, tanh-GELU, LayerNorm with adaLN modulation, the gated
residual, and SD 1.5 U-Net shapes (level-0 self-attention, two 3x3 convs, GroupNorm). Also
reports peak RSS (`ru_maxrss`) of the process.
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
    p.add_argument("--kernels", action="store_true", help="time the kernels, not the model")
    args = p.parse_args()
    if args.kernels:
        kernels(args)
        return

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
        "peak_rss_bytes": peak_rss(),
    }
    print(json.dumps(summary))


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def kernels(args) -> None:
    """The kernels of `kernels/benches/kernels.rs`, median of `--repetitions` (≥ 10) runs."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    b, t, h, d, text = args.batch, 1024, 16, 72, args.text_tokens
    hidden = h * d
    q = torch.randn(b, t, h, d).transpose(1, 2)
    k = torch.randn(b, t, h, d).transpose(1, 2)
    v = torch.randn(b, t, h, d).transpose(1, 2)
    tk, tv = torch.randn(b, h, text, d), torch.randn(b, h, text, d)
    x, y = torch.randn(b, t, hidden), torch.randn(b, t, hidden)
    wide = torch.randn(b, t, 4 * hidden)
    vec = torch.randn(b, 1, hidden)
    w, bias = torch.randn(4 * hidden, hidden), torch.randn(4 * hidden)
    # SD 1.5 U-Net shapes: level-0 self-attention (4096 tokens, 8 heads x 40), resnet convs at
    # 64x64x320 and 8x8x1280, a 32-group GroupNorm.
    uq, uk, uv = (torch.randn(b, 4096, 8, 40).transpose(1, 2) for _ in range(3))
    map64, w64 = torch.randn(b, 320, 64, 64), torch.randn(320, 320, 3, 3) * 0.02
    map8, w8 = torch.randn(b, 1280, 8, 8), torch.randn(1280, 1280, 3, 3) * 0.01
    cbias, gamma = torch.randn(1280), torch.randn(320)
    cases = {
        "attention_4096tok_8x40": lambda: F.scaled_dot_product_attention(uq, uk, uv).transpose(1, 2).reshape(b, 4096, 320),
        "conv3x3_2x320x64x64": lambda: F.conv2d(map64, w64, cbias[:320], padding=1),
        "conv3x3_2x1280x8x8": lambda: F.conv2d(map8, w8, cbias, padding=1),
        "group_norm_2x320x64x64": lambda: F.group_norm(map64, 32, gamma, gamma, eps=1e-5),
        "attention_1024tok": lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, hidden),
        "cross_attention_1024q_120kv": lambda: F.scaled_dot_product_attention(q, tk, tv),
        "linear_2048x1152x4608": lambda: F.linear(x, w, bias),
        "gelu_tanh_2048x4608": lambda: F.gelu(wide, approximate="tanh"),
        "layer_norm_modulate_2048x1152": lambda: F.layer_norm(x, (hidden,), eps=1e-6) * (1 + vec) + vec,
        "gated_residual_2048x1152": lambda: vec * y + x,
    }
    results = {}
    with torch.inference_mode():
        for name, f in cases.items():
            f()
            times = []
            for _ in range(max(args.repetitions, 10)):
                start = time.perf_counter()
                f()
                times.append(time.perf_counter() - start)
            results[name] = statistics.median(times)
            print(f"{name}/torch/{args.threads}t: {results[name] * 1e3:.2f} ms", flush=True)
    print(json.dumps({"framework": f"torch {torch.__version__}", "threads": args.threads, "median_seconds": results}))


if __name__ == "__main__":
    main()
