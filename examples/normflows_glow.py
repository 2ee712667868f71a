"""A CInC convolution inside normflows' multi-scale Glow (``nf.MultiscaleFlow``): every ``GlowBlock``'s 1×1
convolution swapped for ``NormflowsConv(CInCConv2d)``, trained on the bundled 8×8 digits, then sampled at a
temperature.

    python examples/normflows_glow.py --out /tmp/glow_cinc          # PYTHONPATH=. if cinc_kernels is not installed
    python examples/normflows_glow.py --tiny --out /tmp/glow_cinc   # seconds (what the tests run)
"""
import argparse
import os
import sys

import normflows as nf
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _digits import squeezed_digits  # noqa: E402

from cinc_kernels import CInCConv2d  # noqa: E402
from cinc_kernels.interop import NormflowsConv  # noqa: E402


def glow_block(channels: int, hidden: int) -> nf.flows.GlowBlock:
    block = nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True, use_lu=False)
    # GlowBlock runs coupling → 1×1 → actnorm in normflows' sampling order; the CInC layer takes the 1×1's place, so
    # in the density direction each step is actnorm → CInC → coupling, as in docs/spec.md §4.
    block.flows = torch.nn.ModuleList(
        NormflowsConv(CInCConv2d(channels)) if isinstance(f, nf.flows.Invertible1x1Conv) else f for f in block.flows)
    return block


def build(shape, levels: int, steps: int, hidden: int) -> nf.MultiscaleFlow:
    """normflows' Glow layout: level 0 is the deepest (sampling starts there); each level ends with a squeeze in
    the sampling direction, i.e. starts with one in the density direction."""
    C, H, W = shape
    q0, flows, merges = [], [], []
    for i in range(levels):
        channels = C * 2 ** (levels + 1 - i)
        flows.append([glow_block(channels, hidden) for _ in range(steps)] + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (C * 2 ** (levels - i), H // 2 ** (levels - i), W // 2 ** (levels - i))
        else:
            latent = (C * 2 ** (levels + 1), H // 2 ** levels, W // 2 ** levels)
        q0.append(nf.distributions.GlowBase(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (samples.png); created if missing")
    p.add_argument("--tiny", action="store_true", help="a few steps of a small model (for tests)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps")
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    steps = args.steps or (8 if args.tiny else 500)
    data = torch.nn.functional.pixel_shuffle(squeezed_digits(256 if args.tiny else 1500), 2)  # (n, 1, 8, 8)
    model = build((1, 8, 8), levels=2, steps=1 if args.tiny else 4, hidden=16 if args.tiny else 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dims = data[0].numel()
    losses = []
    for step in range(steps):
        loss = model.forward_kld(data[torch.randint(len(data), (64,))]) / dims
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step}: {losses[-1]:.3f} nats per dimension (negative log-likelihood)")
    with torch.no_grad():
        x, _ = model.sample(16, temperature=args.temperature)
        z, _ = model.inverse_and_log_det(data[:8])
        error = (model.forward_and_log_det(z)[0] - data[:8]).abs().max().item()
    print(f"round trip through the wavefront inverse: max error {error:.2e}")
    os.makedirs(args.out, exist_ok=True)
    from torchvision.utils import save_image

    path = os.path.join(args.out, "samples.png")
    save_image((x + 0.5).clamp(0, 1), path, nrow=4)
    print(f"samples (T={args.temperature}) -> {path}")
    return {"losses": losses, "round_trip_error": error, "samples": path}


if __name__ == "__main__":
    main()
