"""Preprocessing transforms: planes against a slow definition, orientation, bad input, twins."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from test_geometry import BLOB_1, NIFTI_CASES, write_nifti

from scripts.augmentation import (
    RandPlaneGamma,
    RandPlaneGammad,
    RandPlaneGaussianNoise,
    RandPlaneGaussianNoised,
    RandROIFlip,
    RandROIFlipd,
    RandROIRotate,
    RandROIRotated,
    RandROIShift,
    RandROIShiftd,
    RandSeedJitter,
    RandSeedJitterd,
)
from scripts.errors import UserInputError
from scripts.geometry import format_extent_lps
from scripts.resampling import axis_permutation, sample_grid, sample_linear
from scripts.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CLIPNormalize,
    CLIPNormalized,
    LoadCT,
    LoadCTd,
    NinePlanes,
    NinePlanesd,
    SeedROICrop,
    SeedROICropd,
    nine_planes_for_seeds,
    window_hu,
)

# ---------------------------------------------------------------------------------------------
# the slow definition: the authors' construction (rotate the windowed cube, slice, zoom)
# ---------------------------------------------------------------------------------------------

#: (rotation axes or None, slice axis) per plane, as in the table of docs/method.md.
CONSTRUCTION = (
    (None, 0),
    (None, 1),
    (None, 2),
    ((0, 2), 0),
    ((0, 2), 2),
    ((0, 1), 0),
    ((0, 1), 1),
    ((1, 2), 1),
    ((1, 2), 2),
)


def slow_planes(roi_hu_101: np.ndarray) -> np.ndarray:
    """Reference planes (9, 224, 224) from a 101^3 HU cube whose seed is the array centre (50).

    scipy rotates about the array centre ((101 - 1) / 2 = 50), so the rotated slices pass through
    the seed exactly; trilinear (order=1) like our sampler.
    """
    windowed = np.clip((roi_hu_101 - (-1000.0)) / 1500.0, 0.0, 1.0)
    rotated = {
        axes: ndimage.rotate(windowed, 45, axes=axes, reshape=False, order=1)
        for axes in [(0, 2), (0, 1), (1, 2)]
    }
    out = []
    for axes, axis in CONSTRUCTION:
        cube = windowed if axes is None else rotated[axes]
        plane = np.take(cube, 50, axis=axis)[25:75, 25:75]
        out.append(ndimage.zoom(plane, 224 / 50, order=1))
    return np.stack(out)


def smooth_cube(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(101, 101, 101)), 3.0)
    return (field / field.std() * 400.0 - 300.0).astype(np.float32)


def asymmetric_cube() -> np.ndarray:
    """A ramp that differs along every plane's rows and columns + blobs at +L, +P, +S, off-diagonal."""
    z, y, x = np.meshgrid(*[np.arange(101.0) - 50] * 3, indexing="ij")
    cube = -250.0 + 20.0 * z + 8.0 * y + 4.0 * x
    blobs = [
        ((0, 0, 12), 450.0),
        ((0, 9, 0), -900.0),
        ((7, 0, 0), 700.0),
        ((8, 8, 0), -700.0),
        ((0, -6, 10), 600.0),
        ((-9, 0, 9), -600.0),
        ((5, -7, -7), 500.0),
    ]
    for (bz, by, bx), height in blobs:
        cube += height * np.exp(-((z - bz) ** 2 + (y - by) ** 2 + (x - bx) ** 2) / 8.0)
    return cube.astype(np.float32)


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).mean())


def test_nine_planes_match_the_slow_definition():
    cube = smooth_cube()
    ours = NinePlanes()(torch.from_numpy(cube[None, :100, :100, :100])).numpy()
    reference = slow_planes(cube)
    assert ours.shape == (9, 224, 224) and ours.dtype == np.float32
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    for index in range(9):
        assert mean_abs(ours[index, 8:-8, 8:-8], reference[index, 8:-8, 8:-8]) <= 0.01, f"plane {index + 1}"


def test_every_plane_orientation_is_pinned_by_an_asymmetric_phantom():
    cube = asymmetric_cube()
    ours = NinePlanes()(torch.from_numpy(cube[None, :100, :100, :100])).numpy()
    reference = slow_planes(cube)
    for index in range(9):
        plane, ref = ours[index], reference[index]
        assert mean_abs(plane, ref) <= 0.01, f"plane {index + 1} differs from the slow reference"
        for name, wrong in (
            ("row flip", plane[::-1]),
            ("column flip", plane[:, ::-1]),
            ("transpose", plane.T),
        ):
            assert mean_abs(wrong, ref) > 0.02, f"plane {index + 1}: {name} is not detectable"


def test_planes_end_to_end_put_left_posterior_superior_where_the_table_says(tmp_path):
    """From an LPS phantom volume: the bright blob 12 mm left / 9 mm posterior / 15 mm superior of BLOB_1."""

    def plane_peak(plane: np.ndarray) -> np.ndarray:
        return np.array(np.unravel_index(np.argmax(plane), plane.shape)) * 49 / 223 - 25  # mm from the seed

    affine, shape = NIFTI_CASES["ct_like"]
    image = LoadCT()(write_nifti(tmp_path / "p.nii.gz", affine, shape))
    # seeds that share one coordinate with the second blob put it in the axial, coronal or sagittal plane
    blob2 = BLOB_1 + np.array([12.0, -9.0, 15.0])
    planes = NinePlanes(out_size=224)
    axial = planes(SeedROICrop()(image, blob2 - [12.0, -9.0, 0.0])).numpy()[0]
    np.testing.assert_allclose(plane_peak(axial), [-9.0, 12.0], atol=0.6)  # rows y (P), columns x (L)
    coronal = planes(SeedROICrop()(image, blob2 - [12.0, 0.0, 15.0])).numpy()[1]
    np.testing.assert_allclose(plane_peak(coronal), [15.0, 12.0], atol=0.6)  # rows z (S), columns x (L)
    sagittal = planes(SeedROICrop()(image, blob2 - [0.0, -9.0, 15.0])).numpy()[2]
    np.testing.assert_allclose(plane_peak(sagittal), [15.0, -9.0], atol=0.6)  # rows z (S), columns y (P)


# ---------------------------------------------------------------------------------------------
# crop details
# ---------------------------------------------------------------------------------------------


def _volume(shape=(60, 70, 50), dtype=torch.float32) -> MetaTensor:
    rng = np.random.default_rng(1)
    data = torch.as_tensor(rng.uniform(-1000, 400, size=(1, *shape)), dtype=dtype)
    affine = torch.tensor(
        [[-0.8, 0, 0, 20.0], [0, -0.9, 0, 30.0], [0, 0, 1.5, -40.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    return MetaTensor(data, affine=affine)


def test_crop_reads_only_the_voxels_under_the_cube():
    volume = _volume(shape=(200, 60, 40))
    volume[:, 140:] = float("nan")  # > 50 mm (+1 voxel) away from the seed along x
    seed = [-20.0 + 0.8 * 30.0, -30.0 + 0.9 * 30.0, -40.0 + 1.5 * 20.0]  # voxel (30, 30, 20)
    roi = SeedROICrop()(volume, seed)
    assert torch.isfinite(roi).all()


def test_crop_integer_aligned_seed_reproduces_voxel_values():
    """Spacing 1 mm and a seed on a voxel centre: the cube is the volume re-indexed (S, P, L)."""
    data = torch.arange(120 * 110 * 105, dtype=torch.float32).reshape(1, 120, 110, 105) % 977.0
    affine = torch.tensor(
        [[-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]], dtype=torch.float64
    )
    volume = MetaTensor(data, affine=affine)  # voxel (i, j, k) at LPS (i, j, k)
    roi = SeedROICrop()(volume, [60.0, 55.0, 52.0])[0]
    expected = data[0, 10:110, 5:105, 2:102].permute(2, 1, 0)  # (k, j, i) = (S, P, L)
    # float32 grid coordinates are exact to ~1e-5 voxel; neighbours here differ by up to 977
    torch.testing.assert_close(roi, expected, atol=0.02, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
def test_crop_plain_tensor_with_affine_equals_metatensor(dtype):
    volume = _volume(dtype=dtype)
    seed = (0.0, -5.0, 10.0)
    a = SeedROICrop(roi_size=40, spacing=1.5)(volume, seed)
    b = SeedROICrop(roi_size=40, spacing=1.5)(volume.as_tensor(), seed, affine=volume.affine)
    assert a.shape == (1, 40, 40, 40) and a.dtype == torch.float32 and not isinstance(a, MetaTensor)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("axes", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("pad_value", [-1000.0, 0.0])
def test_separable_sampler_equals_grid_sample(axes, pad_value):
    """The fast axis-aligned path equals grid_sample(block - pad) + pad, also where it runs off the block."""
    rng = np.random.default_rng(sum(axes))
    block = torch.as_tensor(rng.uniform(-1000, 1000, size=(30, 26, 22)), dtype=torch.float32)
    index_map = np.eye(4)
    index_map[:3, :3] = 0.0
    for in_axis, out_axis in enumerate(axes):
        index_map[in_axis, out_axis] = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 0.9)
    index_map[:3, 3] = rng.uniform(-4.0, 30.0, size=3)
    shape = (24, 28, 32)
    assert axis_permutation(index_map, shape) == list(axes)
    fast = sample_linear(block, shape, index_map, pad_value)
    reference = sample_grid(block - pad_value, shape, index_map) + pad_value
    torch.testing.assert_close(fast, reference, atol=0.02, rtol=0)  # float32 grid coordinates
    assert float(fast.min()) >= -1000.0 - 1e-3
    as_int16 = sample_linear(block.round().to(torch.int16), shape, index_map, pad_value)
    torch.testing.assert_close(as_int16, sample_linear(block.round(), shape, index_map, pad_value))
    for layout in [(2, 1, 0), (1, 0, 2)]:  # the same values stored in another order (a transposed CT)
        strided = block.permute(layout).contiguous().permute(np.argsort(layout).tolist())
        assert torch.equal(strided, block) and not strided.is_contiguous()
        in_memory_order = sample_linear(strided, shape, index_map, pad_value)
        torch.testing.assert_close(in_memory_order, fast, atol=1e-3, rtol=0)
    tilted = index_map.copy()
    tilted[0, (axes[0] + 1) % 3] = 1e-7  # negligible obliquity: still separable
    assert axis_permutation(tilted, shape) == list(axes)
    tilted[0, (axes[0] + 1) % 3] = 1e-2
    assert axis_permutation(tilted, shape) is None


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_seed_outside_the_scan_names_pid_nodule_and_extent():
    volume = _volume()
    crop = SeedROICropd(keys="image")
    with pytest.raises(UserInputError) as error:
        crop({"image": volume, "seed": [500.0, 0.0, -10.0], "pid": "P123", "nodule_id": 7})
    message = str(error.value)
    assert message.startswith("pid P123 nodule 7: seed (500.00, 0.00, -10.00) mm LPS lies outside the scan")
    assert format_extent_lps(volume.affine, volume.shape[1:]) in message
    assert "check coordX/Y/Z are world LPS millimetres" in message


@pytest.mark.parametrize("seed", [[1.0, 2.0], [float("nan"), 0.0, 0.0], "abc"])
def test_malformed_seed(seed):
    with pytest.raises(UserInputError, match="pid 1 nodule 2: the seed must be 3 finite numbers"):
        SeedROICrop()(_volume(), seed, pid=1, nodule_id=2)


def test_missing_seed_key():
    with pytest.raises(UserInputError, match="pid 9 nodule 0: no seed"):
        SeedROICropd()({"image": _volume(), "pid": 9, "nodule_id": 0})


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(UserInputError, match=r"nope\.nii\.gz: no such file"):
        LoadCT()(tmp_path / "nope.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="empty"):
        LoadCT()(tmp_path / "empty")
    (tmp_path / "junk.nii.gz").write_text("not an image")
    with pytest.raises(UserInputError, match="junk.nii.gz: cannot read it"):
        LoadCT()(tmp_path / "junk.nii.gz")


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8, 2), (8, 8, 1)])
def test_non_3d_image(tmp_path, shape):
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.diag([-1.0, -1.0, 1.0, 1.0])), str(path))
    with pytest.raises(UserInputError, match=r"bad\.nii\.gz: expected one 3-D CT volume") as error:
        LoadCT()(path)
    assert "shape" in str(error.value)


def test_relative_path_with_base_dir(tmp_path):
    affine, shape = NIFTI_CASES["ct_like"]
    write_nifti(tmp_path / "rel.nii.gz", affine, shape)
    out = LoadCTd(keys="image", base_dir=tmp_path)({"image": "rel.nii.gz", "pid": 1})
    assert out["image"].shape == (1, *shape) and out["pid"] == 1


# ---------------------------------------------------------------------------------------------
# array transform == dictionary twin; augmentation
# ---------------------------------------------------------------------------------------------


def _roi(size: int = 100) -> torch.Tensor:
    return torch.from_numpy(smooth_cube(3)[None, :size, :size, :size].copy())


def test_dict_twins_equal_array_transforms():
    volume = _volume()
    seed = (2.0, -3.0, 8.0)
    roi = SeedROICrop()(volume, seed)
    d = SeedROICropd()({"image": volume, "seed": seed})
    torch.testing.assert_close(d["image"], roi)
    planes = NinePlanes()(roi)
    torch.testing.assert_close(NinePlanesd()({"image": roi})["image"], planes)
    normalised = CLIPNormalize()(planes)
    torch.testing.assert_close(CLIPNormalized()({"image": planes})["image"], normalised)
    torch.testing.assert_close(nine_planes_for_seeds(volume, [seed, seed])[1], normalised)


def test_clip_normalize_values_and_inverse():
    planes = torch.rand(9, 8, 8)
    out = CLIPNormalize()(planes)
    assert out.shape == (9, 3, 8, 8)
    for channel in range(3):
        torch.testing.assert_close(out[:, channel], (planes - CLIP_MEAN[channel]) / CLIP_STD[channel])
    torch.testing.assert_close(CLIPNormalize().inverse(out), planes)
    batch = CLIPNormalize()(torch.stack([planes, planes.flip(0)]))  # (B, 9, H, W) -> (B, 9, 3, H, W)
    assert batch.shape == (2, 9, 3, 8, 8)
    torch.testing.assert_close(batch[0], out)


def test_window_hu():
    values = torch.tensor([-2000.0, -1000.0, -250.0, 500.0, 3000.0])
    torch.testing.assert_close(window_hu(values), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_plane_size_and_out_size_parameters():
    planes = NinePlanes(plane_size=20, out_size=20)(_roi(60))
    assert planes.shape == (9, 20, 20)


RANDOM_CASES = [
    (lambda: RandSeedJitter(), lambda: RandSeedJitterd(keys="seed"), "seed"),
    (lambda: RandROIFlip(), lambda: RandROIFlipd(keys="image"), "image"),
    (lambda: RandROIRotate(prob=1.0), lambda: RandROIRotated(keys="image", prob=1.0), "image"),
]


@pytest.mark.parametrize("make_array, make_dict, key", RANDOM_CASES)
def test_augmentation_reproducible_and_twin_equal(make_array, make_dict, key):
    value = np.array([1.0, 2.0, 3.0]) if key == "seed" else _roi(40)
    runs = []
    for _ in range(2):
        array_t, dict_t = make_array(), make_dict()
        array_t.set_random_state(seed=42)
        dict_t.set_random_state(seed=42)
        outs = [(array_t(value), dict_t({key: value, "other": 1})[key]) for _ in range(3)]
        for from_array, from_dict in outs:
            np.testing.assert_allclose(np.asarray(from_array), np.asarray(from_dict))
        runs.append([np.asarray(a) for a, _ in outs])
    for first, second in zip(*runs, strict=True):
        np.testing.assert_array_equal(first, second)
    assert not all(np.array_equal(runs[0][0], other) for other in runs[0][1:])  # it does vary


def test_seed_jitter_bounds():
    jitter = RandSeedJitter(max_shift=5.0)
    jitter.set_random_state(0)
    shifts = np.stack([jitter([0.0, 0.0, 0.0]) for _ in range(200)])
    assert np.abs(shifts).max() <= 5.0 and np.abs(shifts).max() > 4.0


def test_roi_flip_draws_each_axis_independently():
    flip = RandROIFlip(prob=0.5)
    flip.set_random_state(0)
    seen = set()
    for _ in range(40):
        flip.randomize()
        seen.add(flip._flips)
    assert len(seen) == 8  # every subset of the three axes occurs


def test_roi_rotation_keeps_the_seed_and_pads_with_air():
    roi = torch.full((1, 41, 41, 41), 100.0)
    roi[0, 20, 20, 20] = 900.0
    rotate = RandROIRotate(max_angle=10.0, prob=1.0)
    rotate.set_random_state(1)
    out = rotate(roi)
    assert out.shape == roi.shape
    assert float(out[0, 20, 20, 20]) == pytest.approx(900.0, abs=1e-2)  # centre fixed
    assert float(out[0, 0, 0, 0]) < 100.0  # a corner rotated in from outside: mixed with air
    assert float(out.min()) >= -1000.0 - 1e-3
    assert not np.any(rotate._angles == 0) and np.all(np.abs(np.rad2deg(rotate._angles)) <= 10.0)
    rotate_never = RandROIRotate(prob=0.0)
    assert rotate_never(roi) is not None and torch.equal(rotate_never(roi), roi)


@pytest.mark.parametrize("shift", [(0, 0, 0), (3, -2, 5), (-5, 5, -1)])
def test_roi_shift_moves_voxels_exactly_and_pads_with_air(shift):
    roi = torch.arange(21.0**3).reshape(1, 21, 21, 21)
    shifter = RandROIShift(max_shift=5)
    shifter._shift = shift
    out = shifter(roi, randomize=False)
    dz, dy, dx = shift
    assert float(out[0, 10 + dz, 10 + dy, 10 + dx]) == float(roi[0, 10, 10, 10])
    if any(shift):
        assert float(out.min()) == -1000.0
    else:
        assert torch.equal(out, roi)


def test_roi_shift_draws_within_bounds_reproducibly_and_twin_matches():
    draws = set()
    for seed in range(40):
        shifter = RandROIShift(max_shift=5).set_random_state(seed)
        shifter.randomize()
        assert all(-5 <= v <= 5 for v in shifter._shift)
        draws.add(shifter._shift)
    assert len(draws) > 30
    roi = torch.rand(1, 12, 12, 12)
    twin = RandROIShiftd(keys="image", max_shift=3).set_random_state(7)
    array = RandROIShift(max_shift=3).set_random_state(7)
    torch.testing.assert_close(twin({"image": roi})["image"], array(roi))


def test_plane_noise_and_gamma_defaults_are_the_papers():
    noise, noise_d = RandPlaneGaussianNoise(), RandPlaneGaussianNoised()
    assert noise.prob == 0.5 and noise.std == 0.02 and noise.sample_std is False
    assert noise_d.rand_gaussian_noise.std == 0.02
    gamma, gamma_d = RandPlaneGamma(), RandPlaneGammad()
    assert tuple(gamma.gamma) == (0.8, 1.2) and tuple(gamma_d.adjuster.gamma) == (0.8, 1.2)
    planes = torch.rand(9, 16, 16)
    noise = RandPlaneGaussianNoise(prob=1.0)
    noise.set_random_state(0)
    added = torch.as_tensor(noise(planes)) - planes
    assert 0.015 < float(added.std()) < 0.025
