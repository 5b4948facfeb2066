#!/usr/bin/env python3
"""Convert LPIPS (net='alex') weights to safetensors with the `lpips` package's state-dict keys.

LPIPS's AlexNet trunk is torchvision's ImageNet AlexNet (`alexnet-owt-7be5be79.pth`, which
torchvision downloads) and its linear heads are the `lpips` package's `weights/v0.1/alex.pth`;
`harness eval compare --lpips FILE` reads the one safetensors file this script writes from them:
`net.slice1.0.weight` … `net.slice5.10.bias` (torchvision's `features.{0,3,6,8,10}`) and
`lin0.model.1.weight` … `lin4.model.1.weight`.

Usage: python tools/fid/convert_lpips.py alexnet-owt-7be5be79.pth lpips_alex.safetensors [alex.pth]

The third argument defaults to the installed `lpips` package's alex.pth. Needs torch and safetensors.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SLICES = {0: "net.slice1.0", 3: "net.slice2.3", 6: "net.slice3.6", 8: "net.slice4.8", 10: "net.slice5.10"}


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    trunk = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
    if len(sys.argv) == 4:
        lin_path = sys.argv[3]
    else:
        import lpips

        lin_path = str(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth")
    lins = torch.load(lin_path, map_location="cpu", weights_only=True)
    out = {}
    for i, key in SLICES.items():
        for part in ("weight", "bias"):
            src = f"features.{i}.{part}"
            if src not in trunk:
                sys.exit(f"{sys.argv[1]}: no `{src}`; this is not torchvision's AlexNet state dict")
            out[f"{key}.{part}"] = trunk[src].contiguous()
    for k in range(5):
        src = f"lin{k}.model.1.weight"
        if src not in lins:
            sys.exit(f"{lin_path}: no `{src}`; this is not lpips' v0.1 alex.pth")
        out[src] = lins[src].contiguous()
    save_file(out, sys.argv[2], metadata={"what": "LPIPS v0.1 net='alex', lpips state-dict keys"})
    print(f"{sys.argv[2]}: {len(out)} tensors")


if __name__ == "__main__":
    main()
