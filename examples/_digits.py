"""The bundled 8×8 digits (scikit-learn, no download) as dequantised images in [0, 1), squeezed to 4×4×4 so that a
coupling has channels to split (the squeeze is a reshape: log-determinant 0)."""
import torch


def squeezed_digits(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` training images, ``(n, 4, 4, 4)``, centred: ``pixel_unshuffle(x - 0.5, 2)`` of dequantised digits."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32)[:n, None] / 17.0  # 17 levels: 0…16
    g = torch.Generator().manual_seed(seed)
    images = images + torch.rand(images.shape, generator=g) / 17.0
    return torch.nn.functional.pixel_unshuffle(images - 0.5, 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Back to ``(n, 1, 8, 8)`` images in [0, 1) (clamped), for a picture."""
    return (torch.nn.functional.pixel_shuffle(x, 2) + 0.5).clamp(0, 1)
