#!/usr/bin/env python3
"""Convert pytorch-fid's FID Inception weights to safetensors, state-dict keys unchanged.

pytorch-fid downloads `pt_inception-2015-12-05-6726825d.pth` (the 2015 TensorFlow Inception
weights ported to PyTorch) from its GitHub releases; `harness eval fid --inception FILE` reads
the safetensors this script writes from it (our loader does not unpickle `.pth` files).

Usage: python tools/fid/convert_inception.py pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors

Needs torch and safetensors. Refuses a state dict that is not the FID Inception (e.g.
torchvision's ImageNet Inception, whose classifier has 1000 classes, not 1008).
"""

import sys

import torch
from safetensors.torch import save_file


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    sd = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        sys.exit(f"{src}: not a state dict")
    for key in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.conv.weight", "fc.weight"):
        if key not in sd:
            sys.exit(f"{src}: no `{key}`; this is not pytorch-fid's FID Inception state dict")
    if tuple(sd["fc.weight"].shape) != (1008, 2048):
        sys.exit(f"{src}: fc.weight is {tuple(sd['fc.weight'].shape)}, not (1008, 2048): not the FID "
                 "Inception (torchvision's ImageNet Inception has 1000 classes)")
    tensors = {k: v.contiguous() for k, v in sd.items()}
    save_file(tensors, dst, metadata={"source": src.rsplit("/", 1)[-1],
                                      "what": "pytorch-fid FID Inception state dict, keys unchanged"})
    print(f"{dst}: {len(tensors)} tensors, {sum(v.numel() for v in tensors.values()) / 1e6:.1f} M values")


if __name__ == "__main__":
    main()
