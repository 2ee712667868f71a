"""A CInC convolution inside a FrEIA INN: ``SequenceINN`` of [ActNorm → ``FrEIAConv`` (CInC) → GLOW coupling]
blocks, trained by maximum likelihood on the bundled digits, then sampled with ``rev=True``.

    python examples/freia_inn.py --out /tmp/freia_cinc          # PYTHONPATH=. if cinc_kernels is not installed
    python examples/freia_inn.py --tiny --out /tmp/freia_cinc   # seconds (what the tests run)
"""
import argparse
import math
import os
import sys

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _digits import squeezed_digits, unsqueeze  # noqa: E402

from cinc_kernels.interop import FrEIAConv  # noqa: E402


def conv_subnet(hidden: int):
    def make(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c_out, 3, padding=1))
        nn.init.zeros_(net[-1].weight)  # each coupling starts as the identity
        nn.init.zeros_(net[-1].bias)
        return net

    return make


def build(shape, blocks: int, hidden: int) -> Ff.SequenceINN:
    inn = Ff.SequenceINN(*shape)
    for _ in range(blocks):
        inn.append(Fm.ActNorm)
        # contractive: the inverse stays accurate at any image size (README, "When can the inverse be trusted?").
        inn.append(FrEIAConv, conv="cinc", parametrization="contractive")
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=conv_subnet(hidden), clamp=2.0)
    return inn


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (samples.png); created if missing")
    p.add_argument("--tiny", action="store_true", help="a few steps of a small model (for tests)")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    steps = args.steps or (10 if args.tiny else 400)
    data = squeezed_digits(256 if args.tiny else 1500)
    inn = build((4, 4, 4), blocks=2 if args.tiny else 6, hidden=16 if args.tiny else 64)
    opt = torch.optim.Adam(inn.parameters(), lr=1e-3)
    dims = data[0].numel()
    losses = []
    for step in range(steps):
        batch = data[torch.randint(len(data), (64,))]
        z, log_jac_det = inn(batch)
        nll = 0.5 * z.pow(2).flatten(1).sum(1) + 0.5 * dims * math.log(2 * math.pi) - log_jac_det
        loss = nll.mean() / dims
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step}: {losses[-1]:.3f} nats per dimension (negative log-likelihood)")
    with torch.no_grad():
        samples, _ = inn(torch.randn(16, *data.shape[1:]), rev=True)
        x_back, _ = inn(inn(data[:8])[0], rev=True)
    error = (x_back - data[:8]).abs().max().item()
    print(f"round trip through the wavefront inverse: max error {error:.2e}")
    os.makedirs(args.out, exist_ok=True)
    from torchvision.utils import save_image

    path = os.path.join(args.out, "samples.png")
    save_image(unsqueeze(samples), path, nrow=4)
    print(f"samples -> {path}")
    return {"losses": losses, "round_trip_error": error, "samples": path}


if __name__ == "__main__":
    main()
