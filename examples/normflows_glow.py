"""A CInC convolution inside a normflows Glow: every ``GlowBlock``'s 1×1 convolution swapped for
``NormflowsConv(CInCConv2d)``, trained on the bundled digits, then sampled.

    python examples/normflows_glow.py --out /tmp/glow_cinc          # a minute on a laptop CPU (PYTHONPATH=. if
                                                                    # cinc_kernels is not installed)
    python examples/normflows_glow.py --tiny --out /tmp/glow_cinc   # seconds (what the tests run)
"""
import argparse
import os
import sys

import normflows as nf
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _digits import squeezed_digits, unsqueeze  # noqa: E402

from cinc_kernels import CInCConv2d  # noqa: E402
from cinc_kernels.interop import NormflowsConv  # noqa: E402


def build(channels: int, shape, blocks: int, hidden: int) -> nf.NormalizingFlow:
    flows = []
    for _ in range(blocks):
        block = nf.flows.GlowBlock(channels, hidden, split_mode="channel", scale=True, use_lu=False)
        # GlowBlock's flows run coupling → 1×1 → actnorm in normflows' sampling order; the CInC layer takes the 1×1's
        # place, so in the density direction each step is actnorm → CInC → coupling, as in docs/spec.md §4.
        block.flows = torch.nn.ModuleList(
            NormflowsConv(CInCConv2d(channels)) if isinstance(f, nf.flows.Invertible1x1Conv) else f
            for f in block.flows)
        flows.append(block)
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(shape, trainable=False), flows)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (samples.png); created if missing")
    p.add_argument("--tiny", action="store_true", help="a few steps of a small model (for tests)")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    steps = args.steps or (10 if args.tiny else 400)
    data = squeezed_digits(256 if args.tiny else 1500)
    model = build(4, (4, 4, 4), blocks=2 if args.tiny else 6, hidden=16 if args.tiny else 64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dims = data[0].numel()
    losses = []
    for step in range(steps):
        batch = data[torch.randint(len(data), (64,))]
        loss = model.forward_kld(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / dims)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step}: {losses[-1]:.3f} nats per dimension (negative log-likelihood)")
    with torch.no_grad():
        z, _ = model.sample(16)
        x_back = model.forward_and_log_det(model.inverse_and_log_det(data[:8])[0])[0]
    error = (x_back - data[:8]).abs().max().item()
    print(f"round trip through the wavefront inverse: max error {error:.2e}")
    os.makedirs(args.out, exist_ok=True)
    from torchvision.utils import save_image

    path = os.path.join(args.out, "samples.png")
    save_image(unsqueeze(z), path, nrow=4)
    print(f"samples -> {path}")
    return {"losses": losses, "round_trip_error": error, "samples": path}


if __name__ == "__main__":
    main()
