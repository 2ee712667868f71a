"""``python -m cinc_kernels info | check | bench`` (installed as the ``cinc-kernels`` command too)."""
from __future__ import annotations

import os
import platform
import sys
from typing import Optional, Sequence

import torch

from ._cli import ArgumentParser


def info() -> None:
    from . import __version__
    from ._extension import build_info
    from .backends import all_backends

    print(f"cinc_kernels {__version__}")
    print(f"  python {platform.python_version()}, torch {torch.__version__}, machine {platform.machine()}")
    print(f"  CPU threads {torch.get_num_threads()}, CUDA GPU: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    built = build_info()
    if built:
        print("  built with: " + ", ".join(f"{k}={v}" for k, v in built.items()))
    else:
        print("  the C++ extension is not built (pip install --no-build-isolation -e .)")
    print("  backends:")
    for backend in all_backends():
        if not backend.public:
            continue
        why = backend.unavailable()
        print(f"    {backend.name:<10} {'available' if why is None else 'unavailable: ' + why}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options and --help: cinc_kernels.bench parses them
        from .bench import main as bench_main

        return bench_main(argv[1:])
    # Usage lines name the command the user typed: the console script, or the module form.
    prog = "cinc-kernels" if os.path.basename(sys.argv[0]) == "cinc-kernels" else "python -m cinc_kernels"
    parser = ArgumentParser(prog=prog,
                            description="Versions and build, the self-check against the float64 reference, "
                                        "and the layers benchmark.")
    parser.add_argument("--version", action="version", version=f"cinc_kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, build and the available backends")
    sub.add_parser("check", help="every available backend against the float64 reference")
    sub.add_parser("bench", help="the layers side by side and the inverse algorithms (bench --help for options)")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "check":
        from .selfcheck import run

        print("self-check against the float64 reference:")
        ok = run()
        print("all backends agree with the reference" if ok else "SOME BACKENDS DISAGREE WITH THE REFERENCE")
        return 0 if ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
