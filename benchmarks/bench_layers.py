"""The comparison benchmark as a script: the same as ``python -m cinc_kernels bench`` (same options).

    python benchmarks/bench_layers.py                 # this machine's default device; seconds on a quiet 2-core CPU
    python benchmarks/bench_layers.py --quick         # a smoke run, seconds
    python benchmarks/bench_layers.py --device cuda --dtypes float32,float64 --sizes 16,32,64 --batch 64

The code lives in :mod:`cinc_kernels.bench` so that an installed package has the command too and the tests can run a
tiny version of it.
"""
import sys

from cinc_kernels.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
