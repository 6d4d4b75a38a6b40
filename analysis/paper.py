"""The paper's reported numbers, limited to what the spec (``amdim-method.md`` section 8) gives.

Values are percentages as printed by their source. Nothing here is recalled or guessed: a number
enters only with the tag the spec gives it, and secondary-source ([SEC]) numbers carry
``secondary=True`` so a report can flag them until they are checked against the PDF.

Sources of each number (spec section and tag):

- ImageNet linear 68.1, AMDIM large: paper abstract and README (8.1, [PAPER]).
- Places205 linear 55.0 from the ImageNet encoder, AMDIM large: README since 2019-07-05 (8.1).
- ImageNet linear 62.7, small model on the 50-epoch schedule: Table 1 text quoted in amdim-public
  issue #14 (8.1).
- ImageNet linear 63.5, AMDIM small (ndf 192, n_rkhs 1536, depth 8): third-party summary (8.2, [SEC]).
- CIFAR-10 91.2 and CIFAR-100 70.2 linear, AMDIM large: (8.2, [SEC]).
- STL-10 93.8: Papers-with-Code via the Falcon & Cho 2020 table; 94.2 attributed by a summary to the
  Fast-AutoAugment variant (8.2, [SEC]). Neither source states the model size, so the model is
  given as ``"AMDIM"``.

The ablation table (the paper's Table 3) was not transcribed (spec 8.3: "To transcribe: every
cell"), so :data:`PAPER_ABLATION` is empty: the ablation table's paper cells stay empty until its
cells are read from the PDF and added here with their source.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperNumber:
    """One reported number: ``value`` in percent, its source, and whether that source is secondary."""

    value: float
    source: str
    secondary: bool = False


PAPER_RESULTS: dict[tuple[str, str, str], PaperNumber] = {
    # key: (model, dataset, evaluation)
    ("AMDIM large", "imagenet", "linear"): PaperNumber(68.1, "abstract; README (spec 8.1)"),
    ("AMDIM large", "places205", "linear"): PaperNumber(55.0, "README, ImageNet encoder (spec 8.1)"),
    ("AMDIM small, 50 epochs", "imagenet", "linear"): PaperNumber(
        62.7, "Table 1 text quoted in issue #14 (spec 8.1)"
    ),
    ("AMDIM small", "imagenet", "linear"): PaperNumber(63.5, "third-party summary (spec 8.2)", True),
    ("AMDIM large", "cifar10", "linear"): PaperNumber(91.2, "secondary source (spec 8.2)", True),
    ("AMDIM large", "cifar100", "linear"): PaperNumber(70.2, "secondary source (spec 8.2)", True),
    ("AMDIM", "stl10", "linear"): PaperNumber(93.8, "Papers-with-Code / Falcon & Cho 2020 (spec 8.2)", True),
    ("AMDIM, Fast-AutoAugment", "stl10", "linear"): PaperNumber(94.2, "third-party summary (spec 8.2)", True),
}
"""Headline results from the spec, keyed by ``(model, dataset, evaluation)``; values in percent."""

PAPER_ABLATION: dict[tuple[str, str, str], float] = {}
"""Paper ablation cells keyed by ``(setting, dataset, probe)``, in percent.

``setting`` is a study's setting label (e.g. ``"tclip off"``) and ``probe`` one of
``analysis.tables.PROBES`` (``"offline_linear"``, ``"online_linear"``, ``"online_mlp"``). Empty on
purpose: spec 8.3 lists every Table 3 cell as still to transcribe.
"""
