"""Training augmentation as MONAI transforms (array transform + dictionary twin with a ``d``).

The paper's values are the defaults. ``configs/train.json`` applies them in this order, after the
deterministic load and crop (which can then be cached)::

    SeedROICropd -> RandROIShiftd (+-5 voxels = mm, the crop jitter, exact)
      -> RandROIRotated (+-10 deg about the seed, one resample, air padding)
      -> RandROIFlipd (each ROI axis independently, p=0.5)
      -> NinePlanesd -> RandPlaneGaussianNoised (std 0.02) -> RandPlaneGammad (gamma 0.8..1.2)
      -> CLIPNormalized

:class:`RandSeedJitter` jitters the seed before the crop instead, for pipelines that do not cache.
The deterministic chain is :mod:`scripts.transforms`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    MapTransform,
    RandAdjustContrast,
    RandAdjustContrastd,
    RandGaussianNoise,
    RandGaussianNoised,
    RandomizableTransform,
)

from scripts.resampling import sample_linear
from scripts.transforms import parse_seed, plain_tensor

__all__ = [
    "RandPlaneGamma",
    "RandPlaneGammad",
    "RandPlaneGaussianNoise",
    "RandPlaneGaussianNoised",
    "RandROIFlip",
    "RandROIFlipd",
    "RandROIRotate",
    "RandROIRotated",
    "RandROIShift",
    "RandROIShiftd",
    "RandSeedJitter",
    "RandSeedJitterd",
]


class _RandDictTwin(RandomizableTransform, MapTransform):
    """Dictionary twin that draws once with its array transform and applies it to every key."""

    def __init__(self, keys: KeysCollection, transform: Any, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.transform = transform

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> _RandDictTwin:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.transform.randomize()
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], randomize=False)
        return d


class RandSeedJitter(RandomizableTransform):
    """Shift a world seed by a uniform random offset in [-max_shift, +max_shift] mm per axis.

    Applied before :class:`SeedROICrop`, this is the paper's in-plane crop jitter (+-5 px at 1 mm).

    Args:
        max_shift: largest shift per axis in mm (5.0).
        prob: probability of shifting.
    """

    def __init__(self, max_shift: float = 5.0, prob: float = 1.0) -> None:
        super().__init__(prob)
        self.max_shift = float(max_shift)
        self._shift = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._shift = (
            self.R.uniform(-self.max_shift, self.max_shift, size=3) if self._do_transform else np.zeros(3)
        )

    def __call__(self, seed: Any, randomize: bool = True) -> np.ndarray:  # type: ignore[override]
        """Jitter ``seed`` (3,) mm; returns a float64 numpy array."""
        if randomize:
            self.randomize()
        return parse_seed(seed, "seed jitter") + self._shift


class RandSeedJitterd(_RandDictTwin):
    """Dictionary twin of :class:`RandSeedJitter` (same shift for every key).

    Args:
        keys: keys of the seeds.
        max_shift: largest shift per axis in mm.
        prob: probability of shifting.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "seed",
        max_shift: float = 5.0,
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandSeedJitter(max_shift=max_shift, prob=prob), allow_missing_keys)


class RandROIFlip(RandomizableTransform):
    """Flip each spatial axis of a (C, D, H, W) ROI independently with probability ``prob``.

    Unlike :class:`monai.transforms.RandFlip` (one draw for all listed axes), every axis gets its
    own draw, as in the paper ("flips on all axes, p=0.5").

    Args:
        prob: probability per axis.
    """

    def __init__(self, prob: float = 0.5) -> None:
        super().__init__(prob=1.0)
        self.axis_prob = float(prob)
        self._flips: tuple[int, ...] = ()

    def randomize(self, data: Any = None) -> None:
        draws = self.R.random_sample(3)
        self._flips = tuple(axis + 1 for axis in range(3) if draws[axis] < self.axis_prob)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:  # type: ignore[override]
        """Flip ``img`` (C, D, H, W) along the drawn axes."""
        if randomize:
            self.randomize()
        img = plain_tensor(img)
        return torch.flip(img, self._flips) if self._flips else img


class RandROIFlipd(_RandDictTwin):
    """Dictionary twin of :class:`RandROIFlip` (same flips for every key).

    Args:
        keys: keys of the ROIs.
        prob: probability per axis.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self, keys: KeysCollection = "image", prob: float = 0.5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, RandROIFlip(prob=prob), allow_missing_keys)


def _rotation_matrix(angles_rad: Sequence[float]) -> np.ndarray:
    """Rotation about array axes 0, 1, 2 (in this order of composition), 3x3 float64."""
    rotation = np.eye(3)
    for axis, angle in enumerate(angles_rad):
        a, b = [k for k in range(3) if k != axis]
        step = np.eye(3)
        step[a, a] = step[b, b] = math.cos(angle)
        step[a, b], step[b, a] = -math.sin(angle), math.sin(angle)
        rotation = step @ rotation
    return rotation


class RandROIRotate(RandomizableTransform):
    """Rotate a (C, D, H, W) ROI about its centre index (the seed) by random angles, one resample.

    Angles about each of the three axes are uniform in [-max_angle, +max_angle] degrees; sampling is
    trilinear with ``pad_value`` (air) where the rotated cube leaves the ROI.

    Args:
        max_angle: largest angle per axis in degrees (10).
        prob: probability of rotating.
        pad_value: value outside the ROI (HU).
    """

    def __init__(self, max_angle: float = 10.0, prob: float = 0.5, pad_value: float = -1000.0) -> None:
        super().__init__(prob)
        self.max_angle = float(max_angle)
        self.pad_value = float(pad_value)
        self._angles = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        angles = self.R.uniform(-self.max_angle, self.max_angle, size=3)
        self._angles = np.deg2rad(angles) if self._do_transform else np.zeros(3)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:  # type: ignore[override]
        """Rotate ``img`` (C, D, H, W) with the drawn angles (unchanged when not drawn)."""
        if randomize:
            self.randomize()
        img = plain_tensor(img)
        if not np.any(self._angles):
            return img
        shape = tuple(int(n) for n in img.shape[1:])
        centre = np.asarray(shape, dtype=np.float64) // 2
        index_map = np.eye(4)
        rotation = _rotation_matrix(self._angles)
        index_map[:3, :3] = rotation
        index_map[:3, 3] = centre - rotation @ centre
        channels = [sample_linear(channel, shape, index_map, self.pad_value) for channel in img]
        return torch.stack(channels)


class RandROIRotated(_RandDictTwin):
    """Dictionary twin of :class:`RandROIRotate` (same rotation for every key).

    Args:
        keys: keys of the ROIs.
        max_angle: largest angle per axis in degrees.
        prob: probability of rotating.
        pad_value: value outside the ROI (HU).
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        max_angle: float = 10.0,
        prob: float = 0.5,
        pad_value: float = -1000.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, RandROIRotate(max_angle=max_angle, prob=prob, pad_value=pad_value), allow_missing_keys
        )


class RandROIShift(RandomizableTransform):
    """Shift a (C, D, H, W) ROI by whole voxels, uniform in [-max_shift, +max_shift] per axis.

    The crop jitter of the paper (+-5 px at 1 mm) applied to an already cropped ROI, so the crop can
    be cached: integer shifts are exact (no resampling); the uncovered border gets ``pad_value``.
    The planes then pass up to ``max_shift`` mm from the seed, as in the authors' jittered crops.

    Args:
        max_shift: largest shift per axis in voxels (= mm for the 1 mm ROI).
        prob: probability of shifting.
        pad_value: value of the uncovered border (HU).
    """

    def __init__(self, max_shift: int = 5, prob: float = 1.0, pad_value: float = -1000.0) -> None:
        super().__init__(prob)
        self.max_shift = int(max_shift)
        self.pad_value = float(pad_value)
        self._shift = (0, 0, 0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        draw = self.R.randint(-self.max_shift, self.max_shift + 1, size=3)
        self._shift = tuple(int(v) for v in draw) if self._do_transform else (0, 0, 0)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:  # type: ignore[override]
        """Shift ``img`` (C, D, H, W) by the drawn voxels: output[i] = input[i - shift]."""
        if randomize:
            self.randomize()
        img = plain_tensor(img)
        if not any(self._shift):
            return img
        shifted = torch.full_like(img, self.pad_value)
        target, source = [slice(None)], [slice(None)]
        for shift, size in zip(self._shift, img.shape[1:], strict=True):
            target.append(slice(max(shift, 0), size + min(shift, 0)))
            source.append(slice(max(-shift, 0), size - max(shift, 0)))
        shifted[tuple(target)] = img[tuple(source)]
        return shifted


class RandROIShiftd(_RandDictTwin):
    """Dictionary twin of :class:`RandROIShift` (same shift for every key).

    Args:
        keys: keys of the ROIs.
        max_shift: largest shift per axis in voxels.
        prob: probability of shifting.
        pad_value: value of the uncovered border (HU).
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        max_shift: int = 5,
        prob: float = 1.0,
        pad_value: float = -1000.0,
        allow_missing_keys: bool = False,
    ) -> None:
        shift = RandROIShift(max_shift=max_shift, prob=prob, pad_value=pad_value)
        super().__init__(keys, shift, allow_missing_keys)


class RandPlaneGaussianNoise(RandGaussianNoise):
    """:class:`monai.transforms.RandGaussianNoise` with the paper's default: std 0.02 (fixed).

    Args:
        prob: probability of adding noise.
        std: noise standard deviation on the [0, 1] scale.
    """

    def __init__(self, prob: float = 0.5, std: float = 0.02) -> None:
        super().__init__(prob=prob, mean=0.0, std=std, sample_std=False)


class RandPlaneGaussianNoised(RandGaussianNoised):
    """:class:`monai.transforms.RandGaussianNoised` with the paper's default: std 0.02 (fixed).

    Args:
        keys: keys of the planes.
        prob: probability of adding noise.
        std: noise standard deviation on the [0, 1] scale.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.5,
        std: float = 0.02,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, prob=prob, mean=0.0, std=std, sample_std=False, allow_missing_keys=allow_missing_keys
        )


class RandPlaneGamma(RandAdjustContrast):
    """:class:`monai.transforms.RandAdjustContrast` with the paper's default gamma range 0.8 .. 1.2.

    Args:
        prob: probability of adjusting.
        gamma: (low, high) range of the gamma exponent.
    """

    def __init__(self, prob: float = 0.5, gamma: tuple[float, float] = (0.8, 1.2)) -> None:
        super().__init__(prob=prob, gamma=gamma)


class RandPlaneGammad(RandAdjustContrastd):
    """:class:`monai.transforms.RandAdjustContrastd` with the paper's default gamma range 0.8 .. 1.2.

    Args:
        keys: keys of the planes.
        prob: probability of adjusting.
        gamma: (low, high) range of the gamma exponent.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        prob: float = 0.5,
        gamma: tuple[float, float] = (0.8, 1.2),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, prob=prob, gamma=gamma, allow_missing_keys=allow_missing_keys)
