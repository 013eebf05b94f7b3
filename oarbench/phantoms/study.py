"""A synthetic two-centre study on disk: nnU-Net raw datasets, metadata, predictions.

Layout under the output folder ``DIR`` (all paths in ``DIR/study.toml`` are relative to DIR)::

    study.toml                          the study file actually generated (docs/study-toml.md)
    phantoms_manifest.json              settings and sha256 of every file written
    metadata_A.csv, metadata_B.csv      one row per case (train and test)
    nnUNet_raw/Dataset901_CentreA/      imagesTr, labelsTr, imagesTs, labelsTs, dataset.json
    nnUNet_raw/Dataset902_CentreB/
    predictions/{model}/{centre}/CASE.nii.gz
    predictions/injected_errors.csv     which prediction got which discrete error
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
import shutil
import sys
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from oarbench.io import Volume, atomic_write_text, read_volume, sha256_file, write_volume
from oarbench.labels import DEFAULT_LABELS
from oarbench.phantoms.anatomy import CONTRAST_PHASES, Grid, build_anatomy, render
from oarbench.phantoms.errors import OBSERVER_ERROR_MODEL, ErrorModel, InjectedError, signed_distances, simulate_case
from oarbench.tables import csv_row

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "DEFAULT_DEMO_CONFIG",
    "CentreProtocol",
    "PhantomConfig",
    "ModelSpec",
    "DemoConfig",
    "CaseSpec",
    "StudyPaths",
    "load_demo_config",
    "draw_cases",
    "render_case",
    "generate_study",
    "simulate_predictions",
    "case_rng",
]

#: cases/demo.toml of the source tree (present in a git checkout / editable install).
DEFAULT_DEMO_CONFIG = Path(__file__).resolve().parents[2] / "cases" / "demo.toml"
MANIFEST = "phantoms_manifest.json"
METADATA_COLUMNS = ("case", "centre", "age", "sex", "diagnosis", "nephrectomy", "position", "split")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class CentreProtocol:
    """How one centre scans: grid (SimpleITK x, y, z order), header direction, contrast, noise."""

    name: str
    dataset_id: int
    size_xyz: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    phase: str = "portal_venous"
    noise_hu: float = 12.0
    blur_mm: float = 1.0

    @property
    def dataset_name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_Centre{self.name}"

    def grid(self) -> Grid:
        return Grid.centred(self.size_xyz, self.spacing_xyz_mm, self.direction)

    def as_dict(self) -> dict:
        return {"dataset_id": self.dataset_id, "size_xyz": list(self.size_xyz),
                "spacing_xyz_mm": list(self.spacing_xyz_mm), "direction": list(self.direction),
                "phase": self.phase, "noise_hu": self.noise_hu, "blur_mm": self.blur_mm}


@dataclass(frozen=True)
class PhantomConfig:
    """The ``[phantoms]`` section: seed, case numbers and the case mix. Ages in years."""

    seed: int
    test_cases_per_centre: int
    train_cases_per_centre: int
    centres: tuple[CentreProtocol, ...]
    age_range: tuple[float, float] = (0.5, 18.0)
    prone_fraction: float = 0.2
    renal_tumour_fraction: float = 0.6
    nephrectomy_fraction: float = 0.6

    def as_dict(self) -> dict:
        return {"seed": self.seed, "test_cases_per_centre": self.test_cases_per_centre,
                "train_cases_per_centre": self.train_cases_per_centre, "age_range": list(self.age_range),
                "prone_fraction": self.prone_fraction, "renal_tumour_fraction": self.renal_tumour_fraction,
                "nephrectomy_fraction": self.nephrectomy_fraction,
                "centres": {c.name: c.as_dict() for c in self.centres}}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    trained_on: tuple[str, ...]


@dataclass(frozen=True)
class DemoConfig:
    """Everything the generator needs, read from a study TOML (see :func:`load_demo_config`)."""

    phantoms: PhantomConfig
    error_model: ErrorModel
    models: tuple[ModelSpec, ...]
    toml: dict = field(default_factory=dict)  # the whole study file as read, for the written copy
    #: ``[[observers]]`` names: second observers simulated with :data:`OBSERVER_ERROR_MODEL`.
    observers: tuple[str, ...] = ()

    def with_overrides(self, *, seed: int | None = None, cases_per_centre: int | None = None) -> "DemoConfig":
        """A copy with another seed and/or number of test cases per centre."""
        ph = self.phantoms
        if seed is not None:
            ph = replace(ph, seed=int(seed))
        if cases_per_centre is not None:
            if cases_per_centre < 1:
                raise ValueError(f"cases per centre must be >= 1, got {cases_per_centre}")
            ph = replace(ph, test_cases_per_centre=int(cases_per_centre))
        return replace(self, phantoms=ph)

    def as_dict(self) -> dict:
        out = {"phantoms": self.phantoms.as_dict(), "error_model": self.error_model.as_dict(),
               "models": [{"name": m.name, "trained_on": list(m.trained_on)} for m in self.models]}
        if self.observers:  # the observer model is part of the settings: a change regenerates the study
            out["observers"] = [{"name": o, "error_model": OBSERVER_ERROR_MODEL.as_dict()} for o in self.observers]
        return out


def _tuple(value: Any, n: int, kind: type, where: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{where} must be a list of {n} numbers, got {value!r}")
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _centre_protocol(name: str, data: dict, where: str) -> CentreProtocol:
    known = {"dataset_id", "size_xyz", "spacing_xyz_mm", "direction", "phase", "noise_hu", "blur_mm"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    for key in ("dataset_id", "size_xyz", "spacing_xyz_mm"):
        if key not in data:
            raise ValueError(f"{where}: missing {key!r}")
    size = _tuple(data["size_xyz"], 3, int, f"{where}.size_xyz")
    spacing = _tuple(data["spacing_xyz_mm"], 3, float, f"{where}.spacing_xyz_mm")
    direction = _tuple(data.get("direction", [1, 0, 0, 0, 1, 0, 0, 0, 1]), 9, float, f"{where}.direction")
    d = np.asarray(direction).reshape(3, 3)
    if not np.allclose(d @ d.T, np.eye(3), atol=1e-6):
        raise ValueError(f"{where}.direction is not an orthonormal 3x3 matrix: {list(direction)}")
    if min(size) < 8 or min(spacing) <= 0:
        raise ValueError(f"{where}: size must be >= 8 voxels and spacing > 0 mm, got {size}, {spacing}")
    phase = str(data.get("phase", "portal_venous"))
    if phase not in CONTRAST_PHASES:
        raise ValueError(f"{where}.phase: unknown contrast phase {phase!r}; expected one of {sorted(CONTRAST_PHASES)}")
    dataset_id = int(data["dataset_id"])
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"{where}.dataset_id must be 1..999 (nnU-Net), got {dataset_id}")
    return CentreProtocol(name, dataset_id, size, spacing, direction, phase, float(data.get("noise_hu", 12.0)),
                          float(data.get("blur_mm", 1.0)))


def parse_demo_config(data: dict, source: str = "<toml>") -> DemoConfig:
    """Build a :class:`DemoConfig` from a parsed study TOML (``[phantoms]``, ``[error_model]``, ``[[models]]``)."""
    ph = data.get("phantoms")
    if not isinstance(ph, dict):
        raise ValueError(f"{source}: no [phantoms] section (docs/phantoms.md)")
    known = {"seed", "test_cases_per_centre", "train_cases_per_centre", "age_range", "prone_fraction",
             "renal_tumour_fraction", "nephrectomy_fraction", "centres"}
    unknown = sorted(set(ph) - known)
    if unknown:
        raise ValueError(f"{source}: [phantoms] has unknown keys {unknown}; known: {sorted(known)}")
    centres_tbl = ph.get("centres")
    if not isinstance(centres_tbl, dict) or not centres_tbl:
        raise ValueError(f"{source}: [phantoms.centres.NAME] tables are missing")
    centres = tuple(_centre_protocol(str(n), c, f"{source}: [phantoms.centres.{n}]") for n, c in centres_tbl.items())
    ids = [c.dataset_id for c in centres]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{source}: two centres share a dataset_id: {ids}")
    try:
        age_range = _tuple(ph.get("age_range", [0.5, 18.0]), 2, float, f"{source}: [phantoms] age_range")
        cfg = PhantomConfig(
            seed=int(ph.get("seed", 0)),
            test_cases_per_centre=int(ph.get("test_cases_per_centre", 20)),
            train_cases_per_centre=int(ph.get("train_cases_per_centre", 6)),
            centres=centres,
            age_range=age_range,
            prone_fraction=float(ph.get("prone_fraction", 0.2)),
            renal_tumour_fraction=float(ph.get("renal_tumour_fraction", 0.6)),
            nephrectomy_fraction=float(ph.get("nephrectomy_fraction", 0.6)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: [phantoms]: {exc}") from exc
    if not 0.0 <= cfg.age_range[0] <= cfg.age_range[1] <= 18.0:
        raise ValueError(f"{source}: [phantoms] age_range must lie within 0..18 years, got {list(cfg.age_range)}")
    if cfg.test_cases_per_centre < 1 or cfg.train_cases_per_centre < 0:
        raise ValueError(f"{source}: [phantoms] needs >= 1 test case and >= 0 training cases per centre")
    for key in ("prone_fraction", "renal_tumour_fraction", "nephrectomy_fraction"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"{source}: [phantoms] {key} must be in [0, 1], got {getattr(cfg, key)}")

    error_model = ErrorModel.from_dict(data.get("error_model", {}), source)
    names = {c.name for c in centres}
    models = []
    for m in data.get("models", []):
        if "name" not in m:
            raise ValueError(f"{source}: a [[models]] entry has no name")
        trained = tuple(str(t) for t in m.get("trained_on", []))
        bad = sorted(set(trained) - names)
        if bad or not trained:
            raise ValueError(f"{source}: model {m['name']!r} trained_on {list(trained)} must name centres of "
                             f"[phantoms.centres] ({sorted(names)})")
        models.append(ModelSpec(str(m["name"]), trained))
    observers = []
    for o in data.get("observers", []) or []:
        if not isinstance(o, dict) or "name" not in o:
            raise ValueError(f"{source}: an [[observers]] entry has no name")
        observers.append(str(o["name"]))
    taken = [m.name for m in models] + observers
    if len(set(taken)) != len(taken):
        raise ValueError(f"{source}: model and observer names must differ, got {taken}")
    return DemoConfig(cfg, error_model, tuple(models), data, tuple(observers))


def load_demo_config(path: str | Path | None = None) -> DemoConfig:
    """Read ``[phantoms]``, ``[error_model]`` and ``[[models]]`` from a study TOML.

    ``None`` reads :data:`DEFAULT_DEMO_CONFIG` (cases/demo.toml). Raises ValueError naming
    the file on a missing file, bad TOML or bad values.
    """
    path = Path(path) if path is not None else DEFAULT_DEMO_CONFIG
    if not path.is_file():
        raise ValueError(f"{path}: study file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read TOML: {exc}") from exc
    return parse_demo_config(data, str(path))


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class CaseSpec:
    """One synthetic patient (the metadata row). Age in years."""

    case: str
    centre: str
    split: str  # "train" or "test"
    age: float
    sex: str
    diagnosis: str  # "renal tumour" or "neuroblastoma"
    nephrectomy: str  # "none", "left", "right"
    position: str  # "supine" or "prone"

    def as_row(self) -> dict:
        return {"case": self.case, "centre": self.centre, "age": f"{self.age:.1f}", "sex": self.sex,
                "diagnosis": self.diagnosis, "nephrectomy": self.nephrectomy, "position": self.position,
                "split": self.split}


def _key(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def case_rng(seed: int, *keys: str | int) -> np.random.Generator:
    """An independent generator for one stream, identified by a purpose and names.

    Streams are keyed by names (centre, case, model), not list positions: a case's anatomy
    and a model's errors on it do not depend on which other models are configured.
    """
    spawn = tuple(k if isinstance(k, int) else _key(k) for k in keys)
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=spawn))


def _exact_count(fraction: float, n: int) -> int:
    return min(n, int(math.ceil(fraction * n - 1e-9)))


def draw_cases(config: PhantomConfig) -> list[CaseSpec]:
    """The case list (train then test, per centre) with exact proportions of prone
    cases, renal tumours and nephrectomies (``ceil(fraction * n)``)."""
    out: list[CaseSpec] = []
    lo, hi = config.age_range
    for centre in config.centres:
        for split, n, tag in (("train", config.train_cases_per_centre, "tr"), ("test", config.test_cases_per_centre, "ts")):
            if n == 0:
                continue
            rng = case_rng(config.seed, 0, centre.name, split)
            ages = np.clip(rng.gamma(2.0, 3.0, n), lo, hi)
            sexes = rng.choice(["F", "M"], n)
            prone = np.zeros(n, bool)
            prone[rng.permutation(n)[: _exact_count(config.prone_fraction, n)]] = True
            n_renal = _exact_count(config.renal_tumour_fraction, n)
            renal = np.zeros(n, bool)
            renal_idx = rng.permutation(n)[:n_renal]
            renal[renal_idx] = True
            neph = np.full(n, "none", dtype=object)
            chosen = rng.permutation(renal_idx)[: _exact_count(config.nephrectomy_fraction, n_renal)]
            sides = rng.choice(["left", "right"], len(chosen))
            neph[chosen] = sides
            for i in range(n):
                out.append(CaseSpec(
                    case=f"{centre.name}_{tag}_{i + 1:03d}", centre=centre.name, split=split,
                    age=round(float(ages[i]), 1), sex=str(sexes[i]),
                    diagnosis="renal tumour" if renal[i] else "neuroblastoma",
                    nephrectomy=str(neph[i]), position="prone" if prone[i] else "supine"))
    return out


def render_case(spec: CaseSpec, centre: CentreProtocol, seed: int, *,
                nephrectomy: str | None = None) -> tuple[Volume, Volume]:
    """CT (int16 HU) and reference labels (uint8) of one case on its centre's grid.

    ``nephrectomy`` overrides the case's own value (e.g. ``"none"`` to see where the removed
    kidney would have been); the anatomy and the noise are otherwise identical.
    """
    rng = case_rng(seed, 1, spec.centre, spec.case)
    anatomy = build_anatomy(spec.age, rng)
    grid = centre.grid()
    ct, labels = render(anatomy, grid, phase=centre.phase, noise_hu=centre.noise_hu, blur_mm=centre.blur_mm,
                        rng=rng, nephrectomy=spec.nephrectomy if nephrectomy is None else nephrectomy,
                        prone=spec.position == "prone")
    spacing = grid.spacing_zyx
    return (Volume(ct, spacing, grid.origin, grid.direction), Volume(labels, spacing, grid.origin, grid.direction))


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class StudyPaths:
    """Where a generated study lies (absolute paths)."""

    root: Path
    study_toml: Path
    manifest: Path
    nnunet_raw: Path
    datasets: dict[str, Path]
    metadata: dict[str, Path]
    predictions: Path
    injected_errors: Path
    generated: bool  # False when an identical study was already there and nothing was written

    def prediction_dir(self, model: str, centre: str) -> Path:
        return self.predictions / model / centre


def study_paths(out_dir: str | Path, config: DemoConfig, generated: bool = True) -> StudyPaths:
    root = Path(out_dir).resolve()
    raw = root / "nnUNet_raw"
    return StudyPaths(
        root=root, study_toml=root / "study.toml", manifest=root / MANIFEST, nnunet_raw=raw,
        datasets={c.name: raw / c.dataset_name for c in config.phantoms.centres},
        metadata={c.name: root / f"metadata_{c.name}.csv" for c in config.phantoms.centres},
        predictions=root / "predictions", injected_errors=root / "predictions" / "injected_errors.csv",
        generated=generated)


def _csv_text(rows: Iterable[dict], columns: Iterable[str]) -> str:
    buf = _stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(csv_row(row))
    return buf.getvalue()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=True)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else json.dumps(k)


def to_toml(data: dict) -> str:
    """Serialise nested dicts / arrays of tables of scalars and lists to TOML text."""
    lines: list[str] = []

    def table(d: dict, prefix: str) -> None:
        scalars = [(k, v) for k, v in d.items() if not isinstance(v, dict) and not _is_aot(v)]
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in d.items():
            name = f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k)
            if isinstance(v, dict):
                lines.append("")
                lines.append(f"[{name}]")
                table(v, name)
            elif _is_aot(v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{name}]]")
                    table(item, name)

    table(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_aot(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _study_toml(config: DemoConfig) -> str:
    data = dict(config.toml)
    centres_in = {c.get("name"): c for c in data.get("centres", []) if isinstance(c, dict)}
    out: dict[str, Any] = {"study": data.get("study", {"name": "demo", "labels": "default"})}
    out["centres"] = []
    for c in config.phantoms.centres:
        entry = dict(centres_in.get(c.name, {}))
        entry.update({"name": c.name, "images": f"nnUNet_raw/{c.dataset_name}/imagesTs",
                      "reference": f"nnUNet_raw/{c.dataset_name}/labelsTs", "metadata": f"metadata_{c.name}.csv"})
        out["centres"].append(entry)
    models_in = {m.get("name"): m for m in data.get("models", []) if isinstance(m, dict)}
    out["models"] = []
    for m in config.models:
        entry = dict(models_in.get(m.name, {}))
        entry.update({"name": m.name, "trained_on": list(m.trained_on), "predictions": "predictions/{model}/{centre}"})
        out["models"].append(entry)
    if config.observers:
        out["observers"] = [{"name": o, "predictions": "predictions/{model}/{centre}"} for o in config.observers]
    for k, v in data.items():
        if k not in out and k not in ("phantoms", "error_model", "observers"):
            out[k] = v
    eff = config.as_dict()
    out["phantoms"] = eff["phantoms"]
    out["error_model"] = eff["error_model"]
    header = ("# Written by `oarbench phantoms` (oarbench.phantoms.generate_study). Paths are relative to this\n"
              "# file's folder. [phantoms] and [error_model] hold the settings actually used.\n\n")
    if not out["models"]:
        del out["models"]
    return header + to_toml(out)


def _dataset_json(centre: CentreProtocol, n_train: int, n_test: int) -> str:
    data = {
        "name": centre.dataset_name,
        "description": f"oarbench synthetic paediatric CT, centre {centre.name} ({centre.phase} phase)",
        "reference": "synthetic (oarbench.phantoms)",
        "licence": "CC0-1.0",
        "channel_names": {"0": "CT"},
        "labels": DEFAULT_LABELS.to_dataset_json_labels(),
        "numTraining": n_train,
        "numTest": n_test,
        "file_ending": ".nii.gz",
    }
    return json.dumps(data, indent=2) + "\n"


def _owned_paths(paths: StudyPaths) -> list[Path]:
    return [paths.study_toml, paths.manifest, paths.predictions, *paths.datasets.values(), *paths.metadata.values()]


def generate_study(out_dir: str | Path, config: DemoConfig, *, force: bool = False,
                   progress: Any = None) -> StudyPaths:
    """Generate the whole synthetic study under ``out_dir`` (see the module docstring).

    When ``out_dir`` already holds a study generated with the same settings nothing is
    written (``StudyPaths.generated`` is False). Other existing study files raise ValueError
    unless ``force`` is True, which removes the generator's own files and folders first
    (never anything else in ``out_dir``). ``progress(message)`` is called per case when given.
    """
    paths = study_paths(out_dir, config)
    wanted = config.as_dict()
    if paths.manifest.is_file() and not force:
        try:
            old = json.loads(paths.manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{paths.manifest}: unreadable manifest ({exc}); use force to regenerate") from exc
        if old.get("config") == json.loads(json.dumps(wanted)):
            return replace(paths, generated=False)
        raise ValueError(f"{paths.root}: holds a synthetic study generated with other settings; "
                         "use --force to replace it")
    existing = [p for p in _owned_paths(paths) if p.exists()]
    if existing and not force:
        raise ValueError(f"{paths.root}: incomplete or foreign study files present ({existing[0].name}, ...); "
                         "use --force to replace them")
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()

    written: list[Path] = []
    cases = draw_cases(config.phantoms)
    centres = {c.name: c for c in config.phantoms.centres}
    test_refs: dict[tuple[str, str], Volume] = {}
    for spec in cases:
        centre = centres[spec.centre]
        image, labels = render_case(spec, centre, config.phantoms.seed)
        ds = paths.datasets[spec.centre]
        sub = ("imagesTr", "labelsTr") if spec.split == "train" else ("imagesTs", "labelsTs")
        written.append(write_volume(image, ds / sub[0] / f"{spec.case}_0000.nii.gz"))
        written.append(write_volume(labels, ds / sub[1] / f"{spec.case}.nii.gz"))
        if spec.split == "test":
            test_refs[(spec.centre, spec.case)] = labels
        if progress is not None:
            progress(f"{spec.centre} {spec.split} {spec.case}")

    for name, centre in centres.items():
        rows = [c for c in cases if c.centre == name]
        n_train = sum(c.split == "train" for c in rows)
        written.append(atomic_write_text(paths.datasets[name] / "dataset.json",
                                         _dataset_json(centre, n_train, len(rows) - n_train)))
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (paths.datasets[name] / sub).mkdir(parents=True, exist_ok=True)
        written.append(atomic_write_text(paths.metadata[name], _csv_text((c.as_row() for c in rows), METADATA_COLUMNS)))

    injected = _simulate(paths, config, [c for c in cases if c.split == "test"], test_refs, progress)
    written.extend(injected[1])
    written.append(atomic_write_text(paths.study_toml, _study_toml(config)))

    manifest = {
        "generator": "oarbench.phantoms",
        "config": wanted,
        "files": {p.relative_to(paths.root).as_posix(): sha256_file(p) for p in sorted(written)},
    }
    atomic_write_text(paths.manifest, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return paths


def _simulate(paths: StudyPaths, config: DemoConfig, test_cases: list[CaseSpec],
              refs: dict[tuple[str, str], Volume], progress: Any = None) -> tuple[list[InjectedError], list[Path]]:
    written: list[Path] = []
    errors: list[InjectedError] = []
    for spec in test_cases:
        ref = refs[(spec.centre, spec.case)]
        sdfs = signed_distances(ref.array, ref.spacing)
        for model in config.models:
            rng = case_rng(config.phantoms.seed, 2, model.name, spec.centre, spec.case)
            pred, inj = simulate_case(
                ref.array, ref.spacing, ref.direction, model=model.name, centre=spec.centre, case=spec.case,
                in_domain=spec.centre in model.trained_on, federated=len(model.trained_on) > 1,
                nephrectomy=spec.nephrectomy, prone=spec.position == "prone", params=config.error_model,
                rng=rng, sdfs=dict(sdfs))
            errors.extend(inj)
            written.append(write_volume(ref.with_array(pred), paths.prediction_dir(model.name, spec.centre) / f"{spec.case}.nii.gz"))
        for observer in config.observers:  # a second clinician: boundary disagreement only
            rng = case_rng(config.phantoms.seed, 3, observer, spec.centre, spec.case)
            pred, _ = simulate_case(
                ref.array, ref.spacing, ref.direction, model=observer, centre=spec.centre, case=spec.case,
                in_domain=True, federated=False, nephrectomy=spec.nephrectomy, prone=False,
                params=OBSERVER_ERROR_MODEL, rng=rng, sdfs=dict(sdfs))
            written.append(write_volume(ref.with_array(pred), paths.prediction_dir(observer, spec.centre) / f"{spec.case}.nii.gz"))
        if progress is not None:
            progress(f"predictions {spec.case}")
    columns = ("model", "centre", "case", "error", "structure", "voxels", "volume_ml")
    rows = []
    for e in errors:
        row = e.as_dict()
        row["volume_ml"] = f"{e.volume_ml:.6f}"
        rows.append(row)
    written.append(atomic_write_text(paths.injected_errors, _csv_text(rows, columns)))
    return errors, written


def simulate_predictions(out_dir: str | Path, config: DemoConfig) -> list[InjectedError]:
    """(Re)write the simulated predictions of a generated study from its reference labels on disk.

    Uses ``config.error_model`` and ``config.models``; returns the injected errors (also
    written to ``predictions/injected_errors.csv``). The manifest is not updated.
    """
    paths = study_paths(out_dir, config)
    cases = [c for c in draw_cases(config.phantoms) if c.split == "test"]
    refs = {}
    for spec in cases:
        f = paths.datasets[spec.centre] / "labelsTs" / f"{spec.case}.nii.gz"
        refs[(spec.centre, spec.case)] = read_volume(f)
    return _simulate(paths, config, cases, refs)[0]
