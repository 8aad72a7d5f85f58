"""Limits a caller can change, kept apart from the modules that apply them so that a command line can
show them in ``--help`` without importing those modules (and MONAI, highdicom and torch with them)."""

from __future__ import annotations

#: Most seeds analysed per series unless the caller raises it: each costs a model batch row and a
#: report section, so a runaway detector or a hostile seeds file cannot exhaust the machine.
MAX_SEEDS_PER_SERIES = 200
