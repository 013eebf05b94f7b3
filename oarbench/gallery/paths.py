"""Path lookup: where a case's CT, reference and prediction files are."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pandas as pd

__all__ = ["PathResolver", "find_case_file"]

_ORIGINAL = "original"


@dataclass(frozen=True)
class PathResolver:
    """Where a case's CT, reference and prediction files are.

    Each of ``images``, ``reference`` and ``predictions`` is a folder path that may
    contain the placeholders ``{centre}``, ``{model}`` and ``{condition}``
    (``predictions = "preds/{model}/{centre}"``). ``images`` and ``reference``
    may instead be a mapping centre -> folder (as a study TOML gives them).
    Images follow nnU-Net naming (``CASE_0000.nii.gz``), labels ``CASE.nii.gz``.
    A prediction pattern without ``{condition}`` serves condition ``original``
    only; rows of other conditions then have no prediction file.
    """

    images: str | Mapping[str, str]
    reference: str | Mapping[str, str]
    predictions: str | Mapping[str, str]
    source: str = "command line"

    @classmethod
    def from_folders(cls, images: str | Path, reference: str | Path, predictions: str | Path) -> "PathResolver":
        return cls(str(images), str(reference), str(predictions), "command line")

    @classmethod
    def from_study(cls, path: str | Path) -> "PathResolver":
        """Folders from a study TOML (docs/study-toml.md), read with :func:`oarbench.study.load_study`.

        ``[[centres]]`` give ``images`` and ``reference`` per centre, ``[[models]]``
        a ``predictions`` pattern per model (``{model}``, ``{centre}`` and, for
        robustness conditions, ``{condition}`` are filled in); relative paths are
        relative to the TOML file's folder.
        """
        from oarbench.study import load_study

        study = load_study(path)
        images: dict[str, str] = {}
        reference: dict[str, str] = {}
        for c in study.centres:
            if c.images is None:
                raise ValueError(f"{path}: centre {c.name!r} has no 'images' folder; the gallery needs the CT images")
            images[c.name] = str(c.images)
            reference[c.name] = str(c.reference)
        predictions: dict[str, str] = {}
        for m in (*study.models, *getattr(study, "observers", ())):  # a second observer is drawn like a model
            q = Path(m.predictions).expanduser()
            predictions[m.name] = str(q if q.is_absolute() else m.root / q)
        return cls(images, reference, predictions, str(path))

    def _folder(self, what: str, spec: str | Mapping[str, str], key: str, fields: Mapping[str, str]) -> Path:
        if isinstance(spec, Mapping):
            if fields[key] not in spec:
                raise ValueError(f"{self.source}: no {what} folder for {key} {fields[key]!r} (have {', '.join(spec)})")
            pattern = spec[fields[key]]
        else:
            pattern = spec
        try:
            return Path(pattern.format(**fields))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{self.source}: bad placeholder in {what} path {pattern!r}: {exc}") from exc

    def folders(self, centre: str, model: str, condition: str = _ORIGINAL) -> tuple[Path, Path, Path]:
        """(images, reference, predictions) folders for one centre/model/condition.

        Raises ValueError when the prediction pattern cannot tell conditions apart
        and ``condition`` is not ``original``.
        """
        fields = {"centre": centre, "model": model, "condition": condition}
        pred_pattern = self.predictions[model] if isinstance(self.predictions, Mapping) and model in self.predictions else self.predictions
        if isinstance(pred_pattern, Mapping):
            raise ValueError(f"{self.source}: no predictions pattern for model {model!r} (have {', '.join(pred_pattern)})")
        if condition != _ORIGINAL and "{condition}" not in pred_pattern:
            raise ValueError(
                f"{self.source}: predictions pattern {pred_pattern!r} has no {{condition}} placeholder, "
                f"so predictions under condition {condition!r} cannot be found"
            )
        return (
            self._folder("images", self.images, "centre", fields),
            self._folder("reference", self.reference, "centre", fields),
            self._folder("predictions", pred_pattern, "model", fields),
        )

    def check_unambiguous(self, table: pd.DataFrame) -> None:
        """Raise ValueError when plain folders would serve several centres or models."""
        for what, spec, col, ph in (
            ("images", self.images, "centre", "{centre}"),
            ("reference", self.reference, "centre", "{centre}"),
            ("predictions", self.predictions, "model", "{model}"),
        ):
            if isinstance(spec, str) and ph not in spec:
                values = sorted(set(map(str, table[col])))
                if len(values) > 1:
                    raise ValueError(
                        f"{self.source}: the {what} folder {spec!r} has no {ph} placeholder but the table has "
                        f"{len(values)} {col}s ({', '.join(values)}); use a study TOML or put {ph} in the path"
                    )
        if isinstance(self.predictions, str) and "{centre}" not in self.predictions:
            centres = sorted(set(map(str, table["centre"])))
            if len(centres) > 1:
                raise ValueError(
                    f"{self.source}: the predictions folder {self.predictions!r} has no {{centre}} placeholder but the "
                    f"table has {len(centres)} centres ({', '.join(centres)})"
                )



def find_case_file(folder: Path, case: str, images: bool, cache: dict[tuple[str, bool], dict[str, Path]]) -> Path:
    from oarbench.io import find_cases

    key = (str(folder), images)
    if key not in cache:
        cache[key] = find_cases(folder, images=images)
    files = cache[key]
    if case not in files:
        raise ValueError(f"{folder}: no file for case {case!r}")
    return files[case]

