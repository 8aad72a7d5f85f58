"""A small phantom CT study as a PACS would send it: a DICOM CT series plus a seeds SR.

Used by ``make demo``, the deploy app's tests and the PACS integration test. The study is rendered by
the phantom renderer of ``training.phantoms`` (textured lung, vessels) with parametric nodules of
different looks; each seed is the world centroid of its rendered nodule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from deploy_app.dicom_io import write_dataset
from deploy_app.findings import NoduleSeed
from deploy_app.sr import build_seed_sr
from training.dicom_ct import CTGeometry, SyntheticPatient, WrittenSeries, write_ct_series
from training.phantom_nodules import ParametricNodule, PlacedNodule, parametric_mask
from training.phantom_render import render_scene

DEMO_GEOMETRY = CTGeometry(
    shape=(64, 160, 160), pixel_spacing=(0.75, 0.75), slice_spacing=2.0, origin_lps=(-60.0, -40.0, -180.0)
)


@dataclass(frozen=True)
class DemoStudy:
    """What :func:`write_demo_study` wrote."""

    series: WrittenSeries
    seeds: tuple[NoduleSeed, ...]
    seed_sr: Path | None


#: The looks of the demo nodules, in order: large spiculated solid, small smooth, part-solid lobulated, ...
DEMO_NODULES = (
    ParametricNodule(diameter_mm=18.0, shape="irregular", margin="spiculated"),
    ParametricNodule(diameter_mm=6.0, shape="round", margin="smooth"),
    ParametricNodule(diameter_mm=12.0, shape="ovoid", margin="lobulated", consistency="Part-solid"),
    ParametricNodule(diameter_mm=9.0, shape="round", margin="smooth", calcification="central"),
)


def _render(
    geometry: CTGeometry, centres_lps: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The HU volume (slice, row, column) and each nodule's seed (world centroid of its mask)."""
    placed = []
    for centre, spec in zip(centres_lps, DEMO_NODULES, strict=False):
        mask = parametric_mask(spec, geometry.spacing_krc, rng)
        corner = np.rint(geometry.lps_to_index(centre) - np.argwhere(mask).mean(axis=0)).astype(int)
        placed.append(PlacedNodule(mask, tuple(int(c) for c in corner), spec.look).clipped(geometry.shape))
    scene = render_scene(geometry, placed, rng)
    return scene.volume, [nodule.centroid_lps(geometry) for nodule in placed]


def write_demo_study(
    folder: str | Path,
    *,
    seed: int = 7,
    n_nodules: int = 3,
    geometry: CTGeometry = DEMO_GEOMETRY,
    seed_sr: bool = True,
    seeds_csv: bool = False,
    patient_id: str = "PHANTOM-DEMO",
) -> DemoStudy:
    """Write ``folder/ct/`` (DICOM CT) and, with ``seed_sr``, ``folder/seeds_sr.dcm`` (TID 1500 seeds).

    Args:
        folder: created if needed; must not contain a ``ct`` folder yet.
        seed: random seed of positions, sizes, texture and UIDs.
        n_nodules: 1 to 4 nodules (the first ``n_nodules`` of :data:`DEMO_NODULES`), well inside the scan.
        geometry: the CT grid.
        seed_sr: also write the seeds SR (else the caller provides seeds).
        seeds_csv: also write ``folder/seeds.csv`` (``x,y,z,label``, world LPS mm), seeds that do not
            depend on any UID of the study.
        patient_id: synthetic PatientID.

    Returns:
        the series, the seeds (world LPS, nodule centres) and the SR path.
    """
    if not 1 <= n_nodules <= 4:
        raise ValueError("n_nodules must be 1 to 4")
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    extent = np.array(geometry.shape, dtype=np.float64)
    index = rng.uniform(0.3 * extent, 0.7 * extent, size=(n_nodules, 3))
    # spread the nodules along the slices so they do not overlap
    index[:, 0] = np.linspace(0.3, 0.7, n_nodules) * (extent[0] - 1) if n_nodules > 1 else index[:, 0]
    volume, centres = _render(geometry, geometry.index_to_lps(index), rng)
    series = write_ct_series(
        volume,
        geometry,
        folder / "ct",
        patient=SyntheticPatient(patient_id),
        uid_seed=f"demo-{seed}",
        series_description="Phantom chest CT (demo)",
    )
    seeds = tuple(
        NoduleSeed(
            position_lps=tuple(float(v) for v in centre),
            label=f"Nodule {n + 1}",
            source="demo phantom",
            frame_of_reference_uid=series.frame_of_reference_uid,
        )
        for n, centre in enumerate(centres)
    )
    if seeds_csv:
        rows = "".join(f"{x},{y},{z},{seed.label}\n" for seed in seeds for x, y, z in [seed.position_lps])
        (folder / "seeds.csv").write_text("x,y,z,label\n" + rows)
    sr_path = None
    if seed_sr:
        headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in series.files]
        sr_path = write_dataset(build_seed_sr(headers, seeds), folder / "seeds_sr.dcm")
    return DemoStudy(series=series, seeds=seeds, seed_sr=sr_path)
