"""The semantic vocabulary: the one table of the 17 UCLA lung-nodule features.

Every feature value carries its CSV spelling (plus accepted aliases), report phrases, a zero-shot
prompt and a DICOM code. The table is the single source of truth for the cohort reader, the report
text generator, the zero-shot prompts baked into the exported model and the DICOM SR writer.

Standard codes
--------------
Standard codes are used only where the exact code value and code meaning were checked against
DICOM PS3.16 context groups (as shipped in ``pydicom.sr`` 3.0.2, generated from PS3.16, and
cross-checked with the published CID tables). CIDs: 240/241 Present-Absent, 3715 Lesion Margin,
6104 Abnormal Opacity Finding or Feature, 6119 Chest Border Shape, 6120 Chest Border Definition,
6333 mpMRI Assessment Type, 6339 MRI Shape Characteristic, 7151 Segmentation Property Type.
``tests/test_vocabulary.py`` checks every standard code against pydicom's PS3.16 tables.

====================================  ======  ==========  ========================  =============
Use                                   Scheme  Value       Meaning                   Source
====================================  ======  ==========  ========================  =============
every Present value                   SCT     52101004    Present                   CID 240 / 241
every Absent value                    SCT     272519000   Absent                    CID 240 / 241
Well marginated                       SCT     260409000   Well defined              CID 6120
Poorly marginated                     SCT     300841009   Poorly defined            CID 6120
Smooth (margins)                      SCT     82280004    Smooth                    CID 3715
Lobulated (margins)                   DCM     112135      Lobulated                 CID 6119
Spiculated/Serrated (margins)         DCM     112136      Spiculated                CID 6119
Round                                 SCT     42700002    Round shape               CID 6119
Ovoid                                 SCT     84360004    Ovoid shape               CID 6339
Complex/Irregular                     SCT     49608001    Irregular                 CID 6119
Pure ground glass                     DCM     112120      Ground glass opacity      CID 6104
feature ``nodule_shape``              SCT     300842002   Shape                     CID 6333
feature ``nodule_margins``            DCM     111037      Margins                   PS3.16 Annex D
feature ``necrosis``                  SCT     6574001     Necrosis                  CID 7151
====================================  ======  ==========  ========================  =============

Private codes
-------------
Everything else uses the private coding scheme ``99LNSCLIP`` (lung nodule semantic CLIP). Its
values are stable: ``LNSC-Fnn`` is feature ``nn`` in the order of the table below, and
``LNSC-Fnn-Vk`` is the k-th value of that feature (in the order of ``SemanticFeature.values``).

===========  ==============================================================
Code value   Code meaning
===========  ==============================================================
LNSC-F01     Nodule margin conspicuity
LNSC-F03     Additional nodule margins
LNSC-F04-V3  Polygonal shape (``nodule_shape`` = Polygonal)
LNSC-F05     Nodule consistency
LNSC-F05-V1  Solid nodule consistency (``nodule_consistency`` = Solid)
LNSC-F05-V2  Part-solid nodule consistency (``nodule_consistency`` = Part-solid)
LNSC-F06     Nodule reticulation
LNSC-F07     Cyst-like spaces
LNSC-F08     Intra-nodular bronchiectasis
LNSC-F10     Cavitation
LNSC-F11     Eccentric calcification
LNSC-F12     Airway cut-off
LNSC-F13     Pleural attachment
LNSC-F14     Pleural retraction
LNSC-F15     Vascular convergence
LNSC-F16     Septal stretching
LNSC-F17     Paracicatricial emphysema
===========  ==============================================================

``additional_nodule_margins`` reuses the value codes of ``nodule_margins`` under its own private
concept name, so an SR reader can tell the two margin descriptions apart.
:func:`private_codes` lists exactly the private codes above (tests keep the two in step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scripts.errors import UserInputError

PRIVATE_SCHEME = "99LNSCLIP"
"""Coding scheme designator of the project's private codes (DICOM: private designators start 99)."""

SIZE_COLUMNS: tuple[str, ...] = (
    "longest_axial_diameter_(mm)",
    "short_diameter_(mm)",
    "mean_diameter",
    "psn_longest_diameter_solid_component",
)
"""Size columns of the cohort CSV (millimetres; used only in the report text)."""

SUSPICION_COLUMN = "level_of_suspicion_of_lung_cancer"
"""Radiologist suspicion column of the cohort CSV (free text; used only in the report text)."""


@dataclass(frozen=True)
class Code:
    """A DICOM coded concept (code value, coding scheme designator, code meaning).

    Attributes:
        value: Code Value (0008,0100).
        scheme_designator: Coding Scheme Designator (0008,0102), e.g. ``"SCT"``, ``"DCM"``.
        meaning: Code Meaning (0008,0104).
    """

    value: str
    scheme_designator: str
    meaning: str


@dataclass(frozen=True)
class FeatureValue:
    """One allowed value of a semantic feature.

    Attributes:
        name: Canonical CSV spelling, e.g. ``"Spiculated/Serrated"``.
        phrases: Report phrases; the first is the one the deterministic report uses.
        prompt: Zero-shot prompt, a full sentence starting with "The nodule".
        code: DICOM code of the value (SR qualitative evaluation).
        aliases: Extra accepted CSV spellings (matched case-insensitively).
        short: Concise phrase for the report's Impression (empty: use the first phrase).
    """

    name: str
    phrases: tuple[str, ...]
    prompt: str
    code: Code
    aliases: tuple[str, ...] = ()
    short: str = ""

    @property
    def impression_phrase(self) -> str:
        """The phrase the Impression uses for this value."""
        return self.short or self.phrases[0]


@dataclass(frozen=True)
class SemanticFeature:
    """A semantic feature: one CSV column with a closed set of values.

    Attributes:
        column: CSV column, exactly as in ``docs/semantic_schema.md``.
        title: Human-readable title, e.g. ``"Nodule margins"``.
        code: Concept name code for the SR.
        values: Allowed values, in schema order.
        noun: Short noun phrase for the Impression of Present/Absent features (e.g. "cavitation").
        column_aliases: Other accepted spellings of the column (e.g. the authors' LIDC table).
    """

    column: str
    title: str
    code: Code
    values: tuple[FeatureValue, ...]
    noun: str = ""
    column_aliases: tuple[str, ...] = ()

    def value_names(self) -> tuple[str, ...]:
        """Canonical value names, in schema order."""
        return tuple(value.name for value in self.values)

    def value(self, name: str) -> FeatureValue:
        """The :class:`FeatureValue` of a canonical (or alias) name.

        Args:
            name: A canonical value name or an accepted alias.

        Raises:
            UserInputError: The name is not a value of this feature.
        """
        canonical = self.parse(name, where=f"feature '{self.column}'")
        if canonical is None:
            raise UserInputError(f"feature '{self.column}': an empty value has no entry")
        return next(value for value in self.values if value.name == canonical)

    @property
    def is_present_absent(self) -> bool:
        """Whether the feature's values are exactly Present and Absent."""
        return self.value_names() == ("Present", "Absent")

    def parse(self, raw: object, *, where: str) -> str | None:
        """Map a raw CSV cell to the canonical value name.

        Args:
            raw: The cell: ``None``, NaN or an empty string mean missing.
            where: Location for the error message, e.g. ``"cohort.csv: line 7"``.

        Returns:
            The canonical value name, or ``None`` when the cell is missing.

        Raises:
            UserInputError: The cell holds a value that is neither a name nor an alias.
        """
        if raw is None:
            return None
        if isinstance(raw, float) and math.isnan(raw):
            return None
        text = str(raw).strip()
        if not text:
            return None
        key = text.casefold()
        for value in self.values:
            if key == value.name.casefold() or key in (alias.casefold() for alias in value.aliases):
                return value.name
        allowed = ", ".join(self.value_names())
        raise UserInputError(
            f"{where}: column '{self.column}' has unknown value '{text}'; allowed: {allowed} (or empty)"
        )


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")

_PRESENT_ALIASES = ("Yes", "Y", "True")
_ABSENT_ALIASES = ("No", "N", "False")


def _present_absent(
    number: int,
    column: str,
    title: str,
    noun: str,
    present: tuple[str, ...],
    absent: tuple[str, ...],
    present_prompt: str,
    absent_prompt: str,
    code: Code | None = None,
    column_aliases: tuple[str, ...] = (),
) -> SemanticFeature:
    return SemanticFeature(
        column=column,
        title=title,
        code=code or _private(f"LNSC-F{number:02d}", title),
        values=(
            FeatureValue("Present", present, present_prompt, PRESENT, _PRESENT_ALIASES, short=noun),
            FeatureValue("Absent", absent, absent_prompt, ABSENT, _ABSENT_ALIASES, short=f"no {noun}"),
        ),
        noun=noun,
        column_aliases=column_aliases,
    )


_SMOOTH = Code("82280004", "SCT", "Smooth")
_LOBULATED = Code("112135", "DCM", "Lobulated")
_SPICULATED = Code("112136", "DCM", "Spiculated")

FEATURES: tuple[SemanticFeature, ...] = (
    SemanticFeature(
        column="nodule_margin_conspicuity",
        title="Nodule margin conspicuity",
        code=_private("LNSC-F01", "Nodule margin conspicuity"),
        values=(
            FeatureValue(
                "Well marginated",
                ("well-marginated", "well-defined margins", "sharply marginated"),
                "The nodule is well marginated.",
                Code("260409000", "SCT", "Well defined"),
                ("Well-marginated", "Well defined", "Well-defined"),
            ),
            FeatureValue(
                "Poorly marginated",
                ("poorly marginated", "ill-defined margins", "indistinct margins"),
                "The nodule is poorly marginated.",
                Code("300841009", "SCT", "Poorly defined"),
                ("Poorly-marginated", "Poorly defined", "Ill-defined", "Ill defined"),
            ),
        ),
    ),
    SemanticFeature(
        column="nodule_margins",
        title="Nodule margins",
        code=Code("111037", "DCM", "Margins"),
        values=(
            FeatureValue(
                "Smooth",
                ("smooth margins", "a smooth contour"),
                "The nodule has smooth margins.",
                _SMOOTH,
                short="smooth",
            ),
            FeatureValue(
                "Lobulated",
                ("lobulated margins", "a lobulated contour"),
                "The nodule has lobulated margins.",
                _LOBULATED,
                short="lobulated",
            ),
            FeatureValue(
                "Spiculated/Serrated",
                ("spiculated margins", "spiculated or serrated margins", "spiculation"),
                "The nodule has spiculated margins.",
                _SPICULATED,
                ("Spiculated", "Serrated", "Spiculated / Serrated"),
                short="spiculated",
            ),
        ),
    ),
    SemanticFeature(
        column="additional_nodule_margins",
        title="Additional nodule margins",
        code=_private("LNSC-F03", "Additional nodule margins"),
        values=(
            FeatureValue(
                "Smooth",
                ("partly smooth margins",),
                "The nodule margins are partly smooth.",
                _SMOOTH,
                short="partly smooth",
            ),
            FeatureValue(
                "Lobulated",
                ("partly lobulated margins",),
                "The nodule margins are partly lobulated.",
                _LOBULATED,
                short="partly lobulated",
            ),
            FeatureValue(
                "Spiculated/Serrated",
                ("partly spiculated margins", "partly serrated margins"),
                "The nodule margins are partly spiculated.",
                _SPICULATED,
                ("Spiculated", "Serrated", "Spiculated / Serrated"),
                short="partly spiculated",
            ),
        ),
    ),
    SemanticFeature(
        column="nodule_shape",
        title="Nodule shape",
        code=Code("300842002", "SCT", "Shape"),
        values=(
            FeatureValue(
                "Round",
                ("round shape", "rounded shape"),
                "The nodule is round.",
                Code("42700002", "SCT", "Round shape"),
                ("Rounded",),
                short="round",
            ),
            FeatureValue(
                "Ovoid",
                ("ovoid shape", "oval shape"),
                "The nodule is ovoid.",
                Code("84360004", "SCT", "Ovoid shape"),
                ("Oval",),
                short="ovoid",
            ),
            FeatureValue(
                "Polygonal",
                ("polygonal shape", "angular shape"),
                "The nodule is polygonal.",
                _private("LNSC-F04-V3", "Polygonal shape"),
                short="polygonal",
            ),
            FeatureValue(
                "Complex/Irregular",
                ("irregular shape", "complex irregular shape"),
                "The nodule has an irregular shape.",
                Code("49608001", "SCT", "Irregular"),
                ("Complex", "Irregular", "Complex / Irregular"),
                short="irregular",
            ),
        ),
    ),
    SemanticFeature(
        column="nodule_consistency",
        title="Nodule consistency",
        code=_private("LNSC-F05", "Nodule consistency"),
        values=(
            FeatureValue(
                "Solid",
                ("solid consistency", "solid attenuation"),
                "The nodule is solid.",
                _private("LNSC-F05-V1", "Solid nodule consistency"),
                short="solid",
            ),
            FeatureValue(
                "Part-solid",
                ("part-solid consistency", "mixed solid and ground-glass attenuation"),
                "The nodule is part-solid.",
                _private("LNSC-F05-V2", "Part-solid nodule consistency"),
                ("Part solid", "Partly solid", "Partsolid", "Semi-solid"),
                short="part-solid",
            ),
            FeatureValue(
                "Pure ground glass",
                ("pure ground-glass attenuation", "non-solid ground-glass attenuation"),
                "The nodule is pure ground-glass.",
                Code("112120", "DCM", "Ground glass opacity"),
                ("Pure ground-glass", "Ground glass", "Ground-glass", "GGO", "Non-solid", "Nonsolid"),
                short="pure ground-glass",
            ),
        ),
    ),
    _present_absent(
        6,
        "nodule_reticulation",
        "Nodule reticulation",
        "reticulation",
        ("internal reticulation is present", "reticulation within the nodule"),
        ("no internal reticulation", "reticulation is absent"),
        "The nodule shows internal reticulation.",
        "The nodule shows no internal reticulation.",
    ),
    _present_absent(
        7,
        "cyst-like_spaces",
        "Cyst-like spaces",
        "cyst-like spaces",
        ("cyst-like spaces are present", "internal cyst-like spaces"),
        ("no cyst-like spaces", "cyst-like spaces are absent"),
        "The nodule contains cyst-like spaces.",
        "The nodule contains no cyst-like spaces.",
        column_aliases=("cyst_like_spaces",),
    ),
    _present_absent(
        8,
        "intra-nodular_bronchiectasis",
        "Intra-nodular bronchiectasis",
        "intranodular bronchiectasis",
        ("intranodular bronchiectasis is present", "dilated bronchi within the nodule"),
        ("no intranodular bronchiectasis", "intranodular bronchiectasis is absent"),
        "The nodule shows intranodular bronchiectasis.",
        "The nodule shows no intranodular bronchiectasis.",
        column_aliases=("intra_nodular_bronchiectasis",),
    ),
    _present_absent(
        9,
        "necrosis",
        "Necrosis",
        "necrosis",
        ("necrosis is present", "internal necrosis"),
        ("no necrosis", "necrosis is absent"),
        "The nodule shows necrosis.",
        "The nodule shows no necrosis.",
        code=Code("6574001", "SCT", "Necrosis"),
    ),
    _present_absent(
        10,
        "cavitation",
        "Cavitation",
        "cavitation",
        ("cavitation is present", "a cavity within the nodule"),
        ("no cavitation", "cavitation is absent"),
        "The nodule is cavitated.",
        "The nodule is not cavitated.",
    ),
    _present_absent(
        11,
        "eccentric_calcification",
        "Eccentric calcification",
        "eccentric calcification",
        ("eccentric calcification is present", "an eccentric calcification"),
        ("no eccentric calcification", "eccentric calcification is absent"),
        "The nodule has an eccentric calcification.",
        "The nodule has no eccentric calcification.",
    ),
    _present_absent(
        12,
        "airway_cut-off",
        "Airway cut-off",
        "airway cut-off",
        ("airway cut-off is present", "an abrupt airway cut-off"),
        ("no airway cut-off", "airway cut-off is absent"),
        "The nodule shows an airway cut-off.",
        "The nodule shows no airway cut-off.",
        column_aliases=("airway_cut_off",),
    ),
    _present_absent(
        13,
        "pleural_attachment",
        "Pleural attachment",
        "pleural attachment",
        ("pleural attachment is present", "attachment to the pleura"),
        ("no pleural attachment", "pleural attachment is absent"),
        "The nodule is attached to the pleura.",
        "The nodule is not attached to the pleura.",
    ),
    _present_absent(
        14,
        "pleural_retraction",
        "Pleural retraction",
        "pleural retraction",
        ("pleural retraction is present", "retraction of the adjacent pleura"),
        ("no pleural retraction", "pleural retraction is absent"),
        "The nodule shows pleural retraction.",
        "The nodule shows no pleural retraction.",
    ),
    _present_absent(
        15,
        "vascular_convergence",
        "Vascular convergence",
        "vascular convergence",
        ("vascular convergence is present", "vessels converging on the nodule"),
        ("no vascular convergence", "vascular convergence is absent"),
        "The nodule shows vascular convergence.",
        "The nodule shows no vascular convergence.",
    ),
    _present_absent(
        16,
        "septal_stretching",
        "Septal stretching",
        "septal stretching",
        ("septal stretching is present", "stretching of adjacent septa"),
        ("no septal stretching", "septal stretching is absent"),
        "The nodule shows septal stretching.",
        "The nodule shows no septal stretching.",
    ),
    _present_absent(
        17,
        "paracicatricial_emphysema",
        "Paracicatricial emphysema",
        "paracicatricial emphysema",
        ("paracicatricial emphysema is present", "emphysema adjacent to the nodule"),
        ("no paracicatricial emphysema", "paracicatricial emphysema is absent"),
        "The nodule has adjacent paracicatricial emphysema.",
        "The nodule has no adjacent paracicatricial emphysema.",
    ),
)
"""All 17 features, in the order of ``docs/semantic_schema.md``."""

FEATURE_BY_COLUMN: dict[str, SemanticFeature] = {feature.column: feature for feature in FEATURES}
"""Feature of each canonical CSV column."""

COLUMN_ALIASES: dict[str, str] = {
    alias: feature.column for feature in FEATURES for alias in feature.column_aliases
}
"""Accepted alternative column spellings -> canonical column."""


def private_codes() -> list[Code]:
    """Every distinct private (``99LNSCLIP``) code in the table, features first, in table order.

    Returns:
        The private codes, each once.
    """
    seen: dict[tuple[str, str], Code] = {}
    for feature in FEATURES:
        for code in (feature.code, *(value.code for value in feature.values)):
            if code.scheme_designator == PRIVATE_SCHEME:
                seen.setdefault((code.value, code.meaning), code)
    return list(seen.values())
