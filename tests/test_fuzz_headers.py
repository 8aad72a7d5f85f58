"""Header fuzzing: mutated CT headers are analysed or refused per series with a message, never a crash.

A seeded generator (:func:`mutations`) edits a small CT series at the byte level, as a sender
could: wrong VRs (the same bytes read as another type, or the numbers re-encoded), missing, empty or
extra elements, too few or too many values, NaN and inf, huge and tiny numbers, text that is no
number, and odd strings in UIDs and text (``..``, ``/abs/path``, ``a/b``, ``''``, 65 characters,
non-ASCII, NUL, backslash, 10,000 characters), on one slice or on all of them, sometimes two at once.
The mutated files are read back by pydicom, so every value reaches the app exactly as from a file.

Two targets:

- in process, writing nothing (:func:`analyse_in_process`): the app's own per-series chain, the
  SDK-series-to-volume operator's :meth:`~deploy_app.operators.SeriesVolumesOperator.series_volume`
  (localizer filter, geometry, UID, rescale and HU checks, the SDK's slice sorting and the voxels),
  then :meth:`~deploy_app.seeds.CTSeriesInfo.from_geometry`, an image plane and
  :func:`~deploy_app.seeds.find_seeds` with seeds inside, outside and not finite;
- end to end (:func:`run_app_case`): :func:`deploy_app.app.process_folder` with the tiny untrained
  bundle, checking that the output folder holds only result folders named by valid UIDs and that
  nothing appears or changes outside it.

An outcome is ``analysed``, ``skipped`` (a localizer-only series) or ``refused`` (a
:class:`~deploy_app.volume.SeriesFailure`, or a UserInputError where the operator turns it into
one) whose message names the series or the instance; anything else is a ``bug``. The default test
runs :data:`CI_MUTATIONS` mutations in process and :data:`CI_APP_CASES` end to end;
``bench/bench_fuzz.py`` runs 10,000 and prints the outcome table.

One file on purpose, at about a thousand lines: the generator, the targets, the outcome classes and
the regression cases they found are read together (each regression names the attack that found it),
and the benchmark imports the same generator from here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import shutil
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR, tag_for_keyword

from scripts.errors import UserInputError, find_user_error
from training.dicom_ct import CTGeometry, SyntheticPatient, write_ct_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

#: Mutations the default test runs in process, and mutated studies it runs end to end.
CI_MUTATIONS = 1_000
CI_APP_CASES = 4
#: Seed of the default test's stream (the bench uses the same one: its first 1,000 are these).
FUZZ_SEED = 20250101

#: The in-process series: few slices of a few pixels, so that a mutation costs milliseconds.
FUZZ_GEOMETRY = CTGeometry(
    shape=(6, 8, 8), pixel_spacing=(0.7, 0.8), slice_spacing=2.5, origin_lps=(-20.0, 5.0, -90.0)
)
FUZZ_MIN_SLICES = 4

# --------------------------------------------------------------------------------------------------
# the byte-level slice model
# --------------------------------------------------------------------------------------------------

_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_BINARY_FORMATS = {"US": "H", "SS": "h", "UL": "I", "SL": "l", "FL": "f", "FD": "d", "AT": "I"}
_ZERO_PADDED_VRS = frozenset({"UI", "OB", "UN", "OW", *_BINARY_FORMATS})
_MAX_SHORT_LENGTH = 0xFFFE


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)


@dataclass
class SliceFile:
    """One slice file as bytes: the head (preamble, ``DICM``, file meta) and the data set's elements.

    Attributes:
        head: everything before the data set, copied as it is.
        elements: tag -> (VR, value bytes), explicit VR little endian.
    """

    head: bytes
    elements: dict[int, tuple[str, bytes]]

    @classmethod
    def parse(cls, data: bytes) -> SliceFile:
        """Split a file written with its file meta group length (as ``write_ct_series`` writes)."""
        if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
            raise ValueError("expected a DICOM file with a File Meta Information Group Length")
        meta_end = 144 + struct.unpack("<I", data[140:144])[0]
        elements, position = {}, meta_end
        while position < len(data):  # explicit VR little endian, no sequences (a CT slice's header)
            group, element = struct.unpack("<HH", data[position : position + 4])
            vr = data[position + 4 : position + 6].decode("ascii")
            if vr in _LONG_LENGTH_VRS:
                (length,) = struct.unpack("<I", data[position + 8 : position + 12])
                position += 12
            else:
                (length,) = struct.unpack("<H", data[position + 6 : position + 8])
                position += 8
            if vr == "SQ" or length == 0xFFFFFFFF:
                raise ValueError("sequences are not supported")
            elements[group << 16 | element] = (vr, data[position : position + length])
            position += length
        return cls(head=data[:meta_end], elements=elements)

    def copy(self) -> SliceFile:
        return SliceFile(self.head, dict(self.elements))

    def encode(self) -> bytes:
        """The file's bytes: the head, then every element in tag order."""
        parts = [self.head]
        for tag in sorted(self.elements):
            vr, value = self.elements[tag]
            if len(value) % 2:
                value += b"\0" if vr in _ZERO_PADDED_VRS else b" "
            if vr not in _LONG_LENGTH_VRS and len(value) > _MAX_SHORT_LENGTH:
                vr = "UN"  # a 16-bit length cannot hold it: a sender would have to use UN
            head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
            if vr in _LONG_LENGTH_VRS:
                head += b"\0\0" + struct.pack("<I", len(value))
            else:
                head += struct.pack("<H", len(value))
            parts.append(head + value)
        return b"".join(parts)


def text_value(values: str | Sequence[str]) -> bytes:
    """A text value (several values joined by backslash) as UTF-8 bytes; lone surrogates are raw bytes."""
    joined = values if isinstance(values, str) else "\\".join(values)
    return joined.encode("utf-8", "surrogateescape")


def binary_value(vr: str, numbers: Sequence[float]) -> bytes:
    """``numbers`` packed little endian as ``vr`` (US, SS, UL, SL, FL, FD, AT), wrapped to its range."""
    code = _BINARY_FORMATS[vr]
    if code in "fd":
        return struct.pack("<" + code * len(numbers), *(float(n) for n in numbers))
    bits = struct.calcsize(code) * 8
    wrapped = []
    for number in numbers:
        integer = int(number) if math.isfinite(number) else 0
        integer %= 1 << bits
        if code.islower() and integer >= 1 << (bits - 1):
            integer -= 1 << bits
        wrapped.append(integer)
    return struct.pack("<" + code * len(numbers), *wrapped)


# --------------------------------------------------------------------------------------------------
# the generator
# --------------------------------------------------------------------------------------------------

ABS_PATH_TOKEN = "/abs/path"
ODD_STRINGS = (
    "..",
    ".",
    ABS_PATH_TOKEN,
    "a/b",
    "../../victim",
    "",
    " ",
    "1." + "2" * 63,  # digits and dots, 65 characters
    "1.2.840.ü",
    "Ärztliche Äußerung 肺",
    "1.2\x00",
    "1.2\n",
    " 1.2",
    "1.02",
    "1..2",
    "\\",
    "1.2\\1.3",
    "%s%n{0}",
    "\udcff\udcfe",  # bytes that are not UTF-8
    "x" * 10_000,
    "9" * 70_000,  # longer than a 16-bit length: sent as UN
)
NON_FINITE = ("nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999")
HUGE = ("1e308", "-1e308", "1e16", "9999999999999999", "4294967296", "-2147483649", "1e-320", "-0")
NOT_NUMBERS = (
    "abc",
    "1,5",
    "0x10",
    "--1",
    "1.2.3",
    "",
    " ",
    "+",
    "1_000",
    "١٢",
    "½",
    "1e",
    "None",
    "7" * 10_000,
)

#: keyword -> number of values the base series has (numbers) or None (text).
NUMERIC_TARGETS = {
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
    "PixelSpacing": 2,
    "SliceThickness": 1,
    "SliceLocation": 1,
    "RescaleSlope": 1,
    "RescaleIntercept": 1,
    "Rows": 1,
    "Columns": 1,
    "BitsAllocated": 1,
    "BitsStored": 1,
    "HighBit": 1,
    "PixelRepresentation": 1,
    "SamplesPerPixel": 1,
    "SeriesNumber": 1,
    "InstanceNumber": 1,
    "AcquisitionNumber": 1,
}
UID_TARGETS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    "SOPClassUID",
)
TEXT_TARGETS = (
    "SeriesDescription",
    "PatientName",
    "PatientID",
    "ImageType",
    "Modality",
    "SpecificCharacterSet",
    "PhotometricInterpretation",
    "RescaleType",
)
#: Elements the base series lacks, added by the ``extra_element`` attack, with values to try.
EXTRA_ELEMENTS: dict[str, tuple[str, ...]] = {
    "NumberOfFrames": ("2", "0", "-1", "abc", "1e9", ""),
    "SmallestImagePixelValue": ("0",),
    "PixelPaddingValue": ("-2000", "70000"),
    "ModalityLUTSequence": ("",),
    "VOILUTFunction": ("SIGMOID",),
    "SpacingBetweenSlices": ("-2.5", "nan", "0"),
}
WRONG_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "AT", "OB", "UN", "LO", "CS", "UI", "DS", "IS", "LT", "SQ")
CHARSETS = ("ISO_IR 999", "ISO 2022 IR 87", "GB18030", "ISO_IR 192", "\\", "utf-8", "ISO_IR 100\\ISO_IR 144")
CATEGORIES = (
    "missing",
    "empty",
    "wrong_vr",
    "value_count",
    "non_finite",
    "huge",
    "not_a_number",
    "odd_uid",
    "odd_text",
    "charset",
    "copied_value",
    "extra_element",
    "pixel_data",
)
ALL_TARGETS = (*NUMERIC_TARGETS, *UID_TARGETS, *TEXT_TARGETS, "PixelData")


@dataclass(frozen=True)
class Edit:
    """Set (or, with ``vr`` None, delete) ``keyword`` on the slices ``slices``."""

    keyword: str
    vr: str | None
    value: bytes
    slices: tuple[int, ...]


@dataclass(frozen=True)
class Mutation:
    """One generated case: its index in the stream, its category, a readable summary and the edits."""

    index: int
    category: str
    summary: str
    edits: tuple[Edit, ...]

    def apply(self, base: Sequence[SliceFile], abs_path: str = ABS_PATH_TOKEN) -> list[bytes]:
        """The mutated files; ``/abs/path`` in a value becomes ``abs_path`` (a folder of the test's own)."""
        files = [slice_file.copy() for slice_file in base]
        for edit in self.edits:
            value = edit.value.replace(ABS_PATH_TOKEN.encode(), abs_path.encode("utf-8", "surrogateescape"))
            for index in edit.slices:
                if edit.vr is None:
                    files[index].elements.pop(_tag(edit.keyword), None)
                else:
                    files[index].elements[_tag(edit.keyword)] = (edit.vr, value)
        return [slice_file.encode() for slice_file in files]


def _base_vr(keyword: str) -> str:
    vr = dictionary_VR(keyword)
    return "US" if " or " in vr else vr  # e.g. "US or SS" for PixelPaddingValue


def _numbers_of(base: SliceFile, keyword: str) -> list[float]:
    vr, value = base.elements.get(_tag(keyword), (_base_vr(keyword), b""))
    if vr in _BINARY_FORMATS:
        code = _BINARY_FORMATS[vr]
        count = len(value) // struct.calcsize(code)
        return list(struct.unpack("<" + code * count, value[: count * struct.calcsize(code)]))
    text = value.decode("latin-1").strip(" \0")
    return [float(part) for part in text.split("\\")] if text else []


def _encode_numbers(vr: str, numbers: Sequence[float | str]) -> bytes:
    if vr in _BINARY_FORMATS:
        floats = []
        for number in numbers:
            try:
                floats.append(float(number))
            except ValueError:
                floats.append(0.0)
        return binary_value(vr, floats)
    return text_value([number if isinstance(number, str) else f"{number:g}" for number in numbers])


class _Attacks:
    """The attack of each category, drawing from one ``random.Random``."""

    def __init__(self, rng: random.Random, base: Sequence[SliceFile]) -> None:
        self.rng = rng
        self.base = base

    def slices(self) -> tuple[int, ...]:
        count = len(self.base)
        if self.rng.random() < 0.5:
            return (self.rng.randrange(count),)
        return tuple(range(count))

    def numeric_keyword(self) -> str:
        return self.rng.choice(list(NUMERIC_TARGETS))

    def vr(self, keyword: str) -> str:
        return self.base[0].elements.get(_tag(keyword), (_base_vr(keyword), b""))[0]

    def replace_one_number(self, keyword: str, replacement: str) -> tuple[str, bytes]:
        numbers: list[float | str] = list(_numbers_of(self.base[0], keyword)) or [0.0]
        numbers[self.rng.randrange(len(numbers))] = replacement
        vr = self.vr(keyword)
        if vr in _BINARY_FORMATS and self.rng.random() < 0.5:
            vr = "DS"  # as text, which is what a sender with the wrong dictionary would write
        return vr, _encode_numbers(vr, numbers)

    def missing(self) -> tuple[str, list[Edit]]:
        keyword = self.rng.choice(ALL_TARGETS)
        slices = self.slices()
        return f"{keyword} deleted on {len(slices)} slice(s)", [Edit(keyword, None, b"", slices)]

    def empty(self) -> tuple[str, list[Edit]]:
        keyword = self.rng.choice(ALL_TARGETS)
        slices = self.slices()
        return f"{keyword} empty on {len(slices)} slice(s)", [Edit(keyword, self.vr(keyword), b"", slices)]

    def wrong_vr(self) -> tuple[str, list[Edit]]:
        keyword = self.rng.choice([*NUMERIC_TARGETS, *UID_TARGETS, "ImageType", "SeriesDescription"])
        vr = self.rng.choice([v for v in WRONG_VRS if v != self.vr(keyword)])
        slices = self.slices()
        _, original = self.base[slices[0]].elements[_tag(keyword)]
        if keyword in NUMERIC_TARGETS and self.rng.random() < 0.5:
            value, how = _encode_numbers(vr, _numbers_of(self.base[slices[0]], keyword)), "re-encoded"
        elif self.rng.random() < 0.3:
            cut = self.rng.randrange(1, 8)
            value, how = original[:-cut] if len(original) > cut else original + b"\x01", "bytes cut"
        else:
            value, how = original, "same bytes"
        if vr == "SQ" and self.rng.random() < 0.5:
            value = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(value)) + value  # one item of garbage
        return f"{keyword} as {vr} ({how}) on {len(slices)} slice(s)", [Edit(keyword, vr, value, slices)]

    def value_count(self) -> tuple[str, list[Edit]]:
        keyword = self.numeric_keyword()
        expected = NUMERIC_TARGETS[keyword]
        count = self.rng.choice([c for c in (0, 1, 2, 3, 4, 5, 6, 7, 12, 100) if c != expected])
        numbers = list(_numbers_of(self.base[0], keyword))
        numbers = (numbers * (count // max(len(numbers), 1) + 1))[:count]
        vr = self.vr(keyword)
        slices = self.slices()
        edit = Edit(keyword, vr, _encode_numbers(vr, numbers), slices)
        return f"{keyword} with {count} value(s) on {len(slices)} slice(s)", [edit]

    def _one_number(self, pool: Sequence[str], what: str) -> tuple[str, list[Edit]]:
        keyword = self.numeric_keyword()
        replacement = self.rng.choice(pool)
        vr, value = self.replace_one_number(keyword, replacement)
        slices = self.slices()
        shown = (
            replacement if len(replacement) < 20 else f"{replacement[:10]}... ({len(replacement)} characters)"
        )
        return f"{keyword} with {shown!r} ({what}, {vr}) on {len(slices)} slice(s)", [
            Edit(keyword, vr, value, slices)
        ]

    def non_finite(self) -> tuple[str, list[Edit]]:
        return self._one_number(NON_FINITE, "not finite")

    def huge(self) -> tuple[str, list[Edit]]:
        return self._one_number(HUGE, "extreme")

    def not_a_number(self) -> tuple[str, list[Edit]]:
        return self._one_number(NOT_NUMBERS, "not a number")

    def _odd_string(self, keyword: str) -> tuple[str, list[Edit]]:
        odd = self.rng.choice(ODD_STRINGS)
        if self.rng.random() < 0.2:
            odd = odd + "\\" + self.rng.choice(ODD_STRINGS)  # two values
        slices = self.slices()
        shown = odd if len(odd) < 20 else f"{odd[:10]}... ({len(odd)} characters)"
        return f"{keyword} = {shown!r} on {len(slices)} slice(s)", [
            Edit(keyword, self.vr(keyword), text_value(odd), slices)
        ]

    def odd_uid(self) -> tuple[str, list[Edit]]:
        return self._odd_string(self.rng.choice(UID_TARGETS))

    def odd_text(self) -> tuple[str, list[Edit]]:
        return self._odd_string(self.rng.choice(TEXT_TARGETS))

    def charset(self) -> tuple[str, list[Edit]]:
        charset = self.rng.choice(CHARSETS)
        text = self.rng.choice(["Ärztliche Äußerung 肺", "\udcff\udcfe", "ÿ"])
        slices = self.slices()
        keyword = self.rng.choice(["SeriesDescription", "PatientName", "ImageType"])
        return f"SpecificCharacterSet {charset!r} with {keyword} {text!r} on {len(slices)} slice(s)", [
            Edit("SpecificCharacterSet", "CS", text_value(charset), slices),
            Edit(keyword, self.vr(keyword), text_value(text), slices),
        ]

    def copied_value(self) -> tuple[str, list[Edit]]:
        keyword = self.rng.choice(
            ["SOPInstanceUID", "ImagePositionPatient", "InstanceNumber", "SliceLocation"]
        )
        source, target = self.rng.sample(range(len(self.base)), 2)
        vr, value = self.base[source].elements[_tag(keyword)]
        return f"{keyword} of slice {source} copied to slice {target}", [Edit(keyword, vr, value, (target,))]

    def extra_element(self) -> tuple[str, list[Edit]]:
        keyword = self.rng.choice([*EXTRA_ELEMENTS, "ImageType", "SOPClassUID"])
        if keyword == "ImageType":
            value, vr = text_value(["DERIVED", "SECONDARY", "LOCALIZER"]), "CS"
        elif keyword == "SOPClassUID":
            value, vr = text_value("1.2.840.10008.5.1.4.1.1.2.1"), "UI"  # Enhanced CT
        else:
            value, vr = text_value(self.rng.choice(EXTRA_ELEMENTS[keyword])), _base_vr(keyword)
            if vr in _BINARY_FORMATS:
                value = _encode_numbers(vr, [self.rng.choice([-2000, 70000, 0])])
        slices = self.slices()
        return f"{keyword} {value[:30]!r} added on {len(slices)} slice(s)", [Edit(keyword, vr, value, slices)]

    def pixel_data(self) -> tuple[str, list[Edit]]:
        _, pixels = self.base[0].elements[_tag("PixelData")]
        choice = self.rng.choice(["cut", "empty", "extended", "doubled", "as OB", "as UN", "odd"])
        value, vr = {
            "cut": (pixels[: -2 * self.rng.randrange(1, 8)], "OW"),
            "empty": (b"", "OW"),
            "extended": (pixels + b"\0\0" * self.rng.randrange(1, 8), "OW"),
            "doubled": (pixels * 2, "OW"),
            "as OB": (pixels, "OB"),
            "as UN": (pixels, "UN"),
            "odd": (pixels[:-1], "OW"),
        }[choice]
        slices = self.slices()
        return f"PixelData {choice} on {len(slices)} slice(s)", [Edit("PixelData", vr, value, slices)]


def mutation(seed: int, index: int, base: Sequence[SliceFile]) -> Mutation:
    """Case ``index`` of the stream ``seed``: the same two numbers give the same case, alone or in a run."""
    rng = random.Random(f"header-fuzz:{seed}:{index}")
    attacks = _Attacks(rng, base)
    categories = [rng.choice(CATEGORIES)]
    if rng.random() < 0.2:
        categories.append(rng.choice(CATEGORIES))
    summaries, edits = [], []
    for category in categories:
        summary, more = getattr(attacks, category)()
        summaries.append(f"{category}: {summary}")
        edits.extend(more)
    category = categories[0] if len(categories) == 1 else "combined"
    return Mutation(index=index, category=category, summary="; ".join(summaries), edits=tuple(edits))


def mutations(seed: int, count: int, base: Sequence[SliceFile]) -> Iterator[Mutation]:
    """The first ``count`` cases of the stream ``seed``."""
    return (mutation(seed, index, base) for index in range(count))


def base_series(folder: Path, geometry: CTGeometry = FUZZ_GEOMETRY) -> list[SliceFile]:
    """A small lung-like CT series (-800 HU with a +40 HU blob), written once and parsed."""
    volume = np.full(geometry.shape, -800.0)
    k, r, c = (s // 2 for s in geometry.shape)
    volume[max(k - 1, 0) : k + 1, r - 2 : r + 2, c - 2 : c + 2] = 40.0
    written = write_ct_series(volume, geometry, folder, patient=SyntheticPatient("FUZZ"), uid_seed="fuzz")
    return [SliceFile.parse(path.read_bytes()) for path in written.files]


# --------------------------------------------------------------------------------------------------
# outcomes
# --------------------------------------------------------------------------------------------------

#: Refusal classes, by what the message says (first match wins).
REFUSAL_CLASSES = (
    ("invalid UID", r"not a valid DICOM UID"),
    ("SOP Instance UID used twice", r"share the SOPInstanceUID"),
    ("unreadable header value", r"cannot be read|cannot be converted|unreadable"),
    ("multi-frame", r"multi-frame"),
    ("rescale", r"Rescale(Slope|Intercept)"),
    ("too few slices", r"slice\(s\); at least"),
    ("orientation", r"ImageOrientationPatient"),
    ("pixel spacing", r"PixelSpacing"),
    ("position / slice spacing", r"ImagePositionPatient|duplicate slices|missing slice|uneven slice"),
    ("matrix size", r"Rows|Columns"),
    ("pixel data undecodable", r"pixel data cannot be decoded"),
    ("implausible HU", r"median voxel"),
    ("series identity", r"FrameOfReferenceUID|StudyInstanceUID|SeriesInstanceUID"),
    ("no usable seed", r"no usable nodule seed"),
    ("no CT series", r"no CT series"),
)
#: A refusal must say who: the series (its number/description/UID) or an instance.
_NAMES_WHO = re.compile(r"series|instance", re.IGNORECASE)
#: Longest acceptable refusal message (a hostile 10,000-character value must be cut in it).
MAX_MESSAGE_CHARACTERS = 2_000


@dataclass(frozen=True)
class Outcome:
    """What became of one series of a case.

    Attributes:
        kind: ``analysed``, ``skipped``, ``refused`` or ``bug``.
        reason: the refusal class, or for a bug the exception type and where.
        message: the user message, or the bug's text.
    """

    kind: str
    reason: str = ""
    message: str = ""


def refusal(message: str) -> Outcome:
    """A refusal with its class; a message that names no series or instance, or is huge, is a bug."""
    if not message or not _NAMES_WHO.search(message):
        return Outcome("bug", "message names no series or instance", message)
    name = next((name for name, pattern in REFUSAL_CLASSES if re.search(pattern, message)), "other")
    if len(message) > MAX_MESSAGE_CHARACTERS:
        return Outcome("bug", f"{name} message over {MAX_MESSAGE_CHARACTERS} characters", message[:300])
    return Outcome("refused", name, message)


#: Bugs the fuzzer found and that are not fixed yet (bug reason pattern -> where and why), counted as
#: ``known``. Empty: the four it found outside volume.py and seeds.py (an uncut decoder message, a
#: series without pixel data in mixed formats, a SOP class highdicom does not know, a character set
#: pydicom cannot read) are fixed and have regression tests below.
KNOWN_UNFIXED: dict[str, str] = {}


def known_unfixed(outcome: Outcome) -> str | None:
    """Where a bug the fuzzer finds is known and left to another file, or None."""
    text = f"{outcome.reason}: {outcome.message}"
    return next((where for pattern, where in KNOWN_UNFIXED.items() if re.search(pattern, text)), None)


def bug(error: BaseException, where: str) -> Outcome:
    return Outcome("bug", f"{type(error).__name__} in {where}", f"{type(error).__name__}: {error}"[:500])


@dataclass
class Tally:
    """Counts of outcomes per mutation category, and the first example of every bug kind."""

    cases: Counter = field(default_factory=Counter)
    outcomes: dict[str, Counter] = field(default_factory=dict)
    bugs: dict[str, tuple[Mutation, Outcome]] = field(default_factory=dict)
    known: dict[str, tuple[Mutation, Outcome]] = field(default_factory=dict)

    def add(self, case: Mutation, outcomes: Sequence[Outcome]) -> None:
        self.cases[case.category] += 1
        counter = self.outcomes.setdefault(case.category, Counter())
        for outcome in outcomes:
            kind = outcome.kind
            if kind == "bug" and known_unfixed(outcome):
                kind = "known"
                self.known.setdefault(outcome.reason, (case, outcome))
            elif kind == "bug":
                self.bugs.setdefault(outcome.reason, (case, outcome))
            counter[kind if kind != "refused" else f"refused: {outcome.reason}"] += 1

    def totals(self) -> Counter:
        total: Counter = Counter()
        for counter in self.outcomes.values():
            total.update(counter)
        return total

    def table(self) -> str:
        """Per category: cases, analysed, skipped, refused, bugs; then the refusals by class."""
        lines = [
            f"{'category':<16}{'cases':>7}{'analysed':>10}{'skipped':>9}{'refused':>9}{'known':>7}{'bugs':>6}"
        ]
        for category in sorted(self.cases):
            counter = self.outcomes[category]
            refused = sum(n for kind, n in counter.items() if kind.startswith("refused"))
            lines.append(
                f"{category:<16}{self.cases[category]:>7}{counter['analysed']:>10}{counter['skipped']:>9}"
                f"{refused:>9}{counter['known']:>7}{counter['bug']:>6}"
            )
        totals = self.totals()
        refused = sum(n for kind, n in totals.items() if kind.startswith("refused"))
        lines.append(
            f"{'all':<16}{sum(self.cases.values()):>7}{totals['analysed']:>10}{totals['skipped']:>9}"
            f"{refused:>9}{totals['known']:>7}{totals['bug']:>6}"
        )
        lines.append("refused, by what the message names:")
        for kind, count in sorted(totals.items(), key=lambda item: -item[1]):
            if kind.startswith("refused: "):
                lines.append(f"  {kind[len('refused: ') :]:<34}{count:>7}")
        for label, found in (("KNOWN", self.known), ("BUG", self.bugs)):
            for reason, (case, outcome) in found.items():
                lines.append(f"{label} {reason}: case {case.index} ({case.summary}): {outcome.message[:200]}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the in-process target
# --------------------------------------------------------------------------------------------------


class _FixedSeeds:
    """A seed source without files: one seed at the scan centre, one far outside, one not finite."""

    name = "fuzz seeds (centre, outside, NaN)"

    def find(self, input_dir: Path, ct) -> list:
        from deploy_app.findings import NoduleSeed

        affine = np.asarray(ct.affine_ras, dtype=np.float64)
        centre_ras = affine @ np.array([*((np.asarray(ct.shape, dtype=np.float64) - 1) / 2), 1.0])
        centre = tuple(float(v) for v in centre_ras[:3] * np.array([-1.0, -1.0, 1.0]))
        low, high = ct.extent_lps
        outside = float(high[0] + (high[0] - low[0]) + 1e3)  # beyond the scan whatever its size
        return [
            NoduleSeed(centre, "Centre", "fuzz"),
            NoduleSeed((outside, centre[1], centre[2]), "Outside", "fuzz"),
            NoduleSeed((math.nan, centre[1], centre[2]), "NaN", "fuzz"),
        ]


def sdk_loader():
    """The app's DICOM loader operator (the SDK's, skipping unreadable files) outside a running graph
    (its ``_load_data`` reads file objects)."""
    from monai.deploy.core import Fragment

    from deploy_app.operators import CheckedDICOMDataLoaderOperator

    return CheckedDICOMDataLoaderOperator(
        Fragment(), input_folder=Path("."), must_load=False, name="fuzz_loader"
    )


def series_operator(min_slices: int = FUZZ_MIN_SLICES):
    """The app's series-to-volume operator, outside a running graph."""
    from monai.deploy.core import Fragment

    from deploy_app.operators import SeriesVolumesOperator

    return SeriesVolumesOperator(Fragment(), min_slices=min_slices, name="fuzz_series_to_volume")


def _analyse_series(series, operator, output_root: Path) -> Outcome:
    from deploy_app.seeds import CTSeriesInfo, find_seeds
    from deploy_app.uids import check_uid, path_inside
    from deploy_app.volume import SeriesFailure

    try:
        volume = operator.series_volume(series, "CT")
    except Exception as error:  # series_volume turns user errors into SeriesFailure: none may escape
        return bug(error, "SeriesVolumesOperator.series_volume")
    if volume is None:
        return Outcome("skipped", "localizer")
    if isinstance(volume, SeriesFailure):
        return refusal(volume.message)
    try:  # NoduleSeedsOperator.compute: a UserInputError fails the series
        info = CTSeriesInfo.from_geometry(volume.geometry)
        first = str(volume.geometry.datasets[0].SOPInstanceUID)
        info.planes[first].image_to_world(np.array([[0.5, 0.5]]))
        seeds, skipped, _ = find_seeds(output_root, info, [_FixedSeeds()])
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            return bug(error, "CTSeriesInfo / find_seeds")
        return refusal(f"{volume.description}: {user_error}")
    if [seed.label for seed in seeds] != ["Centre"] or len(skipped) != 2:
        return Outcome("bug", "seed check", f"usable {seeds}, skipped {skipped}")
    try:  # ReportWritersOperator.write_series names the result folder so
        uid = check_uid(volume.geometry.datasets[0].get("SeriesInstanceUID"), "SeriesInstanceUID", "fuzz")
        path_inside(output_root, uid)
    except Exception as error:
        return bug(error, "result folder name of an analysed series")
    return Outcome("analysed")


def analyse_in_process(files: Sequence[bytes], loader, operator, output_root: Path) -> list[Outcome]:
    """Every series of the mutated files through the SDK loader and the app's per-series chain.

    Nothing is written: the files are read from memory.

    Args:
        files: the slice files.
        loader: from :func:`sdk_loader`.
        operator: from :func:`series_operator`.
        output_root: where results would go (only used to check the folder name; never written).

    Returns:
        one outcome per series the SDK loader forms (one ``refused`` when it forms none).
    """
    try:
        studies = loader._load_data([BytesIO(data) for data in files])
    except Exception as error:
        return [bug(error, "the SDK loader (DICOMDataLoaderOperator._load_data)")]
    groups = [series for study in studies for series in study.get_all_series()]
    if not groups:
        return [refusal("no CT series in the input (the SDK loader drops instances it cannot group)")]
    return [_analyse_series(series, operator, output_root) for series in groups]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """pydicom's warnings about invalid values and the app's per-series log lines, silenced."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def fuzz_in_process(
    base: Sequence[SliceFile],
    count: int,
    output_root: Path,
    seed: int = FUZZ_SEED,
    progress: Callable[[int], None] | None = None,
) -> Tally:
    """Run ``count`` mutations of ``base`` in process and tally the outcomes."""
    loader, operator = sdk_loader(), series_operator()
    tally = Tally()
    with quiet():
        for case in mutations(seed, count, base):
            tally.add(case, analyse_in_process(case.apply(base), loader, operator, output_root))
            if progress is not None:
                progress(case.index)
    return tally


# --------------------------------------------------------------------------------------------------
# the end-to-end target
# --------------------------------------------------------------------------------------------------


def snapshot(root: Path, excluded: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` outside ``excluded``: relative path -> (size, mtime in ns)."""
    state = {}
    for path in root.rglob("*"):
        if path == excluded or excluded in path.parents:
            continue
        status = path.lstat()
        state[str(path.relative_to(root))] = (status.st_size, status.st_mtime_ns)
    return state


def run_app_case(case: Mutation, study: Path, work: Path, models) -> list[Outcome]:
    """One mutated study through :func:`deploy_app.app.process_folder` in ``work``.

    ``work`` gets ``in/`` (the study with its CT files mutated), ``out/`` (the output root), a
    marker file beside ``out/`` and ``victim/marker.txt`` where ``/abs/path`` points. Nothing but
    result folders named by valid UIDs may appear in ``out/``, and nothing may change outside it.
    """
    from deploy_app.app import process_folder
    from deploy_app.uids import is_valid_uid

    inputs, output = work / "in", work / "out"
    shutil.copytree(study, inputs)
    (work / "marker.txt").write_text("must survive")
    (work / "victim").mkdir()
    (work / "victim" / "marker.txt").write_text("must survive")
    ct_files = sorted((inputs / "ct").glob("*.dcm"))
    base = [SliceFile.parse(path.read_bytes()) for path in ct_files]
    for path, data in zip(ct_files, case.apply(base, abs_path=str(work / "victim")), strict=True):
        path.write_bytes(data)
    before = snapshot(work, output)
    try:
        with quiet():
            outcome = process_folder(inputs, output, models=models)
    except Exception as error:
        return [bug(error, "process_folder")]
    results: list[Outcome] = [Outcome("analysed") for _ in outcome.written]
    results += [refusal(f"{failure.series}: {failure.message}") for failure in outcome.failures]
    if snapshot(work, output) != before:
        results.append(Outcome("bug", "wrote outside the output root", str(work)))
    entries = sorted(output.iterdir()) if output.is_dir() else []
    stray = [
        p.name for p in entries if not (p.is_dir() and is_valid_uid(p.name) and p.name in outcome.written)
    ]
    if stray or len(entries) != len(outcome.written):
        results.append(Outcome("bug", "unexpected entries in the output root", repr(stray)))
    return results


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> list[SliceFile]:
    return base_series(tmp_path_factory.mktemp("fuzz") / "ct")


def test_the_unmutated_series_is_analysed(base: list[SliceFile], tmp_path: Path) -> None:
    with quiet():
        files = [s.encode() for s in base]
        outcomes = analyse_in_process(files, sdk_loader(), series_operator(), tmp_path / "out")
    assert outcomes == [Outcome("analysed")]


def test_the_stream_is_reproducible_and_covers_every_category(base: list[SliceFile]) -> None:
    first = [mutation(FUZZ_SEED, index, base) for index in range(300)]
    assert first == list(mutations(FUZZ_SEED, 300, base))
    assert {case.category for case in first} == {*CATEGORIES, "combined"}


def test_a_thousand_mutated_headers_are_analysed_or_refused_per_series(
    base: list[SliceFile], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a stray relative write would land here
    tally = fuzz_in_process(base, CI_MUTATIONS, tmp_path / "out")
    print(tally.table())
    assert tally.bugs == {}, tally.table()
    assert sum(tally.cases.values()) == CI_MUTATIONS
    totals = tally.totals()
    assert totals["analysed"] > 0 and sum(n for k, n in totals.items() if k.startswith("refused")) > 0
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def app_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-nodule demo study with its seed in ``seeds.csv`` (independent of every UID)."""
    from demo.study import write_demo_study

    folder = tmp_path_factory.mktemp("fuzz_study") / "in"
    write_demo_study(folder, seed=5, n_nodules=1, seed_sr=False, seeds_csv=True)
    return folder


@pytest.fixture(scope="module")
def app_models(tmp_path_factory: pytest.TempPathFactory):
    from deploy_app.inference import BundleModels
    from training.demo_bundle import build_untrained_bundle

    return BundleModels.load(build_untrained_bundle(tmp_path_factory.mktemp("fuzz_bundle") / "bundle"))


def app_cases(study: Path, count: int, seed: int = FUZZ_SEED) -> list[Mutation]:
    """``count`` cases for the app, spread over the categories (the stream's first of each, in turn)."""
    base = [SliceFile.parse(path.read_bytes()) for path in sorted((study / "ct").glob("*.dcm"))]
    chosen: list[Mutation] = []
    wanted = [CATEGORIES[k % len(CATEGORIES)] for k in range(count)]
    index = 0
    while wanted:
        case = mutation(seed, index, base)
        if case.category in wanted:
            wanted.remove(case.category)
            chosen.append(case)
        index += 1
    return chosen


def test_mutated_studies_end_to_end_write_only_result_folders(
    app_study: Path, app_models, tmp_path: Path
) -> None:
    tally = Tally()
    for case in app_cases(app_study, CI_APP_CASES):
        work = tmp_path / f"case{case.index}"
        work.mkdir()
        tally.add(case, run_app_case(case, app_study, work, app_models))
    print(tally.table())
    assert tally.bugs == {}, tally.table()
    assert sum(tally.cases.values()) == CI_APP_CASES


# --------------------------------------------------------------------------------------------------
# regressions: each bug the fuzzer found, as the attack that found it
# --------------------------------------------------------------------------------------------------

ALL_SLICES = tuple(range(FUZZ_GEOMETRY.shape[0]))


def _case(*edits: Edit) -> Mutation:
    return Mutation(index=-1, category="regression", summary="", edits=edits)


def _text(keyword: str, value: str, vr: str = "DS", slices: tuple[int, ...] = (2,)) -> Edit:
    return Edit(keyword, vr, text_value(value), slices)


REGRESSIONS = {
    # _check_single_frame_ct: a multi-valued SOPClassUID was unhashable; it is not CT Image Storage
    "sop-class-two-values": (
        _text("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2\\1.2", "UI"),
        r"instance 3 has SOPClassUID .*; the app reads CT Image Storage",
    ),
    # check_series_geometry: int(Rows) raised OverflowError / ValueError / TypeError
    "rows-infinite": (_text("Rows", "1e999"), r"instance 3 has Rows '1e\+?999'|instance 3 has Rows 'inf'"),
    "rows-not-a-number": (_text("Rows", "abc", "IS"), r"instance 3 has Rows 'abc'; a CT slice needs"),
    "rows-two-values": (Edit("Rows", "US", binary_value("US", [8, 8]), (2,)), r"instance 3 has Rows .*8.*8"),
    "columns-fraction": (_text("Columns", "7.5"), r"instance 3 has Columns '7.5'; a CT slice needs"),
    "rows-zero-everywhere": (Edit("Rows", "US", binary_value("US", [0]), ALL_SLICES), r"has Rows '0'"),
    # pydicom could not convert the bytes; the error escaped describe_series and the checks
    "slice-thickness-as-fd-odd-length": (
        Edit("SliceThickness", "FD", b"2.5", (2,)),
        r"instance 3: SliceThickness cannot be read \(BytesLengthException",
    ),
    "instance-number-as-fd-odd-length": (
        Edit("InstanceNumber", "FD", b"\x01\x02\x03", (2,)),
        r"instance \?: InstanceNumber cannot be read",
    ),
    "rows-as-sq-garbage": (
        Edit("Rows", "SQ", b"\x08\x00", (2,)),
        r"instance 3: Rows cannot be read",
    ),
    "image-type-as-sq-garbage": (
        Edit("ImageType", "SQ", text_value("ORIGINAL\\PRIMARY\\AXIAL"), (2,)),
        r"instance 3: ImageType cannot be read",
    ),
    "series-number-as-fd-cut": (
        Edit("SeriesNumber", "FD", b"\x01\x02\x03", (2,)),
        r"instance 3: SeriesNumber cannot be read",
    ),
    # text VRs for geometry passed the check, then the SDK's slice sorting multiplied strings
    "orientation-as-ui": (
        Edit("ImageOrientationPatient", "UI", text_value("1\\0\\0\\0\\1\\0"), (2,)),
        r"instance 3 has no valid ImageOrientationPatient",
    ),
    "position-as-lo": (
        Edit("ImagePositionPatient", "LO", text_value("-20\\5\\-85"), (2,)),
        r"instance 3 has no valid ImagePositionPatient",
    ),
    # PixelData twice as long decoded as two frames: to_meta_tensor raised ValueError
    "pixel-data-doubled": ("doubled", r"instance \d+ .*pixel data cannot be decoded.*not Rows x Columns"),
    # hostile values quoted whole in the message
    "rescale-slope-10000-characters": (
        _text("RescaleSlope", "7" * 10_000),
        r"instance 3 has RescaleSlope '7+\.\.\. \(10000 characters\); a CT needs",
    ),
    "position-10000-characters": (
        _text("ImagePositionPatient", "-20\\5\\" + "7" * 10_000),
        r"instance 3 has no valid ImagePositionPatient",
    ),
    # CTSeriesInfo.from_geometry raised ValueError (not a user error): NoduleSeedsOperator crashed
    "frame-of-reference-blank-one-slice": (
        _text("FrameOfReferenceUID", " ", "UI"),
        r"instance 3 has FrameOfReferenceUID '', not one shared by every slice",
    ),
    "frame-of-reference-missing-one-slice": (
        Edit("FrameOfReferenceUID", None, b"", (4,)),
        r"instance 5 has FrameOfReferenceUID 'None', not one shared",
    ),
}

#: Attacks that crashed and now pass: the value is harmless, so the series is analysed.
ANALYSED_REGRESSIONS = {
    # is_localizer: list(int) raised TypeError for an ImageType read as a number
    "image-type-as-us": Edit("ImageType", "US", binary_value("US", [1]), ALL_SLICES),
    # describe_series quoted a 10,000-character description whole (in every message and log line)
    "series-description-10000-characters": _text("SeriesDescription", "x" * 10_000, "LO", ALL_SLICES),
}


@pytest.fixture(scope="module")
def pipeline() -> tuple:
    return sdk_loader(), series_operator()


def _run(case: Mutation, base: list[SliceFile], pipeline: tuple, root: Path) -> list[Outcome]:
    with quiet():
        return analyse_in_process(case.apply(base), *pipeline, root)


@pytest.mark.parametrize("attack", list(REGRESSIONS))
def test_a_found_attack_is_refused_naming_the_tag_and_instance(
    attack: str, base: list[SliceFile], pipeline: tuple, tmp_path: Path
) -> None:
    edit, pattern = REGRESSIONS[attack]
    if edit == "doubled":
        _, pixels = base[0].elements[_tag("PixelData")]
        edit = Edit("PixelData", "OW", pixels * 2, ALL_SLICES)
    [outcome] = _run(_case(edit), base, pipeline, tmp_path)
    assert outcome.kind == "refused", outcome
    assert re.search(pattern, outcome.message), outcome.message
    assert len(outcome.message) < 1_000


@pytest.mark.parametrize("attack", list(ANALYSED_REGRESSIONS))
def test_a_found_harmless_attack_is_analysed(
    attack: str, base: list[SliceFile], pipeline: tuple, tmp_path: Path
) -> None:
    assert _run(_case(ANALYSED_REGRESSIONS[attack]), base, pipeline, tmp_path) == [Outcome("analysed")]


def test_a_long_description_is_cut_where_it_names_the_series(base: list[SliceFile], pipeline: tuple) -> None:
    """The series description shows in every message about the series: 10,000 characters are cut."""
    from deploy_app.volume import check_series_geometry

    files = _case(_text("SeriesDescription", "x" * 10_000, "LO", ALL_SLICES)).apply(base)
    datasets = [pydicom.dcmread(BytesIO(data)) for data in files]
    with pytest.raises(UserInputError, match=r"too few|at least") as raised:
        check_series_geometry(datasets, min_slices=10)
    assert len(str(raised.value)) < 400 and "10000 characters" in str(raised.value)


FIXED_OUTSIDE = {
    "photometric-10000-characters": _text("PhotometricInterpretation", "x" * 10_000, "CS", (2,)),
    "sop-class-unknown-everywhere": _text("SOPClassUID", "1.02", "UI", ALL_SLICES),
    "charset-as-un-70000-bytes": Edit("SpecificCharacterSet", "UN", b"x" * 70_000, ALL_SLICES),
    "no-pixel-data-mixed-formats": (
        Edit("PixelData", None, b"", ALL_SLICES),
        _text("PixelRepresentation", "None", "DS", (0,)),
    ),
}


@pytest.mark.parametrize("attack", list(FIXED_OUTSIDE))
def test_attacks_fixed_in_the_operators(
    attack: str, base: list[SliceFile], pipeline: tuple, tmp_path: Path
) -> None:
    edits = FIXED_OUTSIDE[attack]
    outcomes = _run(_case(*(edits if isinstance(edits, tuple) else (edits,))), base, pipeline, tmp_path)
    assert [outcome.kind for outcome in outcomes] == ["refused"], outcomes
