"""``python -m cinc_kernels.flow train | sample | eval | edit`` (installed as the ``cinc-flow`` command too) — see
``--help`` of each command."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .._checks import Range
from .._cli import ArgumentParser, argument_type, range_type
from ._arguments import add_model_data_arguments, checkpoint_type, device_type, folder_type
from .config import FIELD_RANGES, OPTIMIZERS, TEMPERATURE, TrainConfig, check_name
from .distributed import resolve_device

if TYPE_CHECKING:
    import torch


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    from ..nn import LAYERS
    from .data import DATASETS
    from .layers import COUPLINGS, PERMUTATIONS
    from .model import PRESETS

    defaults = TrainConfig()
    helps = {
        "name": "run name; the output folder defaults to runs/<name>",
        "out_dir": "output folder (checkpoint.pt, config.json, metrics.json, loss.png, samples/)",
        "data": "digits or photos (bundled, no download), mnist, fashion-mnist, cifar10, imagefolder, imagenet32, "
                "imagenet64",
        "data_root": "local folder with the data set's files (never downloaded)",
        "n_bits": "reduce 8-bit data to this many bits (e.g. 5)",
        "image_size": "side length for imagefolder and photos data (a multiple of 2**levels; photos: 32 by default)",
        "preset": "model preset (digits-tiny, digits-small, mnist-small, cifar10-small, cifar10, imagenet32, "
                  "imagenet64); --levels/--steps-per-level/--hidden-channels override it",
        "levels": "override the preset's number of levels",
        "steps_per_level": "override the preset's flow steps per level",
        "hidden_channels": "override the preset's coupling width",
        "conv": "invertible convolution by name (cinc_kernels.nn.LAYERS)",
        "coupling": "quad or affine",
        "backend": "kernel backend of the convolutions",
        "conv_kwargs": "JSON object of extra conv constructor arguments, e.g. '{\"parametrization\": \"contractive\"}'",
        "permutation": "reverse (reverse the channels before each coupling), paper (the authors' step exactly: "
                       "reverse, conv, reverse back), shuffle (a fixed random channel permutation before each "
                       "coupling), none (ablation) or 1x1 (LU 1x1 conv before the conv)",
        "steps": "total optimisation steps",
        "batch_size": "images per step per process",
        "optimizer": "adam or adamax",
        "lr": "learning rate after warm-up",
        "warmup": "linear warm-up steps",
        "grad_clip": "clip the gradient norm to this (inf: no clipping)",
        "eval_every": "test bits/dim every this many steps",
        "sample_every": "sample grids every this many steps",
        "checkpoint_every": "checkpoint every this many steps",
        "temperatures": "sampling temperatures of the grids",
        "n_samples": "images per sample grid",
        "seed": "random seed",
        "device": "auto (cuda:LOCAL_RANK if there is a GPU, else cpu), cpu, cuda, cuda:1, …",
        "num_workers": "DataLoader worker processes",
        "threads": "CPU threads per process (0: PyTorch's default; 1 is fastest for the small presets)",
        "flip": "random horizontal flips of the training images",
        "tensorboard": "also log bits/dim, lr, gradient norm, images/s and sample grids to <out_dir>/tensorboard",
    }
    # What each setting accepts; a setting not listed takes any string.
    kinds: dict[str, dict[str, Any]] = {name: {"type": range_type(rng)} for name, rng in FIELD_RANGES.items()}
    kinds.update({
        "name": {"type": argument_type(check_name, "name")},
        "out_dir": {"type": folder_type},
        "data": {"choices": DATASETS},
        "preset": {"choices": [*PRESETS, "none"]},
        "conv": {"choices": sorted(LAYERS)},
        "coupling": {"choices": COUPLINGS},
        "permutation": {"choices": PERMUTATIONS},
        "optimizer": {"choices": OPTIMIZERS},
        "conv_kwargs": {"type": _json_object, "default": {}},
        "temperatures": {"type": range_type(TEMPERATURE), "nargs": "+"},
        "device": {"type": device_type},
    })
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs: dict[str, Any] = {"default": default, "help": f"{helps[f.name]} (default: {default})"}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name not in kinds and isinstance(default, (int, float)):
            kwargs["type"] = type(default)  # a setting without a range yet still gets its type
        kwargs.update(kinds.get(f.name, {}))
        p.add_argument(flag, **kwargs)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in the output folder from its checkpoint.pt (settings must match)")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete the run already in the output folder and start afresh")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values["temperatures"] = tuple(values["temperatures"])
    if values["preset"] in ("", "none"):
        values["preset"] = None
    cfg = TrainConfig(**values)
    result = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if _rank() == 0:
        print(f"step {result['step']}: test bits/dim {result['test_bpd']:.4f}; wrote {result['out_dir']}/")
    if _is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_initialized()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _keeping_first(batches: Iterator[torch.Tensor], first: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``batches`` passed through, a copy of the first one's first ten images put in ``first`` (a view would keep the
    whole chunk)."""
    for images in batches:
        if not first:
            first.append(images[:10].to("cpu", copy=True))
        yield images


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import atomic_write_text, load_model
    from .plots import grid_scale, sample_batches, save_grid, write_grid

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device, backend=args.backend)
    if model.image_size is None:
        raise ValueError(f"checkpoint {args.checkpoint!r} does not record its model's image size")
    scale = grid_scale(args.n, model.image_size, "--n")
    if scale < max(1, 64 // model.image_size[0]):
        print(f"note: pixels drawn {scale}×{scale} so that a grid of {args.n} images stays viewable",
              file=sys.stderr)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "samples")
    os.makedirs(out_dir, exist_ok=True)
    timings, rows = {}, []
    for t in args.temperatures:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        seconds: list[float] = []
        first: list[torch.Tensor] = []  # the first ten images, for the overview
        chunks = _keeping_first(sample_batches(model, args.n, t, generator, seconds), first)
        path = os.path.join(out_dir, f"sample_T{t:.2f}.png")
        write_grid(chunks, args.n, path, scale=scale)
        timings[f"{t:.2f}"] = sum(seconds)
        rows.append(first[0])
        print(f"T={t:.2f}: {args.n} images in {sum(seconds):.3f} s -> {path}")
    # One overview: a row of (up to) ten images per temperature, same noise in every row.
    overview = os.path.join(out_dir, "sample_temperatures.png")
    save_grid(torch.cat(rows), overview, nrow=rows[0].shape[0], scale=max(1, 64 // model.image_size[0]))
    print(f"rows T={', '.join(f'{t:g}' for t in args.temperatures)} -> {overview}")
    atomic_write_text(json.dumps({"checkpoint": args.checkpoint, "step": ckpt["step"], "n": args.n,
                                   "device": str(device), "seconds": timings}, indent=2) + "\n",
                       os.path.join(out_dir, "sample_times.json"))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .evaluation import data_for_model, evaluate, reconstruction_error

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device, backend=args.backend)
    data = data_for_model(ckpt, data=args.data, data_root=args.data_root, n_bits=args.n_bits,
                          image_size=args.image_size)
    tic = time.perf_counter()
    bpd = evaluate(model, data.test, data.num_levels, batch_size=args.batch_size, device=device, seed=args.seed)
    report = {"checkpoint": args.checkpoint, "step": ckpt["step"], "data": data.name, "test_images": len(data.test),
              "test_bits_per_dim": bpd}
    if args.reconstruction:
        # decode(encode(x)) against x on the same test images: how exactly this checkpoint inverts.
        report["reconstruction"] = reconstruction_error(model, data.test, data.num_levels,
                                                        batch_size=args.batch_size, device=device, seed=args.seed)
    report["seconds"] = round(time.perf_counter() - tic, 3)
    print(json.dumps(report))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .. import __version__
    from .plots import SAMPLE_CHUNK
    from .train import RunInterrupted

    count, seed = range_type(Range(int, 1)), range_type(FIELD_RANGES["seed"])
    threads = range_type(FIELD_RANGES["threads"])
    # Usage lines name the command the user typed: the console script, or the module form.
    prog = "cinc-flow" if os.path.basename(sys.argv[0]) == "cinc-flow" else "python -m cinc_kernels.flow"
    parser = ArgumentParser(prog=prog, description="Train, sample and evaluate CInC Flow models.")
    parser.add_argument("--version", action="version", version=f"cinc_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a flow (DDP under torchrun)",
                       description="Train a flow; under torchrun every process takes part (DDP).")
    _add_train_arguments(p)
    p.set_defaults(func=_cmd_train)

    checkpoint, device = checkpoint_type, device_type
    p = sub.add_parser("sample", help="sample grids at several temperatures from a checkpoint")
    p.add_argument("--checkpoint", required=True, type=checkpoint, help="a checkpoint.pt written by train")
    p.add_argument("--n", type=count, default=64,
                   help=f"images per grid (default 64), drawn {SAMPLE_CHUNK} at a time: memory does not grow with --n")
    p.add_argument("--temperatures", type=range_type(TEMPERATURE), nargs="+", default=[0.5, 0.7, 0.85, 1.0])
    p.add_argument("--out", default=None, type=folder_type,
                   help="output folder (default: samples/ beside the checkpoint)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", type=device)
    p.add_argument("--backend", default=None, help="override the convolutions' kernel backend")
    p.add_argument("--threads", type=threads, default=1, help="CPU threads (0: PyTorch's default)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="test bits/dim of a checkpoint (and, with --reconstruction, its round trip)")
    p.add_argument("--checkpoint", required=True, type=checkpoint)
    add_model_data_arguments(p)
    p.add_argument("--batch-size", type=count, default=256)
    p.add_argument("--seed", type=seed, default=0, help="seed of the dequantisation noise")
    p.add_argument("--device", default="auto", type=device)
    p.add_argument("--backend", default=None)
    p.add_argument("--threads", type=threads, default=1, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--reconstruction", action="store_true",
                   help="also report the round-trip error max|decode(encode(x)) − x| over the test images")
    p.set_defaults(func=_cmd_eval)

    from .edit import add_edit_parser

    add_edit_parser(sub)

    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a mistake already reported on one line
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "threads", 0) > 0:
        import torch

        torch.set_num_threads(args.threads)
    try:
        code: int = args.func(args)
        return code
    except RunInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
