"""Label maps: which integer value in a label image is which organ at risk.

A :class:`LabelMap` maps label values (positive integers; 0 is background) to
structure names. Names follow AAPM TG-263 where the default map is used; the
aliases that different centres use (``L_Kidney``, ``kidney_left``, ...) are
resolved to the TG-263 name by :func:`canonical_name`.

Sources of a label map (:func:`resolve_labels` picks one, docs/labels.md):

* the maps shipped as data files under ``oarbench/data/``: ``default`` (the 19
  upper-abdominal OARs, :data:`DEFAULT_LABELS`) and ``totalsegmentator`` (the
  117 classes of TotalSegmentator v2's ``total`` task, TG-263 names where one
  exists);
* an nnU-Net v2 ``dataset.json`` (``"labels": {"background": 0, "Liver": 1}``),
  given or found beside or above the reference folder;
* a TOML file with a ``[labels]`` table (``Liver = 1``).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
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
    "shipped_label_map",
    "SHIPPED_MAPS",
    "ResolvedLabels",
    "resolve_labels",
    "with_structures",
    "find_dataset_json",
    "LABELS_HINT",
]

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
    ``ignored`` holds values that may appear in a file but are not scored (the
    rest of the map a :meth:`subset` was taken from); any other value not in
    ``labels`` is an error when a file is scored.
    """

    labels: Mapping[int, str] = field(default_factory=dict)
    ignored: frozenset[int] = frozenset()

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
        object.__setattr__(self, "ignored", frozenset(int(v) for v in self.ignored) - set(clean))

    def known(self, value: int) -> bool:
        """True for a value that is scored or deliberately ignored."""
        return int(value) in self.labels or int(value) in self.ignored

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
        """A map scoring only the named structures (aliases accepted).

        The other values of this map stay known (``ignored``): a file holding
        them is scored on the named structures only, not rejected.
        """
        kept = {self.value(n): self.labels[self.value(n)] for n in names}
        return LabelMap(kept, ignored=(frozenset(self.labels) | self.ignored) - set(kept))

    def canonical(self) -> "LabelMap":
        """The same values with names resolved to TG-263 where recognised."""
        return LabelMap({v: canonical_name(n) for v, n in self.labels.items()}, ignored=self.ignored)

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


#: Label maps shipped with oarbench: name -> (data file under oarbench/data/, description).
SHIPPED_MAPS: dict[str, tuple[str, str]] = {
    "default": ("default_19oar.csv", "the default 19-OAR map"),
    "totalsegmentator": ("totalsegmentator_total_v2.csv", "TotalSegmentator v2 'total' task (117 classes)"),
}

#: Said wherever a label value or a map cannot be matched.
LABELS_HINT = ("choose the map of the tool that wrote the files with --labels "
               f"({', '.join(SHIPPED_MAPS)}, an nnU-Net dataset.json or a labels TOML; docs/labels.md)")


def shipped_label_map(name: str) -> LabelMap:
    """A label map shipped as a data file: ``"default"`` or ``"totalsegmentator"``.

    The files (``oarbench/data/*.csv``) have the columns ``value, name`` (plus
    the tool's own name where it differs).
    """
    if name not in SHIPPED_MAPS:
        raise ValueError(f"unknown label map {name!r}: {LABELS_HINT}")
    text = resources.files("oarbench").joinpath("data", SHIPPED_MAPS[name][0]).read_text(encoding="utf-8")
    return LabelMap({int(row["value"]): row["name"] for row in csv.DictReader(io.StringIO(text))})


DEFAULT_LABELS = shipped_label_map("default")


@dataclass(frozen=True)
class ResolvedLabels:
    """The label map a command uses and where it came from.

    ``source``: ``"default"``, ``"totalsegmentator"`` or a file path;
    ``note``: one line for the terminal and run.json saying how it was chosen.
    """

    labels: LabelMap
    source: str
    note: str

    def provenance(self) -> dict[str, str]:
        return {"labels_source": self.source, "labels_note": self.note}


def find_dataset_json(reference: str | Path, levels: int = 2) -> Path | None:
    """The nnU-Net ``dataset.json`` in the reference folder, beside it, or up to ``levels`` folders above."""
    folder = Path(reference).resolve()
    candidates = [folder / "dataset.json"]
    parent = folder
    for _ in range(levels):
        parent = parent.parent
        candidates.append(parent / "dataset.json")
    for path in candidates:
        if path.is_file():
            return path
    return None


def resolve_labels(spec: str | Path | None, reference: str | Path | None = None,
                   structures: str | list[str] | None = None) -> ResolvedLabels:
    """The label map for ``--labels SPEC`` (and ``--structures``), and a note saying which.

    ``spec``: ``"default"``, ``"totalsegmentator"``, or a dataset.json / TOML
    path. ``None``: the nnU-Net ``dataset.json`` found beside or above the
    ``reference`` folder (:func:`find_dataset_json`); failing that, the default
    map, with a note that says so. ``structures`` (comma-separated text or a
    list, aliases accepted) scores a subset; the map's other values are then
    ignored, not errors.
    """
    if spec is None or str(spec) == "":
        found = find_dataset_json(reference) if reference is not None else None
        if found is not None:
            labels, source = load_label_map(found), str(found)
            note = f"labels: {found} (found beside the reference folder; --labels to choose another)"
        else:
            labels, source = DEFAULT_LABELS, "default"
            where = f"beside or above {reference}" if reference is not None else "given"
            note = (f"labels: the default 19-OAR map (no --labels and no dataset.json {where}); "
                    f"if another tool wrote the files, {LABELS_HINT}")
    elif str(spec) in SHIPPED_MAPS:
        labels, source = shipped_label_map(str(spec)), str(spec)
        note = f"labels: {SHIPPED_MAPS[str(spec)][1]} (--labels {spec})"
    else:
        path = Path(spec)
        if not path.is_file():
            import difflib

            close = difflib.get_close_matches(str(spec).lower(), list(SHIPPED_MAPS), n=1, cutoff=0.75)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--labels {spec!r}: no such file and not a shipped map{guess}; {LABELS_HINT}")
        labels, source = load_label_map(path), str(path)
        note = f"labels: {path}"
    return with_structures(ResolvedLabels(labels, source, note), structures)


def with_structures(resolved: ResolvedLabels, structures: str | list[str] | None) -> ResolvedLabels:
    """``resolved`` scoring only ``structures`` (comma-separated text or a list; aliases accepted)."""
    if not structures:
        return resolved
    names = [n.strip() for n in structures.split(",")] if isinstance(structures, str) else list(structures)
    names = [n for n in names if n]
    try:
        labels = resolved.labels.subset(names)
    except KeyError as exc:
        raise ValueError(f"--structures: {exc.args[0]}; {LABELS_HINT}") from None
    note = resolved.note + f"; scoring {len(labels)} structure(s): {', '.join(labels.names)}"
    return ResolvedLabels(labels, resolved.source, note)


def load_label_map(path: str | Path | None) -> LabelMap:
    """Label map from a dataset.json or TOML file, or the default map for ``None``."""
    if path is None:
        return DEFAULT_LABELS
    if str(path) in SHIPPED_MAPS and not Path(path).is_file():
        return shipped_label_map(str(path))
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: label map file not found; {LABELS_HINT}")
    if path.suffix.lower() == ".json":
        return LabelMap.from_dataset_json(path)
    if path.suffix.lower() == ".toml":
        return LabelMap.from_toml(path)
    raise ValueError(f"{path}: label map must be a dataset.json or a .toml file")
