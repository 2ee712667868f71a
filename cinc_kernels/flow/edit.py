"""Latent attribute editing (the CInC paper's interpretability experiment, after Glow's).

From labelled images compute one direction per attribute in the flow's latent space, then move an image along it:
``x(α) = decode(encode(x) + α · v)``. Two ways to get ``v`` from the flattened latents ``Z`` ``(N, D)`` and the
attributes ``A`` ``(N, K)``:

- ``"correlation"`` (the paper's): standardise every latent dimension and every attribute over the ``N`` images,
  take their correlation ``c_k = Ã[:, k]ᵀ Z̃ / N`` ``(D,)``, normalise it to unit length and map it back to raw
  latent units: ``v_k = σ_Z ⊙ c_k / ‖c_k‖``. So ``α`` counts standard deviations along the most correlated
  unit direction of the standardised latent space.
- ``"mean-difference"`` (Glow's): ``v_k = mean(z | a_k > t) - mean(z | a_k ≤ t)`` with ``t`` the midpoint of the
  attribute's range; ``α = 1`` moves an image from the average "without" to the average "with".

``python -m cinc_kernels.flow edit --checkpoint runs/digits/checkpoint.pt`` writes one PNG strip per attribute
(rows: images, columns: ``α``); with the digits the attributes are the ten classes.
"""
from __future__ import annotations

import argparse
import csv
import os
from typing import Any, Sequence

import torch

from .._checks import Range
from .._cli import range_type
from ._arguments import add_model_data_arguments, checkpoint_type, device_type, folder_type
from .config import FIELD_RANGES
from .data import ImageData
from .model import CInCFlow, flatten_latents, unflatten_latents

__all__ = ["METHODS", "attribute_directions", "edit_images", "encode_flat", "read_attribute_csv"]

METHODS = ("correlation", "mean-difference")
# α counts standard deviations (correlation) or class-mean distances (mean-difference) along a direction; a hundred
# of either is already far outside anything the flow was trained on.
ALPHA = Range(float, -100.0, 100.0)


def attribute_directions(latents: torch.Tensor, attributes: torch.Tensor, method: str = "correlation",
                         eps: float = 1e-8) -> torch.Tensor:
    """One latent direction per attribute.

    Args:
        latents: ``(N, D)`` flattened latents (:func:`encode_flat`).
        attributes: ``(N, K)`` attribute values (binary ±1 / 0-1 or continuous).
        method: ``"correlation"`` or ``"mean-difference"`` (module docstring).

    Returns:
        ``(K, D)`` directions in raw latent units, computed in float64 and returned in ``latents``' dtype.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if latents.dim() != 2:
        raise ValueError(f"latents must be (N, D), got shape {tuple(latents.shape)}")
    if attributes.dim() == 1:
        attributes = attributes[:, None]
    if attributes.dim() != 2 or attributes.shape[0] != latents.shape[0]:
        raise ValueError(f"attributes must be (N, K) with N = {latents.shape[0]} (the latents' rows), got "
                         f"{tuple(attributes.shape)}")
    if latents.shape[0] < 2:
        raise ValueError("at least 2 images are needed to compute directions")
    z, a = latents.double(), attributes.double()
    if method == "mean-difference":
        out = []
        for k in range(a.shape[1]):
            lo, hi = a[:, k].min(), a[:, k].max()
            positive = a[:, k] > (lo + hi) / 2
            if positive.all() or not positive.any():
                raise ValueError(f"attribute {k} takes a single value over these images: no direction")
            out.append(z[positive].mean(0) - z[~positive].mean(0))
        return torch.stack(out).to(latents.dtype)
    z_std = z.std(0, unbiased=False)
    a_std = a.std(0, unbiased=False)
    constant = (a_std <= eps).nonzero().flatten().tolist()
    if constant:
        raise ValueError(f"attribute(s) {constant} take a single value over these images: no correlation")
    z_tilde = (z - z.mean(0)) / (z_std + eps)
    a_tilde = (a - a.mean(0)) / a_std
    corr = a_tilde.T @ z_tilde / z.shape[0]  # (K, D), entries in [-1, 1]
    unit = corr / corr.norm(dim=1, keepdim=True).clamp_min(eps)
    directions: torch.Tensor = (unit * z_std).to(latents.dtype)
    return directions


@torch.no_grad()
def encode_flat(model: CInCFlow, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Flattened latents ``(N, D)`` of images ``x`` ``(N, C, H, W)`` in ``[0, 1)``, in batches."""
    parts = [flatten_latents(model.encode(x[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(parts)


@torch.no_grad()
def edit_images(model: CInCFlow, x: torch.Tensor, direction: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """Images moved along a latent direction: ``(B, C, H, W)`` → ``(B, len(alphas), C, H, W)``, entry ``[b, j]``
    being ``decode(encode(x[b]) + alphas[j] · direction)``; ``α = 0`` reproduces ``x`` up to float error."""
    shapes = model.latent_shapes(x.shape[-2:])
    flat = flatten_latents(model.encode(x))
    if direction.shape != (flat.shape[1],):
        raise ValueError(f"direction must have shape ({flat.shape[1]},) for these images, got "
                         f"{tuple(direction.shape)}")
    alphas_t = torch.as_tensor(list(alphas), dtype=flat.dtype, device=flat.device)
    moved = flat[:, None, :] + alphas_t[None, :, None] * direction.to(flat)[None, None, :]
    moved = moved.reshape(-1, flat.shape[1])
    images = model.decode(unflatten_latents(moved, shapes))
    return images.reshape(x.shape[0], len(alphas_t), *x.shape[1:])


def read_attribute_csv(path: str) -> tuple[list[str], dict[str, list[float]]]:
    """A CSV of per-image attributes, CelebA style: a header ``image_id,attr1,attr2,…`` and one row per image
    file name with numbers (``-1``/``1``, ``0``/``1`` or continuous). Returns the attribute names and a map from
    file name (base name) to its values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute CSV {path!r} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ValueError(f"attribute CSV {path!r} needs a header (image name, then attribute names) and rows")
    names = [n.strip() for n in rows[0][1:]]
    table = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(names) + 1:
            raise ValueError(f"attribute CSV {path!r} line {line}: {len(row)} fields, the header has "
                             f"{len(names) + 1}")
        try:
            table[os.path.basename(row[0].strip())] = [float(v) for v in row[1:]]
        except ValueError:
            raise ValueError(f"attribute CSV {path!r} line {line}: attribute values must be numbers") from None
    return names, table


def _labelled_images(args: argparse.Namespace, data: ImageData) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(levels (N, C, H, W) uint8, attributes (N, K), names)`` of the training split."""
    dataset = data.train
    if args.attributes is None:
        if data.classes is None:
            raise ValueError("this data set has no class labels; pass --attributes CSV")
        indices = list(range(min(len(dataset), args.n_fit)))
        items = [dataset[i] for i in indices]
        levels = torch.stack([im for im, _ in items])
        labels = torch.tensor([int(lab) for _, lab in items])
        attributes = torch.nn.functional.one_hot(labels, len(data.classes)).double()
        return levels, attributes, [str(c) for c in data.classes]
    names, table = read_attribute_csv(args.attributes)
    path_of = getattr(dataset, "path", None)
    if path_of is None:
        raise ValueError("--attributes needs imagefolder data (attributes are matched by image file name)")
    chosen: list[torch.Tensor] = []
    rows: list[list[float]] = []
    for i in range(len(dataset)):
        key = os.path.basename(path_of(i))
        if key in table:
            chosen.append(dataset[i][0])
            rows.append(table[key])
            if len(rows) >= args.n_fit:
                break
    if len(rows) < 2:
        raise ValueError(f"fewer than 2 training images have a row in {args.attributes!r} (matched by file name)")
    return torch.stack(chosen), torch.tensor(rows, dtype=torch.float64), names


def _cmd_edit(args: argparse.Namespace) -> int:
    from .checkpoint import atomic_save, load_model
    from .distributed import resolve_device
    from .evaluation import data_for_model, eval_noise
    from .plots import save_grid

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device, backend=args.backend)
    data = data_for_model(ckpt, data=args.data, data_root=args.data_root, n_bits=args.n_bits,
                          image_size=args.image_size)
    levels, attributes, names = _labelled_images(args, data)

    def to_input(lv: torch.Tensor, indices: list[int]) -> torch.Tensor:
        # The same fixed per-image dequantisation noise as the test metric, so a rerun edits the same images.
        return ((lv.float() + eval_noise(indices, lv.shape[1:], args.seed)) / data.num_levels).to(device)

    x_fit = to_input(levels, list(range(levels.shape[0])))
    directions = attribute_directions(encode_flat(model, x_fit), attributes.to(device), args.method)
    chosen = args.attribute or names
    unknown = [a for a in chosen if a not in names]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; this data has {names}")
    test_indices = args.images
    bad = [i for i in test_indices if not 0 <= i < len(data.test)]
    if bad:
        raise ValueError(f"--images must be test-set indices in 0…{len(data.test) - 1}, got {bad}")
    x = to_input(torch.stack([data.test[i][0] for i in test_indices]), [10**9 + i for i in test_indices])
    strips = {}
    for name in chosen:
        strips[name] = edit_images(model, x, directions[names.index(name)], args.alphas)
        finite = torch.isfinite(strips[name]).flatten(2).all(dim=2).all(dim=0)
        if not bool(finite.all()):
            too_far = [a for a, ok in zip(args.alphas, finite.tolist()) if not ok]
            raise ValueError(f"--alphas {' '.join(f'{a:g}' for a in too_far)}: moving along {name!r} that far gives "
                             f"non-finite images (the latents leave the range the flow can invert); use smaller "
                             f"--alphas")
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "edits")
    os.makedirs(out_dir, exist_ok=True)
    side = data.shape[1]
    for name in chosen:
        path = os.path.join(out_dir, f"edit_{args.method}_{name}.png")
        save_grid(strips[name].flatten(0, 1), path, nrow=len(args.alphas), scale=max(1, 64 // side))
        print(f"{name}: {len(test_indices)} images × α in {list(args.alphas)} -> {path}")
    atomic_save({"names": names, "method": args.method, "directions": directions.cpu()},
                os.path.join(out_dir, f"directions_{args.method}.pt"))
    return 0


def add_edit_parser(sub: Any) -> None:
    """Register ``edit`` on the ``python -m cinc_kernels.flow`` command line."""
    p = sub.add_parser("edit", help="move images along attribute directions in latent space",
                       description="Compute a latent direction per attribute from labelled training images (class "
                                   "labels, or a CSV of per-image attributes with imagefolder data), then write one "
                                   "PNG strip per attribute: rows are test images, columns are α.")
    p.add_argument("--checkpoint", required=True, type=checkpoint_type, help="a checkpoint.pt written by train")
    add_model_data_arguments(p)
    p.add_argument("--attributes", default=None,
                   help="CSV of per-image attributes (header: image name, attribute names), matched by file name")
    p.add_argument("--attribute", nargs="+", default=None, help="attributes to edit (default: all)")
    p.add_argument("--method", choices=METHODS, default="correlation")
    p.add_argument("--alphas", type=range_type(ALPHA), nargs="+", default=[-2.0, -1.0, 0.0, 1.0, 2.0],
                   help=f"how far to move each image along the direction (each {ALPHA.describe()}; default "
                        f"-2 -1 0 1 2)")
    p.add_argument("--images", type=range_type(Range(int, 0)), nargs="+", default=[0, 1, 2, 3],
                   help="test-set indices to edit")
    p.add_argument("--n-fit", type=range_type(Range(int, 2)), default=5000,
                   help="training images used to compute the directions")
    p.add_argument("--out", default=None, type=folder_type,
                   help="output folder (default: edits/ beside the checkpoint)")
    p.add_argument("--seed", type=range_type(FIELD_RANGES["seed"]), default=0)
    p.add_argument("--device", default="auto", type=device_type)
    p.add_argument("--backend", default=None)
    p.add_argument("--threads", type=range_type(FIELD_RANGES["threads"]), default=1,
                   help="CPU threads (0: PyTorch's default)")
    p.set_defaults(func=_cmd_edit)

