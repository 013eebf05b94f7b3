"""CT display windows, chosen by structure."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Window", "ABDOMEN_WINDOW", "LUNG_WINDOW", "window_for"]


@dataclass(frozen=True)
class Window:
    """A CT display window in HU: ``width`` and ``level`` (centre)."""

    width: float
    level: float
    name: str = ""

    @property
    def vmin(self) -> float:
        return self.level - self.width / 2.0

    @property
    def vmax(self) -> float:
        return self.level + self.width / 2.0


ABDOMEN_WINDOW = Window(400.0, 40.0, "abdomen")
LUNG_WINDOW = Window(1500.0, -600.0, "lung")
_LUNG_STRUCTURES = {"Lung_L", "Lung_R"}


def window_for(structure: str) -> Window:
    """Lung window (W1500/L-600) for ``Lung_L``/``Lung_R``, abdomen window (W400/L40) otherwise."""
    from oarbench.labels import canonical_name

    return LUNG_WINDOW if canonical_name(structure) in _LUNG_STRUCTURES else ABDOMEN_WINDOW

