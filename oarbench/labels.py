"""Label maps: which integer value in a label image is which organ at risk.

A :class:`LabelMap` maps label values (positive integers; 0 is background) to
structure names. Names follow AAPM TG-263 where the default map is used; the
aliases that different centres use (``L_Kidney``, ``kidney_left``, ...) are
resolved to the TG-263 name by :func:`canonical_name`.

Sources of a label map:

* :data:`DEFAULT_LABELS`, the 19 upper-abdominal OARs (numbering in
  docs/labels.md);
* an nnU-Net v2 ``dataset.json`` (``"labels": {"background": 0, "Liver": 1}``);
* a TOML file with a ``[labels]`` table (``Liver = 1``).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_LABELS",
    "LabelMap",
    "canonical_name",
    "laterality",
    "contralateral",
    "load_label_map",
]

#: The default 19-structure map (TG-263 names). Values are fixed: never renumber.
_DEFAULT: dict[int, str] = {
    1: "Liver",
    2: "Spleen",
    3: "Kidney_L",
    4: "Kidney_R",
    5: "Glnd_Adrenal_L",
    6: "Glnd_Adrenal_R",
    7: "Pancreas",
    8: "Stomach",
    9: "Duodenum",
    10: "Bowel",
    11: "Gallbladder",
    12: "Esophagus",
    13: "Heart",
    14: "Lung_L",
    15: "Lung_R",
    16: "SpinalCord",
    17: "A_Aorta",
    18: "VenaCava_I",
    19: "Vertebrae",
}

# Spelling variants seen across centres and tools, normalised (lower case, no
# separators) -> TG-263 name. Side words are handled generically below.
_ORGAN_ALIASES: dict[str, str] = {
    "liver": "Liver",
    "spleen": "Spleen",
    "kidney": "Kidney",
    "adrenal": "Glnd_Adrenal",
    "adrenalgland": "Glnd_Adrenal",
    "glndadrenal": "Glnd_Adrenal",
    "pancreas": "Pancreas",
    "stomach": "Stomach",
    "duodenum": "Duodenum",
    "bowel": "Bowel",
    "smallbowel": "Bowel",
    "bowelsmall": "Bowel",
    "intestine": "Bowel",
    "gallbladder": "Gallbladder",
    "esophagus": "Esophagus",
    "oesophagus": "Esophagus",
    "heart": "Heart",
    "lung": "Lung",
    "spinalcord": "SpinalCord",
    "cord": "SpinalCord",
    "aorta": "A_Aorta",
    "aaorta": "A_Aorta",
    "venacava": "VenaCava_I",
    "venacavai": "VenaCava_I",
    "ivc": "VenaCava_I",
    "inferiorvenacava": "VenaCava_I",
    "vertebrae": "Vertebrae",
    "vertebra": "Vertebrae",
    "spine": "Vertebrae",
}
_SIDE_WORDS = {"l": "L", "left": "L", "lt": "L", "r": "R", "right": "R", "rt": "R"}
_LATERAL_ORGANS = {"Kidney", "Glnd_Adrenal", "Lung"}


def canonical_name(name: str) -> str:
    """Return the TG-263 name for a structure name as centres write it.

    ``"L_Kidney"``, ``"kidney_left"``, ``"Kidney L"`` and ``"Kidney_L"`` all give
    ``"Kidney_L"``. Names that are not recognised are returned unchanged, so a
    custom structure keeps its own name.
    """
    tokens = [t for t in re.split(r"[\s_\-.]+", name.strip()) if t]
    side = None
    rest = []
    for tok in tokens:
        low = tok.lower()
        if low in _SIDE_WORDS and side is None:
            side = _SIDE_WORDS[low]
        else:
            rest.append(low)
    organ = _ORGAN_ALIASES.get("".join(rest))
    if organ is None:
        return name
    if organ in _LATERAL_ORGANS:
        return f"{organ}_{side}" if side else name
    return organ


def laterality(name: str) -> str | None:
    """``"L"`` or ``"R"`` for a lateral structure (TG-263 suffix), else ``None``."""
    if name.endswith("_L"):
        return "L"
    if name.endswith("_R"):
        return "R"
    return None


def contralateral(name: str) -> str | None:
    """The name of the same organ on the other side (``Kidney_L`` -> ``Kidney_R``)."""
    side = laterality(name)
    if side is None:
        return None
    return name[:-1] + ("R" if side == "L" else "L")


@dataclass(frozen=True)
class LabelMap:
    """An immutable map from label value (int > 0) to structure name.

    Iterating yields ``(value, name)`` pairs in ascending value order.
    """

    labels: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[int, str] = {}
        for value, name in self.labels.items():
            v = int(value)
            if v <= 0:
                raise ValueError(f"label values must be positive integers (0 is background), got {value!r} for {name!r}")
            if name in clean.values():
                raise ValueError(f"structure name {name!r} appears twice in the label map")
            clean[v] = str(name)
        object.__setattr__(self, "labels", dict(sorted(clean.items())))

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self.labels.items())

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, value: object) -> bool:
        return value in self.labels

    @property
    def values(self) -> list[int]:
        return list(self.labels)

    @property
    def names(self) -> list[str]:
        return list(self.labels.values())

    @property
    def max_value(self) -> int:
        return max(self.labels) if self.labels else 0

    def name(self, value: int) -> str:
        return self.labels[int(value)]

    def value(self, name: str) -> int:
        """Label value of a structure, accepting aliases (``L_Kidney``)."""
        target = canonical_name(name)
        for v, n in self.labels.items():
            if n == name or n == target or canonical_name(n) == target:
                return v
        raise KeyError(f"structure {name!r} is not in the label map ({', '.join(self.names)})")

    def subset(self, names: list[str]) -> "LabelMap":
        """A map holding only the named structures (aliases accepted)."""
        return LabelMap({self.value(n): self.labels[self.value(n)] for n in names})

    def canonical(self) -> "LabelMap":
        """The same values with names resolved to TG-263 where recognised."""
        return LabelMap({v: canonical_name(n) for v, n in self.labels.items()})

    @classmethod
    def from_dataset_json(cls, path: str | Path) -> "LabelMap":
        """Read the ``labels`` of an nnU-Net v2 ``dataset.json``.

        Region-based entries (a list of values) are rejected: oarbench scores
        one value per structure.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read label map: {exc}") from exc
        labels = data.get("labels")
        if not isinstance(labels, dict):
            raise ValueError(f"{path}: no 'labels' object (expected nnU-Net v2 dataset.json)")
        out: dict[int, str] = {}
        for name, value in labels.items():
            if isinstance(value, (list, tuple)):
                raise ValueError(f"{path}: region-based label {name!r} = {value!r} is not supported")
            if int(value) == 0:
                continue
            out[int(value)] = name
        return cls(out)

    @classmethod
    def from_toml(cls, path: str | Path) -> "LabelMap":
        """Read a ``[labels]`` table (``Liver = 1``) from a TOML file."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: cannot read label map: {exc}") from exc
        labels = data.get("labels", data)
        out: dict[int, str] = {}
        for name, value in labels.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{path}: label {name!r} must be an integer, got {value!r}")
            if value == 0:
                continue
            out[value] = name
        return cls(out)

    def to_dataset_json_labels(self) -> dict[str, int]:
        """The ``labels`` entry of an nnU-Net v2 dataset.json (with background)."""
        return {"background": 0, **{n: v for v, n in self.labels.items()}}


DEFAULT_LABELS = LabelMap(_DEFAULT)


def load_label_map(path: str | Path | None) -> LabelMap:
    """Label map from a dataset.json or TOML file, or the default map for ``None``."""
    if path is None:
        return DEFAULT_LABELS
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: label map file not found")
    if path.suffix.lower() == ".json":
        return LabelMap.from_dataset_json(path)
    if path.suffix.lower() == ".toml":
        return LabelMap.from_toml(path)
    raise ValueError(f"{path}: label map must be a dataset.json or a .toml file")
