"""Benchmark: the deploy app's writers (TID 1500 SR, PDF report, Secondary Capture montages), CPU.

Builds in memory, with pydicom, the headers of a 512 x 512 x 300 CT series (no pixel data: the
writers read headers only) and a :class:`~deploy_app.findings.SeriesResult` with 5 nodules (the
full vocabulary of semantic findings, attention weights, nine random 224 x 224 planes each) and one
skipped seed, then times each writer as :meth:`deploy_app.operators.ReportWritersOperator.write_series`
calls it:

- ``SR``: :func:`deploy_app.sr.build_measurement_report` (every CT header as input);
- ``PDF``: :func:`deploy_app.report.render_report_pdf`;
- ``encapsulated PDF``: :func:`deploy_app.report.encapsulated_pdf` (references every CT instance);
- ``SC``: :func:`deploy_app.report.secondary_capture`, one montage per nodule;
- ``serialise``: writing the SR, then the encapsulated PDF and the SC images, to memory as
  :func:`deploy_app.dicom_io.write_dataset` writes them to files (``prepare_for_writing``, then
  ``dcmwrite``).

Each is repeated ``--repeats`` times; the median is reported (one warm-up call first, so imports and
font caches are not timed). The load average is printed so numbers from a busy machine can be
recognised. Then, outside the total, what the writers' choices are worth: the SR's size and element
count and the share of its CT evidence references (an SR referencing one instance, subtracted),
the SR with highdicom's own document constructor (which copies and searches the content tree), and
the PDF with reportlab's default ASCII85 streams.

Last, the writers' share of the model's time: every fold of a random-weight ``--model-name``
(ViT-B-32-quickgelu, exported and loaded as the deploy app loads it) on the same nodules' planes,
timed in the same process (``--no-model`` skips it). The issue's budget: the writers' total under
10 % of the model time for 5 nodules and 5 folds.

Usage::

    .venv/bin/python bench/bench_writers.py [--slices 300] [--nodules 5] [--folds 5] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from benchlib import median_seconds
from deploy_app import sr as sr_module
from deploy_app.dicom_io import prepare_for_writing
from deploy_app.findings import ModelInfo, NoduleResult, NoduleSeed, SeriesResult, SkippedSeed
from deploy_app.report import encapsulated_pdf, render_report_pdf, secondary_capture
from deploy_app.report import pdf as pdf_module
from deploy_app.sr import build_measurement_report
from scripts.vocabulary import FEATURES


def ct_headers(slices: int, rows: int = 512, columns: int = 512) -> list:
    """Headers of one axial CT series (0.7 x 0.7 x 1.0 mm), as the app's loader would give them."""
    study, series, frame = (generate_uid(entropy_srcs=["bench-writers", part]) for part in "abc")
    headers = []
    for k in range(slices):
        ds = pydicom.Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench-writers", "instance", str(k)])
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID = "Bench^Writers", "BENCH"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.StudyDescription, ds.SeriesDescription = "Synthetic chest CT", "Bench CT"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, k + 1
        ds.BodyPartExamined, ds.PatientPosition = "CHEST", "FFS"
        ds.Manufacturer = "bench"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-179.0, -179.0, -400.0 + k]
        ds.SliceLocation = -400.0 + k
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        headers.append(ds)
    return headers


def series_result(nodules: int, slices: int) -> SeriesResult:
    """``nodules`` analysed nodules spread through the scan (full findings, random planes) + 1 skipped."""
    rng = np.random.default_rng(0)
    results = []
    for n in range(nodules):
        z = -400.0 + (n + 0.5) * slices / nodules
        semantic = {}
        for feature in FEATURES:
            raw = rng.uniform(0.1, 1.0, len(feature.values))
            semantic[feature.column] = {
                v.name: float(p) for v, p in zip(feature.values, raw / raw.sum(), strict=True)
            }
        attention = rng.dirichlet(np.ones(9))
        results.append(
            NoduleResult(
                seed=NoduleSeed(
                    (float(rng.uniform(-100, 100)), float(rng.uniform(-80, 60)), z),
                    f"Nodule {n + 1}",
                    "bench",
                ),
                malignancy=float(rng.uniform()),
                malignancy_per_fold=tuple(float(v) for v in rng.uniform(size=5)),
                semantic=semantic,
                attention=tuple(float(w) for w in attention),
                planes=rng.uniform(0.0, 1.0, (9, 224, 224)).astype(np.float32),
            )
        )
    skipped = SkippedSeed(NoduleSeed((0.0, 0.0, 999.0), "Nodule X", "bench"), "seed lies outside the scan")
    model = ModelInfo("lung_nodule_ct_semantic_clip", "0.1.0", 5, calibrated=False, untrained_demo=True)
    return SeriesResult(nodules=tuple(results), skipped=(skipped,), model=model)


@contextlib.contextmanager
def _replaced(module: object, name: str, replacement: object) -> Iterator[None]:
    """``module.name`` is ``replacement`` inside the block (to time the alternative a writer avoids)."""
    saved = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _highdicom_document(root: hd.sr.ContainerContentItem, **attributes: object) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(content=root, **attributes)


def model_seconds(model_name: str, folds: int, nodules: int, repeats: int) -> float:
    """Median time of every fold's forward pass on ``nodules`` nodules' nine planes (CPU)."""
    import torch

    from scripts.export import export_torchscript, load_exported
    from scripts.network import SemanticCLIP

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        path = export_torchscript(
            SemanticCLIP(model_name, pretrained=None, tuning="lora"), Path(tmp) / "model.ts"
        )
        predictors = [load_exported(path, "cpu")[0] for _ in range(folds)]
    planes = torch.rand(nodules, 9, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        with torch.no_grad():
            for predictor in predictors:
                predictor(planes)

    seconds, _ = median_seconds(forward, repeats)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--nodules", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--model-name", default="ViT-B-32-quickgelu")
    parser.add_argument("--no-model", action="store_true", help="do not time the model")
    args = parser.parse_args()

    headers = ct_headers(args.slices)
    result = series_result(args.nodules, args.slices)
    reference = headers[0]

    def pdf() -> bytes:
        return render_report_pdf(
            result,
            study_description="Synthetic chest CT",
            series_description="Bench CT",
            study_date="20250101",
        )

    timings: dict[str, float] = {}
    timings["SR"], sr = median_seconds(lambda: build_measurement_report(headers, result), args.repeats)
    timings["PDF"], document = median_seconds(pdf, args.repeats)
    timings["encapsulated PDF"], wrapped = median_seconds(
        lambda: encapsulated_pdf(document, reference, title="Bench report", source_datasets=headers),
        args.repeats,
    )
    timings[f"SC ({args.nodules} montages)"], images = median_seconds(
        lambda: secondary_capture(result, reference), args.repeats
    )

    def serialise(datasets: tuple) -> int:
        size = 0
        for ds in datasets:
            buffer = io.BytesIO()
            prepare_for_writing(ds)
            pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            size += buffer.tell()
        return size

    timings["serialise SR"], sr_size = median_seconds(lambda: serialise((sr,)), args.repeats)
    timings["serialise PDF + SC"], size = median_seconds(lambda: serialise((wrapped, *images)), args.repeats)
    size += sr_size
    print(
        f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; {args.slices} CT headers, "
        f"{args.nodules} nodules, median of {args.repeats}; {size / 1e6:.1f} MB of DICOM"
    )
    for name, seconds in timings.items():
        print(f"  {name:<28} {seconds:8.3f} s")
    print(f"  {'total':<28} {sum(timings.values()):8.3f} s")

    # what the writers' design choices are worth, on the same inputs (not part of the total)
    one_sr_time, one_sr = median_seconds(lambda: build_measurement_report(headers[:1], result), args.repeats)
    one_write, one_size = median_seconds(lambda: serialise((one_sr,)), args.repeats)
    build, write = timings["SR"] - one_sr_time, timings["serialise SR"] - one_write
    print(
        f"  SR evidence of {args.slices} CT instances: {(sr_size - one_size) / 1e3:.0f} kB, "
        f"{build:.3f} s to build, {write:.3f} s to write; "
        f"SR {sr_size / 1e3:.0f} kB, {sum(1 for _ in sr.iterall())} elements"
    )
    with _replaced(sr_module, "comprehensive_3d_sr_without_tree_copy", _highdicom_document):
        highdicom_sr, _ = median_seconds(lambda: build_measurement_report(headers, result), args.repeats)
    print(f"  SR with highdicom's document constructor (tree copied and searched): {highdicom_sr:.3f} s")
    with _replaced(pdf_module, "_binary_streams", contextlib.nullcontext):
        ascii85_pdf, _ = median_seconds(pdf, args.repeats)
    print(f"  PDF with reportlab's default ASCII85 streams: {ascii85_pdf:.3f} s")
    if not args.no_model:
        model = model_seconds(args.model_name, args.folds, args.nodules, max(1, min(args.repeats, 3)))
        total = sum(timings.values())
        print(
            f"  model: {args.folds} folds of {args.model_name} on {args.nodules} nodules: {model:.3f} s; "
            f"writers' total {total:.3f} s = {100 * total / model:.1f} % of the model time"
        )


if __name__ == "__main__":
    main()
