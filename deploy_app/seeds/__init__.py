"""Nodule seeds of a CT series, read from what came with the study in the input folder.

Sources, in order of precedence (the first that yields at least one usable seed for the CT series
wins; the log names it; :data:`DEFAULT_SOURCES`):

1. **Structured report** (:class:`StructuredReportSeeds`): a Comprehensive 3D SR, Comprehensive SR
   or Enhanced SR of the same study (its StudyInstanceUID, or a study listed in its evidence
   sequences). Every SCOORD3D and SCOORD content item is a point set:

   - SCOORD3D: world coordinates in its Referenced Frame of Reference UID.
   - SCOORD: (column, row) pixel coordinates on the image its SELECTED FROM IMAGE child references,
     which must be an instance of this CT series; they are converted to world LPS with that image's
     ImagePositionPatient, ImageOrientationPatient and PixelSpacing. DICOM image coordinates put
     (0, 0) at the outer top-left corner of the top-left pixel, so that pixel's centre is
     (0.5, 0.5) (PS3.3 C.10.5.1.2 / C.18.6.1.2; highdicom's ``ImageToReferenceTransformer``).
     Points on images of another series are not for this series and are ignored.
   - A point set reduces to one point: POINT itself; CIRCLE its centre (the first point);
     ELLIPSE/ELLIPSOID the mean of their axis end points (exactly the centre);
     MULTIPOINT/POLYLINE/POLYGON the mean of the vertices (a closing vertex that repeats the first
     is dropped).

   All point sets inside one TID 1501 measurement group (container (125007, DCM)) make one seed, at
   the mean of their points (preferring point sets in the CT's frame of reference); the group's
   Tracking Identifier and Tracking Unique Identifier become the seed's label and tracking UID. A
   point set outside any measurement group is a seed of its own. The SRs this app writes
   (:mod:`deploy_app.sr`) and :func:`deploy_app.sr.build_seed_sr` are read the same way.
2. **Segmentation** (:class:`SegmentationSeeds`): a DICOM SEG of the same study; one seed per
   segment at the centroid of its voxels in world LPS (frame positions from the SEG's per-frame
   Plane Position, orientation and spacing from its functional groups; FRACTIONAL segments are
   weighted by their values). Label: the Segment Label; tracking UID: the segment's Tracking UID.
3. **Seeds file** (:class:`SeedFileSeeds`): ``seeds.csv`` with header ``x,y,z[,label]
   [,series_instance_uid]`` or ``seeds.json`` ``{"seeds": [{"position_lps": [x, y, z], "label":
   "...", "series_instance_uid": "..."}]}``, world LPS millimetres in the CT's frame of reference.
   A row with a series_instance_uid is used only for that series; a row without one for every CT
   series whose files lie in the seeds file's folder or below it.

Seeds whose frame of reference is not the CT series' or that lie outside the scan (the same test as
the bundle's ``SeedROICrop``: the continuous voxel index of the seed within half a voxel of the
voxel-centre grid) become :class:`~deploy_app.findings.SkippedSeed` items: the seed's ``source``
names the file and item, the ``reason`` what is wrong. Seeds repeated by several files (same
tracking UID, or the same position within 0.001 mm) are kept once.

Non-DICOM files in the input folder are ignored. :class:`SeedSource` is the protocol of a source, so
that an automatic nodule detector can be added in front of (or after) these.
"""

from deploy_app.limits import MAX_SEEDS_PER_SERIES
from deploy_app.seeds.checks import MAX_LABEL_CHARACTERS, check_seeds, find_seeds
from deploy_app.seeds.ct_series import CTSeriesInfo, ImagePlane
from deploy_app.seeds.sources import (
    DEFAULT_SOURCES,
    SEED_FILE_NAMES,
    SEGMENTATION_STORAGE_CLASSES,
    SR_STORAGE_CLASSES,
    SeedFileSeeds,
    SeedSource,
    SegmentationSeeds,
    StructuredReportSeeds,
    read_seeds_csv,
    read_seeds_json,
    segment_centroids,
)

__all__ = [
    "DEFAULT_SOURCES",
    "MAX_LABEL_CHARACTERS",
    "MAX_SEEDS_PER_SERIES",
    "SEED_FILE_NAMES",
    "SEGMENTATION_STORAGE_CLASSES",
    "SR_STORAGE_CLASSES",
    "CTSeriesInfo",
    "ImagePlane",
    "SeedFileSeeds",
    "SeedSource",
    "SegmentationSeeds",
    "StructuredReportSeeds",
    "check_seeds",
    "find_seeds",
    "read_seeds_csv",
    "read_seeds_json",
    "segment_centroids",
]
