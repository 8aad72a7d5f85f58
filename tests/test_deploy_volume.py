"""Series geometry checks of the deploy app (deploy_app.volume)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import pixel_array

from deploy_app.volume import (
    CT_IMAGE_STORAGE,
    UndecodableSlice,
    _native_pixels,
    check_plausible_hu,
    check_series_geometry,
    rescale_to_hu,
    stored_values_releasing_pixel_data,
    to_meta_tensor,
)
from scripts.errors import UserInputError
from scripts.transforms import LoadCT
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

GEOMETRY = CTGeometry(
    shape=(20, 12, 10), pixel_spacing=(0.7, 0.8), slice_spacing=2.5, origin_lps=(-20.0, 5.0, -90.0)
)


def headers(
    geometry: CTGeometry = GEOMETRY, positions: np.ndarray | None = None, overrides: dict | None = None
) -> list[pydicom.Dataset]:
    positions = geometry.slice_positions() if positions is None else positions
    datasets = []
    for k, position in enumerate(positions):
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = "1.2"
        ds.SeriesInstanceUID = "1.2.3"
        ds.SeriesNumber = 3
        ds.SeriesDescription = "test"
        ds.SOPInstanceUID = f"1.2.3.{k}"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = list(geometry.pixel_spacing)
        ds.Rows, ds.Columns = geometry.shape[1], geometry.shape[2]
        for keyword, value in (overrides or {}).get(k, {}).items():
            setattr(ds, keyword, value)
        datasets.append(ds)
    return datasets


def test_geometry_matches_the_writer_whatever_the_slice_order() -> None:
    shuffled = headers()
    np.random.default_rng(0).shuffle(shuffled)
    geometry = check_series_geometry(shuffled)
    assert geometry.shape == GEOMETRY.shape
    assert [d.InstanceNumber for d in geometry.datasets] == list(range(1, 21))
    index_krc = np.array([[0, 0, 0], [3, 5, 7], [19, 11, 9]], dtype=float)
    index_crk = np.concatenate([index_krc[:, ::-1], np.ones((3, 1))], axis=1)
    np.testing.assert_allclose(
        (geometry.voxel_to_lps @ index_crk.T).T[:, :3], GEOMETRY.index_to_lps(index_krc)
    )


def test_meta_tensor_equals_the_bundle_loader(tmp_path) -> None:
    volume = np.random.default_rng(1).integers(-1000, 400, size=GEOMETRY.shape).astype(np.int16)
    series = write_ct_series(volume, GEOMETRY, tmp_path / "ct", patient=SyntheticPatient("T1"), uid_seed="v")
    datasets = [pydicom.dcmread(f) for f in series.files]
    geometry = check_series_geometry(datasets)
    ours = to_meta_tensor(np.stack([d.pixel_array for d in geometry.datasets]).astype(np.float32), geometry)
    bundle = LoadCT()(str(series.directory))
    assert ours.shape == bundle.shape
    torch.testing.assert_close(ours.as_tensor(), bundle.as_tensor().float())
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(bundle.affine), atol=1e-4)


@pytest.fixture
def written_slices(tmp_path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    volume = np.random.default_rng(2).integers(-1000, 400, size=GEOMETRY.shape).astype(np.int16)
    series = write_ct_series(volume, GEOMETRY, tmp_path / "ct", patient=SyntheticPatient("T2"), uid_seed="s")
    return volume, check_series_geometry([pydicom.dcmread(f) for f in series.files]).datasets


@pytest.mark.parametrize("bits_stored", [16, 12], ids=["read from the bytes", "decoded by pydicom"])
def test_stored_values_are_the_slices_and_their_pixel_data_is_released(written_slices, bits_stored) -> None:
    volume, datasets = written_slices
    for dataset in datasets:
        dataset.BitsStored, dataset.HighBit = bits_stored, bits_stored - 1
    assert (_native_pixels(datasets[0]) is not None) == (bits_stored == 16)
    expected = np.stack([pixel_array(d) for d in datasets])
    stored = stored_values_releasing_pixel_data(datasets)
    np.testing.assert_array_equal(stored, expected)
    assert stored.dtype == expected.dtype
    slope, intercept = float(datasets[0].RescaleSlope), float(datasets[0].RescaleIntercept)
    np.testing.assert_array_equal(rescale_to_hu(stored, slope, intercept), volume)
    assert not any("PixelData" in d for d in datasets)
    assert all(d._pixel_array is None for d in datasets)  # and no decoded copy was kept


def test_an_undecodable_slice_is_the_one_named(written_slices) -> None:
    _, datasets = written_slices
    datasets[6].PixelData = datasets[6].PixelData[:100]
    with pytest.raises(UndecodableSlice) as raised:
        stored_values_releasing_pixel_data(datasets)
    assert raised.value.dataset is datasets[6]
    assert raised.value.__cause__ is not None


def every(override: dict) -> dict[int, dict]:
    return {k: override for k in range(GEOMETRY.shape[0])}


def _moved(k: int, dz: float) -> np.ndarray:
    positions = GEOMETRY.slice_positions()
    positions[k:, 2] += dz
    return positions


@pytest.mark.parametrize(
    ("datasets", "expected"),
    [
        (headers()[:5], r"5 slice\(s\); at least 16"),
        (
            headers(overrides={k: {"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]} for k in range(20)}),
            "not axial",
        ),
        (
            headers(positions=np.concatenate([GEOMETRY.slice_positions(), GEOMETRY.slice_positions()[-1:]])),
            "duplicate slices",
        ),
        (headers(positions=np.delete(GEOMETRY.slice_positions(), 7, axis=0)), "missing slice"),
        (headers(positions=_moved(9, 0.6)), "uneven slice spacing"),
        (headers(overrides={4: {"PixelSpacing": [0.5, 0.5]}}), "PixelSpacing differs"),
        (headers(overrides={4: {"Rows": 64}}), "Rows/Columns differ"),
        (headers(overrides={2: {"ImagePositionPatient": [1.0, 2.0]}}), "no valid ImagePositionPatient"),
        (
            headers(overrides=every({"ImageOrientationPatient": [1.01, 0, 0, 0, 1, 0]})),
            "not two unit vectors",
        ),
        (headers(overrides=every({"ImageOrientationPatient": [1, 0, 0, 0.1, 0.995, 0]})), "not orthogonal"),
        (headers(overrides=every({"PixelSpacing": [0.0, 0.8]})), r"PixelSpacing \[0.0, 0.8\] must be"),
        (headers(overrides=every({"PixelSpacing": [0.7, -0.8]})), "PixelSpacing .* must be two positive"),
        (headers(overrides=every({"PixelSpacing": ["nan", 0.8]})), "no valid PixelSpacing"),
        (headers(overrides=every({"RescaleSlope": "nan"})), "instance 1 has RescaleSlope 'nan'"),
        (headers(overrides={7: {"RescaleIntercept": "inf"}}), "instance 8 has RescaleIntercept 'inf'"),
        (headers(overrides={3: {"RescaleSlope": 1000}}), "RescaleSlope '1000.0'.* at most 100"),
        (headers(overrides={3: {"RescaleSlope": 0}}), "instance 4 has RescaleSlope 0"),
        (headers(overrides={5: {"SOPInstanceUID": "1.2.3.4"}}), "instances 5 and 6 share the SOPInstanceUID"),
    ],
    ids=[
        *("too-few", "sagittal", "duplicate", "missing", "uneven", "spacing", "matrix", "no-position"),
        *("orientation-not-unit", "orientation-not-orthogonal", "spacing-zero", "spacing-negative"),
        *("spacing-nan", "slope-nan", "intercept-inf-one-slice", "slope-absurd", "slope-zero"),
        "same-sop-uid-elsewhere",
    ],
)
def test_bad_series_are_named_with_the_problem(datasets, expected) -> None:
    with pytest.raises(UserInputError, match=expected) as error:
        check_series_geometry(datasets)
    assert "series 3 'test' (1.2.3)" in str(error.value)


@pytest.mark.parametrize(
    ("dtype", "values", "slope", "intercept", "expected_dtype"),
    [
        (np.uint16, [0, 1024, 4095], 1.0, -1024.0, np.int16),  # unsigned storage, the usual CT rescale
        (np.int16, [-2000, 0, 3000], 1.0, 0.0, np.int16),
        (np.int16, [-32000, 100], 1.0, -1000.0, np.float32),  # would overflow int16
        (np.uint16, [0, 7, 4095], 0.5, -1024.0, np.float32),  # fractional slope
    ],
)
def test_rescale_to_hu_equals_the_float64_rescale(dtype, values, slope, intercept, expected_dtype) -> None:
    stored = np.array(values, dtype=dtype)
    expected = stored.astype(np.float64) * slope + intercept
    hu = rescale_to_hu(stored.copy(), slope, intercept)
    assert hu.dtype == expected_dtype
    np.testing.assert_array_equal(hu.astype(np.float64), expected)


@pytest.mark.parametrize("median_hu", [-1000.0, -300.0, 2500.0])
def test_a_plausible_ct_passes_the_hu_check(median_hu: float) -> None:
    check_plausible_hu(np.full((4, 8, 8), median_hu, dtype=np.float32), "series 3")


@pytest.mark.parametrize("median_hu", [-2000.0, 64536.0 - 1024.0, np.inf])
def test_misread_pixel_values_are_refused(median_hu: float) -> None:
    with pytest.raises(UserInputError, match="series 3: the median voxel is .* PixelRepresentation"):
        check_plausible_hu(np.full((4, 8, 8), median_hu, dtype=np.float32), "series 3")
