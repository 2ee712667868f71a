"""Train CInC Flow on the bundled digits and sample from it, through the package's command line
(``python -m cinc_kernels.flow``), then load the checkpoint through the Python API and check its reverse pass.

    python examples/train_cinc_flow.py --out /tmp/cinc_digits          # digits-small, a few minutes on 2 CPU cores
    python examples/train_cinc_flow.py --tiny --out /tmp/cinc_digits   # seconds (what the tests run)

The same from a shell:

    python -m cinc_kernels.flow train --preset digits-small --out-dir /tmp/cinc_digits
    python -m cinc_kernels.flow sample --checkpoint /tmp/cinc_digits/checkpoint.pt --n 64
"""
import argparse
import os

import torch

from cinc_kernels.flow.__main__ import main as flow_cli
from cinc_kernels.flow.train import load_model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="a new run folder (checkpoint, metrics, samples/)")
    p.add_argument("--tiny", action="store_true", help="digits-tiny for a few steps (for tests)")
    args = p.parse_args(argv)
    preset, steps = ("digits-tiny", "5") if args.tiny else ("digits-small", "2500")
    train = ["train", "--preset", preset, "--steps", steps, "--out-dir", args.out, "--no-progress",
             "--permutation", "reverse", "--conv-kwargs", '{"parametrization": "contractive"}']
    if args.tiny:
        train += ["--n-samples", "4", "--temperatures", "0.7", "--warmup", "2"]
    if flow_cli(train) != 0:
        raise SystemExit("training failed")
    checkpoint = os.path.join(args.out, "checkpoint.pt")
    if flow_cli(["sample", "--checkpoint", checkpoint, "--n", "16" if args.tiny else "64",
                 "--temperatures", "0.7", "1.0"]) != 0:
        raise SystemExit("sampling failed")

    model, _ = load_model(checkpoint, torch.device("cpu"))
    with torch.no_grad():
        x = model.sample(8, temperature=0.7)
        error = (model.decode(model.encode(x)) - x).abs().max().item()
    print(f"encode → decode of 8 samples: max error {error:.2e}")
    return {"checkpoint": checkpoint, "samples": os.path.join(args.out, "samples"), "round_trip_error": error}


if __name__ == "__main__":
    main()
