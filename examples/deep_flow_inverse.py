"""Keep a deep flow's inverse accurate: measure each CInC layer's inverse gain ‖M⁻¹‖₂ with ``inverse_gain`` and
compare a stack of free CInC layers with the same stack under ``parametrization="contractive"``.

The free layers here have off-centre taps as large as the centre tap, as a long training run can leave them: their
inverse gain grows exponentially with the image side and float32 reconstructions fail. The contractive ones keep
``Σ_taps ‖L⁻¹W_tap‖₂ ≤ 0.9``, so each gain stays below ``‖L⁻¹‖₂/(1 − 0.9)`` at every size (docs/spec.md §1,
"Conditioning").

    python examples/deep_flow_inverse.py --out /tmp/deep_inverse          # 32×32, 8 layers
    python examples/deep_flow_inverse.py --tiny --out /tmp/deep_inverse   # 12×12, 4 layers (what the tests run)
"""
import argparse
import json
import os
import warnings

import torch

from cinc_kernels import CInCConv2d
from cinc_kernels.conditioning import NonFiniteInverseWarning


def stack(depth: int, channels: int, parametrization: str):
    torch.manual_seed(0)
    layers = [CInCConv2d(channels, parametrization=parametrization) for _ in range(depth)]
    with torch.no_grad():
        for layer in layers:
            free = layer.parametrizations.weight.original if parametrization == "contractive" else layer.weight
            centre = free[:, :, -1, -1].clone()
            free.add_(torch.randn_like(free))  # off-centre taps as large as the centre …
            free[:, :, -1, -1] = centre  # … which stays near the identity
    return layers


def round_trip(layers, x, accumulate=None):
    y = x
    with torch.no_grad():
        for layer in layers:
            y = layer(y)[0]
        for layer in reversed(layers):
            y = layer.inverse(y, accumulate=accumulate)
    return (y - x).abs().max().item() / x.abs().max().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (deep_inverse.json); created if missing")
    p.add_argument("--tiny", action="store_true", help="small sizes (for tests)")
    args = p.parse_args(argv)
    size, depth, channels = (12, 4, 4) if args.tiny else (32, 8, 8)
    x = torch.rand(2, channels, size, size)
    report = {"image_size": size, "depth": depth, "channels": channels}
    for parametrization in ("none", "contractive"):
        layers = stack(depth, channels, parametrization)
        gains = [layer.inverse_gain(size, size) for layer in layers]
        with warnings.catch_warnings():
            # The free stack is expected to overflow; its layers would each warn once.
            warnings.simplefilter("ignore", NonFiniteInverseWarning)
            error32 = round_trip(layers, x)
        report[parametrization] = {"max_inverse_gain": max(gains), "relative_round_trip_error_float32": error32,
                                   "contraction_bound": max(layer.contraction_bound() for layer in layers)}
        print(f"{parametrization:>11}: largest ‖M⁻¹‖₂ ≈ {max(gains):.3g}, float32 round trip error {error32:.2e}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "deep_inverse.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"-> {path}")
    return report


if __name__ == "__main__":
    main()
