"""What every trial of one study stage needs from the driver, in one frozen object that Tune ships
to the trial actors (and the driver's own callback reads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amdim.harness.study_spec import Budget


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one stage needs from the driver (Tune ships it to the trial actors)."""

    study: str
    stage: str  # search | confirm
    tracking_uri: str
    parent_run_id: str
    base_flat: dict[str, Any]  # the spec's base configuration, flat
    keys: tuple[str, ...]  # the searched config keys
    points: tuple[dict[str, Any], ...]  # the labelled settings
    labels: tuple[str, ...]
    budget: Budget
    study_dir: str
    confirm_points: tuple[dict[str, Any], ...] = ()  # the confirm stage's (config, seed) list

    @property
    def experiment(self) -> str:
        return self.study  # one MLflow experiment per study

    @property
    def launcher(self) -> str:
        return self.budget.path

    @property
    def train_dir(self) -> str:
        return str(Path(self.study_dir) / "train")

    def label(self, sampled: dict[str, Any]) -> str:
        """The labelled setting ``sampled`` is, or ''."""
        return next(
            (label for point, label in zip(self.points, self.labels, strict=True) if point == sampled), ""
        )
