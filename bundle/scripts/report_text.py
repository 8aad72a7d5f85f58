"""Radiology report text from structured semantic features, with seeded paraphrase augmentation.

The paper turned the structured features into a short report (Findings bullets in random order plus
an Impression) and fed only the Impression to CLIP; the text was augmented with synonym swaps and a
random word crop (p 0.1), applied with probability 0.5. Here the report comes from a deterministic
template (:func:`make_report`) and :class:`ReportText` / :class:`ReportTextd` add the augmentation
as MONAI randomizable transforms. A report given as a file replaces the template when non-empty.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform, Randomizable

from scripts.errors import UserInputError
from scripts.vocabulary import FEATURE_BY_COLUMN, FEATURES, SIZE_COLUMNS, SemanticFeature

__all__ = ["ReportText", "ReportTextd", "impression", "make_report", "read_report_file"]

_LONGEST, _SHORT, _MEAN, _SOLID = SIZE_COLUMNS
_IMPRESSION_RE = re.compile(r"\bimpression\s*:\s*", re.IGNORECASE)
_HEADERS = ("findings:", "impression:")

# Impression order: the most important features first (CLIP reads at most 77 tokens).
_LEAD_COLUMNS = ("nodule_consistency", "nodule_margin_conspicuity")
_MARGIN_COLUMNS = ("nodule_margins", "additional_nodule_margins")
_ATTACHMENT = "pleural_attachment"

# Synonym groups: each entry is (singular, plural); any member may replace any other.
_SYNONYMS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("margin", "margins"), ("border", "borders"), ("boundary", "boundaries")),
    (("attachment", "attachments"), ("adhesion", "adhesions")),
    (("shows", "show"), ("exhibits", "exhibit"), ("demonstrates", "demonstrate"), ("reveals", "reveal")),
    (("nodule", "nodules"), ("lesion", "lesions")),
    (("round", "round"), ("rounded", "rounded")),
    (("irregular", "irregular"), ("complex", "complex")),
    (("measuring", "measuring"), ("sized", "sized")),
)
_SYNONYM_SWAP_PROB = 0.5


def _build_synonym_index() -> tuple[re.Pattern[str], dict[str, tuple[int, int]]]:
    index: dict[str, tuple[int, int]] = {}
    for group_number, group in enumerate(_SYNONYMS):
        for forms in group:
            for form_number, form in enumerate(forms):
                index.setdefault(form, (group_number, form_number))
    words = sorted(index, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE), index


_SYNONYM_RE, _SYNONYM_INDEX = _build_synonym_index()


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _known_values(semantics: Mapping[str, str | None]) -> dict[str, str]:
    """Canonical value of every known feature (missing and empty values dropped)."""
    known: dict[str, str] = {}
    for feature in FEATURES:
        raw = semantics.get(feature.column)
        if _is_missing(raw):
            continue
        canonical = feature.parse(raw, where="semantic features")
        if canonical is not None:
            known[feature.column] = canonical
    return known


def _size(sizes: Mapping[str, float | None] | None, column: str) -> float | None:
    if not sizes:
        return None
    value = sizes.get(column)
    if _is_missing(value):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise UserInputError(f"size '{column}' is not a number: {value!r}") from error
    return number if math.isfinite(number) else None


def _size_phrase(sizes: Mapping[str, float | None] | None) -> str:
    """E.g. "measures 12.3 x 8.1 mm (mean 10.2 mm); solid component 5.0 mm" (empty: no size)."""
    longest, short, mean, solid = (_size(sizes, column) for column in SIZE_COLUMNS)
    parts: list[str] = []
    if longest is not None and short is not None:
        parts.append(f"measures {longest:.1f} x {short:.1f} mm")
    elif longest is not None:
        parts.append(f"measures {longest:.1f} mm")
    if mean is not None:
        parts.append(f"(mean {mean:.1f} mm)" if parts else f"measures {mean:.1f} mm in mean diameter")
    text = " ".join(parts)
    if solid is not None:
        text = (
            f"{text}; solid component {solid:.1f} mm" if text else f"solid component measures {solid:.1f} mm"
        )
    return text


def _join(items: list[str], conjunction: str = "and") -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def _phrase(feature: SemanticFeature, value: str) -> str:
    return feature.value(value).phrases[0]


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def _short(feature: SemanticFeature, value: str) -> str:
    return feature.value(value).impression_phrase


def _impression_text(known: Mapping[str, str], sizes: Mapping[str, float | None] | None) -> str:
    """One to three short sentences, most important feature first."""
    lead = [_short(FEATURE_BY_COLUMN[c], known[c]) for c in _LEAD_COLUMNS if c in known]
    head = f"{', '.join(lead)} nodule" if lead else "pulmonary nodule"
    margins = [_short(FEATURE_BY_COLUMN[c], known[c]) for c in _MARGIN_COLUMNS if c in known]
    if margins:
        head = f"{head} with {_join(margins)} margins"
    clauses = [_upper_first(head)]
    if "nodule_shape" in known:
        clauses.append(f"{_short(FEATURE_BY_COLUMN['nodule_shape'], known['nodule_shape'])} shape")
    diameter = _size(sizes, _MEAN)
    if diameter is None:
        diameter = _size(sizes, _LONGEST)
    if diameter is not None:
        clauses.append(f"measuring {diameter:.1f} mm")
    if _ATTACHMENT in known:
        clauses.append(
            "with pleural attachment" if known[_ATTACHMENT] == "Present" else "without pleural attachment"
        )
    sentences = [", ".join(clauses) + "."]
    present = [
        f.noun
        for f in FEATURES
        if f.is_present_absent and f.column != _ATTACHMENT and known.get(f.column) == "Present"
    ]
    absent = [
        f.noun
        for f in FEATURES
        if f.is_present_absent and f.column != _ATTACHMENT and known.get(f.column) == "Absent"
    ]
    if present:
        sentences.append(f"It shows {_join(present)}.")
    if absent:
        sentences.append(f"No {_join(absent, 'or')}.")
    return " ".join(sentences)


def make_report(
    semantics: Mapping[str, str | None],
    sizes: Mapping[str, float | None] | None = None,
    suspicion: str | None = None,
) -> str:
    """Deterministic report: Findings bullets then an Impression.

    Args:
        semantics: Column -> value (canonical name or alias); ``None``/NaN/"" mean missing.
        sizes: Size column -> millimetres (``None``/NaN mean missing).
        suspicion: Radiologist suspicion, e.g. "Low" (``None``/"" mean missing).

    Returns:
        ``"Findings:\\n- ...\\nImpression: ..."``; the Impression alone names every known feature.

    Raises:
        UserInputError: A semantic value is not allowed for its column.
    """
    known = _known_values(semantics)
    bullets = [f"- {_upper_first(_phrase(FEATURE_BY_COLUMN[c], v))}." for c, v in known.items()]
    size = _size_phrase(sizes)
    if size:
        bullets.append(f"- The nodule {size}." if size.startswith("measures") else f"- The {size}.")
    if not _is_missing(suspicion):
        bullets.append(f"- Level of suspicion for lung cancer: {str(suspicion).strip()}.")
    findings = "\n".join(["Findings:", *bullets]) if bullets else "Findings:\n- Pulmonary nodule."
    return f"{findings}\nImpression: {_impression_text(known, sizes)}"


def impression(text: str) -> str:
    """The Impression part of a report (the whole text when it has no "Impression:" header).

    Args:
        text: A report, e.g. from :func:`make_report` or a report file.

    Returns:
        The text after the last "Impression:" header, whitespace-normalised.
    """
    matches = list(_IMPRESSION_RE.finditer(text))
    part = text[matches[-1].end() :] if matches else text
    return " ".join(part.split())


def read_report_file(report_dir: Path, pid: str, nodule_id: str) -> str | None:
    """Read ``{pid}_{nodule_id}.txt`` from a report folder.

    Args:
        report_dir: Folder of report files.
        pid: Patient id.
        nodule_id: Nodule id within the patient.

    Returns:
        The stripped text, or ``None`` when the file does not exist or is empty.

    Raises:
        UserInputError: ``report_dir`` is not a folder, or the file is not UTF-8 text.
    """
    folder = Path(report_dir)
    if not folder.is_dir():
        raise UserInputError(f"report folder '{folder}' does not exist or is not a folder")
    path = folder / f"{pid}_{nodule_id}.txt"
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise UserInputError(f"report file '{path}' is not UTF-8 text: {error}") from error
    return text or None


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


class ReportText(Randomizable):
    """Report text for one nodule, with optional seeded paraphrase augmentation (array-style twin).

    With probability ``prob`` a call augments: Findings bullets are shuffled, words of the synonym
    groups (margin/border/boundary, attachment/adhesion, shows/exhibits/demonstrates/reveals,
    nodule/lesion, ...) are swapped, and, after the Impression is extracted, each word is dropped
    with probability ``word_crop_prob``. Otherwise the text is the deterministic one.

    Args:
        prob: Probability of augmenting a call (the paper: 0.5 in training, 0 otherwise).
        word_crop_prob: Per-word drop probability of the random word crop.
        impression_only: Return only the Impression (what the paper feeds to CLIP).
    """

    def __init__(self, prob: float = 0.0, word_crop_prob: float = 0.1, impression_only: bool = True) -> None:
        for name, value in (("prob", prob), ("word_crop_prob", word_crop_prob)):
            if not 0.0 <= float(value) <= 1.0:
                raise UserInputError(f"{name} must be within [0, 1], got {value}")
        self.prob = float(prob)
        self.word_crop_prob = float(word_crop_prob)
        self.impression_only = bool(impression_only)
        self._augment = False

    def randomize(self, data: Any = None) -> None:
        """Draw whether the next call augments."""
        self._augment = bool(self.R.random() < self.prob)

    def __call__(
        self,
        semantics: Mapping[str, str | None] | None = None,
        sizes: Mapping[str, float | None] | None = None,
        suspicion: str | None = None,
        report: str | None = None,
        randomize: bool = True,
    ) -> str:
        """Make the text.

        Args:
            semantics: Column -> value; ``None``/NaN/"" mean missing.
            sizes: Size column -> millimetres.
            suspicion: Radiologist suspicion.
            report: A given report; used instead of the template when non-empty.
            randomize: Draw a new augmentation decision first.

        Returns:
            The (possibly augmented) report or Impression text.
        """
        if randomize:
            self.randomize()
        text = report.strip() if isinstance(report, str) and report.strip() else ""
        if not text:
            text = make_report(semantics or {}, sizes, suspicion)
        if self._augment:
            text = self._swap_synonyms(self._shuffle_bullets(text))
        if self.impression_only:
            text = impression(text)
        if self._augment and self.word_crop_prob > 0:
            text = self._crop_words(text)
        return text

    def _shuffle_bullets(self, text: str) -> str:
        lines = text.split("\n")
        out: list[str] = []
        run: list[str] = []
        for line in [*lines, None]:
            if line is not None and line.lstrip().startswith("- "):
                run.append(line)
                continue
            if run:
                order = self.R.permutation(len(run))
                out.extend(run[i] for i in order)
                run = []
            if line is not None:
                out.append(line)
        return "\n".join(out)

    def _swap_synonyms(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            word = match.group(0)
            group_number, form_number = _SYNONYM_INDEX[word.lower()]
            if self.R.random() >= _SYNONYM_SWAP_PROB:
                return word
            group = _SYNONYMS[group_number]
            choice = group[int(self.R.randint(len(group)))][form_number]
            return _match_case(word, choice)

        return _SYNONYM_RE.sub(replace, text)

    def _crop_words(self, text: str) -> str:
        lines = []
        for line in text.split("\n"):
            words = line.split()
            keep = [
                w
                for w in words
                if w.lower() in _HEADERS or w == "-" or self.R.random() >= self.word_crop_prob
            ]
            if words and not any(w.lower() not in _HEADERS and w != "-" for w in keep):
                content = [w for w in words if w.lower() not in _HEADERS and w != "-"]
                if content:  # never crop a line to nothing: keep one random word
                    keep.append(content[int(self.R.randint(len(content)))])
            lines.append(" ".join(keep))
        return "\n".join(line for line in lines if line)


class ReportTextd(MapTransform, Randomizable):
    """Dictionary twin of :class:`ReportText`: writes the text of a dataset item to ``output_key``.

    Missing semantic values in the item are ``""`` (and sizes NaN), as the cohort reader produces.

    Args:
        semantics_key: Item key of the column -> value mapping.
        sizes_key: Item key of the size column -> millimetres mapping.
        suspicion_key: Item key of the suspicion text.
        report_key: Item key of a given report text, used instead of the template when non-empty.
        output_key: Item key the text is written to.
        prob: Probability of augmenting an item (0.5 in training per the paper).
        word_crop_prob: Per-word drop probability of the random word crop.
        impression_only: Keep only the Impression.
        allow_missing_keys: Accept items without some of the input keys.
    """

    def __init__(
        self,
        semantics_key: str = "semantics",
        sizes_key: str = "sizes",
        suspicion_key: str = "suspicion",
        report_key: str = "report",
        output_key: str = "text",
        prob: float = 0.0,
        word_crop_prob: float = 0.1,
        impression_only: bool = True,
        allow_missing_keys: bool = True,
    ) -> None:
        MapTransform.__init__(self, keys=[semantics_key], allow_missing_keys=allow_missing_keys)
        self.semantics_key = semantics_key
        self.sizes_key = sizes_key
        self.suspicion_key = suspicion_key
        self.report_key = report_key
        self.output_key = output_key
        self.report_text = ReportText(
            prob=prob, word_crop_prob=word_crop_prob, impression_only=impression_only
        )

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ReportTextd:
        """Seed this transform and its array twin."""
        super().set_random_state(seed, state)
        self.report_text.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw whether the next item is augmented."""
        self.report_text.randomize(data)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the text of one item.

        Args:
            data: A dataset item.

        Returns:
            A shallow copy of the item with ``output_key`` set.
        """
        d = dict(data)
        if self.semantics_key not in d and self.report_key not in d and not self.allow_missing_keys:
            raise UserInputError(f"item has neither '{self.semantics_key}' nor '{self.report_key}'")
        self.randomize()
        report = d.get(self.report_key)
        d[self.output_key] = self.report_text(
            semantics=d.get(self.semantics_key) or {},
            sizes=d.get(self.sizes_key),
            suspicion=d.get(self.suspicion_key) or None,
            report=report if isinstance(report, str) else None,
            randomize=False,
        )
        return d
