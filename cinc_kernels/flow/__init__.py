"""CInC Flow (docs/spec.md §4): the multi-scale flow, its data, training, sampling and latent editing.

    from cinc_kernels.flow import CInCFlow
    model = CInCFlow(1, levels=2, steps_per_level=4, hidden_channels=32, conv="cinc", coupling="quad", image_size=8)
    bpd = model.bits_per_dim(x, n_bits=8)      # x: (B, 1, 8, 8) dequantised in [0, 1)
    z = model.encode(x); x2 = model.decode(z); samples = model.sample(16, temperature=0.7)

Command line: ``python -m cinc_kernels.flow train | sample | eval | edit``.
"""
from .layers import (
    COUPLINGS,
    PERMUTATIONS,
    ActNorm,
    AffineCoupling,
    CouplingNet,
    FlowStep,
    QuadCoupling,
    ReverseChannels,
    ShuffleChannels,
    Split,
    Squeeze,
)
from .model import PRESETS, CInCFlow, build_model, flatten_latents, unflatten_latents

__all__ = [
    "COUPLINGS",
    "PERMUTATIONS",
    "PRESETS",
    "ActNorm",
    "AffineCoupling",
    "CInCFlow",
    "CouplingNet",
    "FlowStep",
    "QuadCoupling",
    "ReverseChannels",
    "ShuffleChannels",
    "Split",
    "Squeeze",
    "build_model",
    "flatten_latents",
    "unflatten_latents",
]
