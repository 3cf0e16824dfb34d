"""Image encoder weights load at another resolution: the learned positions of the patch grid are
interpolated (class token kept), against references written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamm.model.encoders.image import ImageEncoder, interpolate_position_embedding
from megamm.model.init import WeightInit


def _centres(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) + 0.5) / n  # patch centres on [0, 1]


def _encoder(image_size: int) -> ImageEncoder:
    return ImageEncoder(image_size, 8, 3, 32, 1, 4, 64, None, WeightInit(seed=0))


def test_bilinear_resize_reproduces_a_linear_field_inside_the_grid() -> None:
    """A position embedding linear in the patch centre's coordinates stays that linear field at the
    new grid's centres (bilinear interpolation is exact on linear functions away from the border)."""
    old, new, hidden = 4, 7, 3
    y, x = _centres(old)[:, None], _centres(old)[None, :]
    field = torch.stack([3 * y - 2 * x, y + x, 0 * (y + x) + 1.5], dim=-1).reshape(old * old, hidden)  # (g*g, H)
    positions = torch.cat([torch.full((1, hidden), 9.0, dtype=torch.float64), field])
    resized = interpolate_position_embedding(positions, 1 + new * new, mode="bilinear")
    assert resized.shape == (1 + new * new, hidden)
    assert torch.equal(resized[0], positions[0])  # the class token's position is kept
    y, x = _centres(new)[:, None], _centres(new)[None, :]
    expected = torch.stack([3 * y - 2 * x, y + x, 0 * (y + x) + 1.5], dim=-1)  # (G, G, H)
    inside = (_centres(new) >= _centres(old)[0]) & (_centres(new) <= _centres(old)[-1])
    got = resized[1:].reshape(new, new, hidden)
    torch.testing.assert_close(got[inside][:, inside], expected[inside][:, inside])


def test_bicubic_resize_of_a_smooth_field_and_its_identity() -> None:
    old, new = 6, 9
    y, x = _centres(old)[:, None], _centres(old)[None, :]
    smooth = torch.sin(2 * y) * torch.cos(x)  # (g, g)
    positions = torch.cat([torch.zeros(1, 1, dtype=torch.float64), smooth.reshape(-1, 1)])
    resized = interpolate_position_embedding(positions, 1 + new * new)[1:].reshape(new, new)
    y, x = _centres(new)[:, None], _centres(new)[None, :]
    assert (resized - torch.sin(2 * y) * torch.cos(x)).abs().max() < 0.05  # close to the field it samples
    assert interpolate_position_embedding(positions, positions.shape[0]) is positions  # same grid: untouched
    half = interpolate_position_embedding(positions.to(torch.bfloat16), 1 + new * new)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="square patch grid"):
        interpolate_position_embedding(positions, 1 + 10)


def test_encoder_trained_at_32_pixels_loads_and_runs_at_48() -> None:
    small, large = _encoder(32), _encoder(48)  # 4 x 4 and 6 x 6 patch grids
    large.load_state_dict(small.state_dict())
    grid = small.embedding.position_embedding.detach()[1:].reshape(4, 4, -1).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(36, -1)
    torch.testing.assert_close(large.embedding.position_embedding.detach()[1:], expected)
    for name, param in small.state_dict().items():  # everything else loads unchanged
        if not name.endswith("position_embedding"):
            assert torch.equal(param, large.state_dict()[name]), name
    assert small.state_dict()["embedding.position_embedding"].shape[0] == 17  # the source is untouched
    out = large(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="size mismatch"):  # another width is not a resolution change
        ImageEncoder(32, 8, 3, 16, 1, 4, 64, None, WeightInit(seed=0)).load_state_dict(small.state_dict())


def test_placeholders_and_other_widths_are_left_to_the_shape_check() -> None:
    """DeepSpeed's ZeRO-3 loading hands the hook empty partitioned placeholders: they stay as they
    are, as does a tensor of another width (not a resolution change)."""
    embedding = _encoder(48).embedding
    for value in (torch.empty(0), torch.zeros(17, 16)):
        state = {"embedding.position_embedding": value}
        embedding.adapt_state_dict(state, "embedding.")
        assert state["embedding.position_embedding"] is value
