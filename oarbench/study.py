"""Study files: which centres, where their data lie, which models to score (docs/study-toml.md)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oarbench.io import safe_name
from oarbench.labels import DEFAULT_LABELS, LabelMap, load_label_map

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Centre", "Model", "Study", "load_study"]


@dataclass(frozen=True)
class Centre:
    name: str
    images: Path | None
    reference: Path
    metadata: Path | None = None


@dataclass(frozen=True)
class Model:
    name: str
    predictions: str
    trained_on: tuple[str, ...] = ()
    root: Path = Path(".")
    #: A second reference (another clinician's contours), evaluated against the first like a model.
    observer: bool = False

    def predictions_dir(self, centre: str, condition: str = "original") -> Path:
        """The folder holding this model's predictions for ``centre`` (under ``condition``,
        for patterns with a ``{condition}`` placeholder)."""
        return _resolve(self.root, self.predictions.format(model=self.name, centre=centre, condition=condition))


@dataclass(frozen=True)
class Study:
    """A parsed study file; ``raw`` keeps every section for the parts that need them."""

    name: str
    path: Path
    labels: LabelMap
    tolerance_mm: float
    centres: tuple[Centre, ...]
    models: tuple[Model, ...]
    raw: dict[str, Any] = field(default_factory=dict)
    tolerances_mm: dict[str, float] = field(default_factory=dict)  # per structure, overriding tolerance_mm
    #: ``[[observers]]``: second observers' contours, scored against the reference like models
    #: (``oarbench evaluate``) and compared with each model by non-inferiority (``oarbench stats``).
    observers: tuple[Model, ...] = ()

    @property
    def root(self) -> Path:
        return self.path.parent

    def centre(self, name: str) -> Centre:
        for c in self.centres:
            if c.name == name:
                return c
        raise ValueError(f"{self.path}: no centre named {name!r} (have {[c.name for c in self.centres]})")

    def model(self, name: str) -> Model:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"{self.path}: no model named {name!r} (have {[m.name for m in self.models]})")


def _resolve(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _check_name(path: Path, value: Any, where: str) -> None:
    """Centre, model and study names become folder and file names: refuse any that could not."""
    if not isinstance(value, str):
        raise ValueError(f"{path}: {where}: name must be a string, got {value!r}")
    try:
        safe_name(value, "name")
    except ValueError as exc:
        raise ValueError(f"{path}: {where}: {str(exc).split(': ', 1)[1]}") from None


def read_tolerances(data: dict[str, Any], source: str | Path, labels: LabelMap | None = None) -> dict[str, float]:
    """Per-structure tolerances from a ``[tolerances_mm]`` table (``Liver = 3.0``) of a parsed
    study or label TOML; names must be structures of ``labels`` when given; values mm >= 0."""
    table = data.get("tolerances_mm", {}) or {}
    if not isinstance(table, dict):
        raise ValueError(f"{source}: [tolerances_mm] must be a table of structure = mm")
    out: dict[str, float] = {}
    for name, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0) or value == float("inf"):
            raise ValueError(f"{source}: [tolerances_mm] {name} must be a number of mm >= 0, got {value!r}")
        if labels is not None and name not in labels.names:
            raise ValueError(f"{source}: [tolerances_mm] {name!r} is not a structure of the label map")
        out[str(name)] = float(value)
    return out


def read_label_tolerances(path: str | Path | None, labels: LabelMap | None = None) -> dict[str, float]:
    """``[tolerances_mm]`` of a label TOML (empty for a dataset.json or no file)."""
    if path is None or Path(path).suffix.lower() != ".toml":
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read label map: {exc}") from exc
    return read_tolerances(data, path, labels)


def load_study(path: str | Path) -> Study:
    """Read and check a study TOML. Paths are relative to the file's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: study file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read study file: {exc}") from exc
    root = path.parent
    meta = data.get("study", {})
    labels_spec = meta.get("labels", "default")
    labels = DEFAULT_LABELS if labels_spec == "default" else load_label_map(_resolve(root, labels_spec))
    structures = meta.get("structures") or []
    if structures:
        try:
            labels = labels.subset(list(structures))
        except KeyError as exc:
            raise ValueError(f"{path}: [study] structures: {exc.args[0]}") from None
    centres = []
    for i, c in enumerate(data.get("centres", [])):
        if "name" not in c or "reference" not in c:
            raise ValueError(f"{path}: [[centres]] entry {i + 1} needs 'name' and 'reference'")
        _check_name(path, c["name"], f"[[centres]] entry {i + 1}")
        centres.append(
            Centre(
                name=str(c["name"]),
                images=_resolve(root, c["images"]) if c.get("images") else None,
                reference=_resolve(root, c["reference"]),
                metadata=_resolve(root, c["metadata"]) if c.get("metadata") else None,
            )
        )
    if not centres:
        raise ValueError(f"{path}: no [[centres]] given")
    models = []
    for i, m in enumerate(data.get("models", [])):
        if "name" not in m or "predictions" not in m:
            raise ValueError(f"{path}: [[models]] entry {i + 1} needs 'name' and 'predictions'")
        _check_name(path, m["name"], f"[[models]] entry {i + 1}")
        models.append(
            Model(
                name=str(m["name"]),
                predictions=str(m["predictions"]),
                trained_on=tuple(m.get("trained_on", ())),
                root=root,
            )
        )
    observers = []
    for i, m in enumerate(data.get("observers", []) or []):
        if not isinstance(m, dict) or "name" not in m or "predictions" not in m:
            raise ValueError(f"{path}: [[observers]] entry {i + 1} needs 'name' and 'predictions'")
        _check_name(path, m["name"], f"[[observers]] entry {i + 1}")
        observers.append(Model(name=str(m["name"]), predictions=str(m["predictions"]), root=root, observer=True))
    for kind, items in (("centre", centres), ("model or observer", models + observers)):
        names = [x.name for x in items]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{path}: {kind} name(s) {twice} appear more than once")
    if "name" in meta:
        _check_name(path, meta["name"], "[study] name")
    tolerances = {}
    if labels_spec != "default":  # the label file's tolerances, for the structures studied
        own = read_label_tolerances(_resolve(root, labels_spec))
        tolerances.update({k: v for k, v in own.items() if k in labels.names})
    tolerances.update(read_tolerances(data, path, labels))
    return Study(
        name=str(meta.get("name", path.stem)),
        path=path,
        labels=labels,
        tolerance_mm=float(meta.get("tolerance_mm", 2.0)),
        centres=tuple(centres),
        models=tuple(models),
        raw=data,
        tolerances_mm=tolerances,
        observers=tuple(observers),
    )


def _toml_str(value: str | Path) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def study_toml_text(study: Study, *, predictions: str | None = None, name: str | None = None) -> str:
    """A study file for ``study`` with absolute paths (the label map written as default or a path).

    ``predictions`` replaces every model's predictions pattern (``{model}``,
    ``{centre}`` filled in later); other sections of the original file are not
    carried over.
    """
    lines = ["[study]", f"name = {_toml_str(name or study.name)}"]
    labels_spec = study.raw.get("study", {}).get("labels", "default")
    if labels_spec != "default":
        labels_spec = str(_resolve(study.root, labels_spec).resolve())
    lines.append(f"labels = {_toml_str(labels_spec)}")
    lines.append(f"tolerance_mm = {study.tolerance_mm!r}")
    structures = study.raw.get("study", {}).get("structures") or []
    lines.append("structures = [" + ", ".join(_toml_str(s) for s in structures) + "]")
    for c in study.centres:
        lines += ["", "[[centres]]", f"name = {_toml_str(c.name)}"]
        if c.images is not None:
            lines.append(f"images = {_toml_str(c.images.resolve())}")
        lines.append(f"reference = {_toml_str(c.reference.resolve())}")
        if c.metadata is not None:
            lines.append(f"metadata = {_toml_str(c.metadata.resolve())}")
    for m in study.models:
        pattern = predictions if predictions is not None else str(_resolve(m.root, m.predictions).resolve())
        lines += ["", "[[models]]", f"name = {_toml_str(m.name)}",
                  "trained_on = [" + ", ".join(_toml_str(t) for t in m.trained_on) + "]",
                  f"predictions = {_toml_str(pattern)}"]
    for o in study.observers:  # a second observer's contours stay where they are
        lines += ["", "[[observers]]", f"name = {_toml_str(o.name)}",
                  f"predictions = {_toml_str(str(_resolve(o.root, o.predictions).resolve()))}"]
    return "\n".join(lines) + "\n"
