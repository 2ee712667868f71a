"""What the flow's sub-commands share on the command line: argparse types for files, folders and devices, and the
options that choose the data a saved model is evaluated or edited on."""
from __future__ import annotations

import argparse
import os

from .._cli import argument_type, range_type
from .config import FIELD_RANGES
from .distributed import resolve_device

__all__ = ["add_model_data_arguments", "checkpoint_type", "device_type", "folder_type"]


def _folder(text: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(f"{text!r} is a file, not a folder")
    return text


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise ValueError(f"{text!r} does not exist" if not os.path.exists(text) else f"{text!r} is not a file")
    return text


def _device_spec(text: str) -> str:
    resolve_device(text)
    return text


folder_type = argument_type(_folder, "folder")
checkpoint_type = argument_type(_existing_file, "checkpoint")
device_type = argument_type(_device_spec, "device")


def add_model_data_arguments(p: argparse.ArgumentParser) -> None:
    """``--data``, ``--data-root``, ``--n-bits`` and ``--image-size``: the data a checkpoint's model is run on
    (:func:`~cinc_kernels.flow.evaluation.data_for_model` applies them)."""
    from .data import DATASETS

    p.add_argument("--data", default=None, choices=DATASETS, help="data set (default: the one it was trained on)")
    p.add_argument("--data-root", default=None, help="local folder with the data set's files (default: the run's)")
    p.add_argument("--n-bits", type=range_type(FIELD_RANGES["n_bits"]), default=None,
                   help="bits per pixel of the data (default: the model's; another value is refused, since "
                        "bits/dim at another number of levels mean nothing)")
    p.add_argument("--image-size", type=range_type(FIELD_RANGES["image_size"]), default=None,
                   help="side length for imagefolder and photos data (default: the run's)")
