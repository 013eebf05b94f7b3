"""Structure names as centres write them -> the label map's TG-263 names.

Resolution order for one ROI name (the first step that decides wins):

1. the aliases file, exact names (``[centre.NAME.aliases]`` before ``[aliases]``);
2. the aliases file, regular expressions (``[centre.NAME.patterns]`` before
   ``[patterns]``; full match, case-insensitive); two patterns with different
   targets make the name *ambiguous*;
3. the name itself when the label map holds it;
4. the built-in aliases of :func:`oarbench.labels.canonical_name` (``L_Kidney``,
   ``kidney_left``, ``IVC``, ...);
5. the built-in clinical spellings of the 19 default organs: Dutch and German
   (``Lever``/``Leber``, ``Nier links``/``Niere li.``, ``Speiseröhre``/``Speiseroehre``,
   ...), with and without umlauts, and English ones beyond step 4 (``Small_Intestine``,
   ``Vena_Cava_Inferior``, ``Vertebral_Bodies``, ...).

A name that no step maps to a structure of the label map is *unmapped*. Nothing is
guessed: unmapped and ambiguous names are reported, and so are two ROIs of one
RTSTRUCT that map to the same structure (both are left out). See docs/dicom.md.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from oarbench.labels import LabelMap, canonical_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Aliases", "NameMatch", "NameResolver", "load_aliases", "clinical_name", "UNMAPPED", "AMBIGUOUS"]

UNMAPPED = "unmapped"
AMBIGUOUS = "ambiguous"

# Organ words (lower case, umlauts written as in the language), Dutch and German -> TG-263
# stem of the default map. Lateral organs get their side from a side word.
_CLINICAL_ORGANS: dict[str, str] = {
    # Dutch
    "lever": "Liver",
    "milt": "Spleen",
    "nier": "Kidney",
    "bijnier": "Glnd_Adrenal",
    "alvleesklier": "Pancreas",
    "maag": "Stomach",
    "twaalfvingerigedarm": "Duodenum",
    "darm": "Bowel",
    "darmen": "Bowel",
    "galblaas": "Gallbladder",
    "slokdarm": "Esophagus",
    "hart": "Heart",
    "long": "Lung",
    "ruggenmerg": "SpinalCord",
    "wervels": "Vertebrae",
    "wervel": "Vertebrae",
    "wervellichamen": "Vertebrae",
    "wervelkolom": "Vertebrae",
    "venacavainferior": "VenaCava_I",
    "vci": "VenaCava_I",
    "ondersteholleader": "VenaCava_I",
    "aorta": "A_Aorta",
    # German
    "leber": "Liver",
    "milz": "Spleen",
    "niere": "Kidney",
    "nebenniere": "Glnd_Adrenal",
    "pankreas": "Pancreas",
    "bauchspeicheldrüse": "Pancreas",
    "magen": "Stomach",
    "zwölffingerdarm": "Duodenum",
    "darm": "Bowel",
    "darmschlingen": "Bowel",
    "gallenblase": "Gallbladder",
    "ösophagus": "Esophagus",
    "speiseröhre": "Esophagus",
    "herz": "Heart",
    "lunge": "Lung",
    "lungenflügel": "Lung",
    "myelon": "SpinalCord",
    "rückenmark": "SpinalCord",
    "wirbelkörper": "Vertebrae",
    "wirbelsäule": "Vertebrae",
    "wirbel": "Vertebrae",
    "unterehohlvene": "VenaCava_I",
    "hauptschlagader": "A_Aorta",
}
# English spellings beyond oarbench.labels.canonical_name (same normalisation as above).
_ENGLISH_EXTRA: dict[str, str] = {
    "liver": "Liver",
    "spleen": "Spleen",
    "kidney": "Kidney",
    "adrenal": "Glnd_Adrenal",
    "pancreas": "Pancreas",
    "stomach": "Stomach",
    "duodenum": "Duodenum",
    "bowel": "Bowel",
    "intestine": "Bowel",
    "intestines": "Bowel",
    "esophagus": "Esophagus",
    "oesophagus": "Esophagus",
    "heart": "Heart",
    "lung": "Lung",
    "spinalcord": "SpinalCord",
    "spinalcanal": "SpinalCord",
    "ivc": "VenaCava_I",
    "vertebrae": "Vertebrae",
    "aortaabd": "A_Aorta",
    "aortadescendens": "A_Aorta",
    "aortadesc": "A_Aorta",
    "descendingaorta": "A_Aorta",
    "aortadescending": "A_Aorta",
    "venacavainferior": "VenaCava_I",
    "vcinf": "VenaCava_I",
    "vertebralbody": "Vertebrae",
    "vertebralbodies": "Vertebrae",
    "vertebralcolumn": "Vertebrae",
    "gallbladder": "Gallbladder",
    "gb": "Gallbladder",
    "aortaabdominal": "A_Aorta",
    "abdominalaorta": "A_Aorta",
    "adrenalgland": "Glnd_Adrenal",
    "suprarenalgland": "Glnd_Adrenal",
    "kidneys": "Kidney",
    "lungs": "Lung",
}
_CLINICAL_SIDES = {
    "links": "L", "li": "L", "l": "L", "lks": "L", "left": "L", "lt": "L", "sin": "L", "sinister": "L",
    "rechts": "R", "re": "R", "r": "R", "rts": "R", "right": "R", "rt": "R", "dex": "R", "dexter": "R",
}
_LATERAL = {"Kidney", "Glnd_Adrenal", "Lung"}
# Words that mark who or what drew a contour, not what it is: dropped (``Liver_auto``,
# ``Liver (AI)``); a leading ``z`` (``z_Liver``, the prefix that sorts a ROI last in a TPS) too.
_DECORATIONS = {"auto", "ai", "ki", "dl"}
# Small bowel only: TG-263's Bowel is the small and the large bowel together, so these are not Bowel.
_SMALL_BOWEL = {"smallintestine", "intestinesmall", "smallbowel", "bowelsmall", "dunnedarm", "dunnendarm",
                "duenndarm", "dunndarm", "intestinumtenue"}
_UMLAUTS = {"ä": ("ae", "a"), "ö": ("oe", "o"), "ü": ("ue", "u"), "ß": ("ss", "ss")}


def _fold(text: str) -> str:
    """Lower case, umlauts as two letters (``ü`` -> ``ue``), other accents dropped."""
    text = text.lower()
    for umlaut, (two, _) in _UMLAUTS.items():
        text = text.replace(umlaut, two)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")


def _spellings(word: str) -> set[str]:
    """A word with umlauts as two letters and as the bare vowel (``rückenmark`` -> ``rueckenmark``, ``ruckenmark``)."""
    forms = {word}
    for umlaut, variants in _UMLAUTS.items():
        forms = {f.replace(umlaut, v) for f in forms for v in variants}
    return forms


_CLINICAL_TABLE: dict[str, str] = {
    spelling: stem for word, stem in _CLINICAL_ORGANS.items() for spelling in _spellings(word)
}
_CLINICAL_TABLE.update(_ENGLISH_EXTRA)


def clinical_name(name: str) -> str | None:
    """TG-263 name for a Dutch or German clinical spelling (or an English one beyond
    :func:`oarbench.labels.canonical_name`, such as ``Small_Intestine``), or ``None``.

    ``"Nier links"``, ``"Niere li."`` -> ``"Kidney_L"``; ``"Speiseröhre"``,
    ``"Speiseroehre"``, ``"Speiserohre"`` -> ``"Esophagus"``. A lateral organ without a
    side word (``"Nier"``) gives ``None``: the side is never guessed.
    """
    tokens = [t for t in re.split(r"[\s_\-.,/()]+", _fold(name.strip())) if t]
    if len(tokens) >= 2 and tokens[0] == "z":
        tokens = tokens[1:]
    if len(tokens) >= 2:
        tokens = [t for t in tokens if t not in _DECORATIONS] or tokens
    side = None
    rest = []
    for tok in tokens:
        if tok in _CLINICAL_SIDES and side is None and rest:
            side = _CLINICAL_SIDES[tok]
        else:
            rest.append(tok)
    if side is None and len(tokens) >= 2 and tokens[0] in _CLINICAL_SIDES:
        side, rest = _CLINICAL_SIDES[tokens[0]], tokens[1:]
    word = "".join(rest)
    stem = _CLINICAL_TABLE.get(word)
    if stem is None and side is None:
        # a side letter run into the organ word: RLung, LKidney, LungR, KidneyL
        for glued, organ in ((word[:1], word[1:]), (word[-1:], word[:-1])):
            if glued in ("l", "r") and _CLINICAL_TABLE.get(organ) in _LATERAL:
                side, stem = glued.upper(), _CLINICAL_TABLE[organ]
                break
    if stem is None:
        return None
    if stem in _LATERAL:
        return f"{stem}_{side}" if side else None
    return stem if side is None else None


def small_bowel_only(name: str) -> bool:
    """True for a name that means the small bowel alone (``Bowel_Small``, ``Dünndarm``, ``Dunne darm``)."""
    return "".join(t for t in re.split(r"[\s_\-.,/()]+", _fold(name.strip())) if t) in _SMALL_BOWEL


def _sideless(name: str) -> bool:
    """True for a paired organ named without a side (``Nier``, ``Kidney``, ``Lungs``)."""
    word = "".join(t for t in re.split(r"[\s_\-.,/()]+", _fold(name.strip())) if t)
    return _CLINICAL_TABLE.get(word) in _LATERAL or word in ("kidney", "lung", "adrenal", "adrenals", "nieren",
                                                              "lungen", "longen", "bijnieren", "nebennieren")


@dataclass(frozen=True)
class Aliases:
    """User aliases: exact names and regular expressions (``re.fullmatch``, case-insensitive),
    common to all centres and per centre."""

    exact: dict[str, str] = field(default_factory=dict)
    patterns: tuple[tuple[str, str], ...] = ()
    centre_exact: dict[str, dict[str, str]] = field(default_factory=dict)
    centre_patterns: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    source: str = ""


def _string_table(value: object, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table of \"name\" = \"TG-263 name\"")
    out = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise ValueError(f"{where}: {k!r} must map to a structure name (string), got {v!r}")
        out[str(k)] = v
    return out


def _patterns(value: object, where: str) -> tuple[tuple[str, str], ...]:
    table = _string_table(value, where)
    for pattern in table:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{where}: bad regular expression {pattern!r}: {exc}") from exc
    return tuple(table.items())


def load_aliases(path: str | Path | None, labels: LabelMap | None = None) -> Aliases:
    """Read an aliases TOML::

        [aliases]                      # exact ROI names, every centre
        "GTV-lever" = "Liver"
        [patterns]                     # regular expressions, full match, case-insensitive
        "nier[ _]?l(i|inks)?" = "Kidney_L"
        [centre.A.aliases]             # only for --centre A
        "Nier_L_def" = "Kidney_L"
        [centre.A.patterns]
        "bijnier.*links" = "Glnd_Adrenal_L"

    Every target must be a structure of ``labels`` (when given). Raises ValueError
    naming the file on any problem.
    """
    if path is None:
        return Aliases()
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: aliases file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: cannot read aliases TOML: {exc}") from exc
    unknown = sorted(set(data) - {"aliases", "patterns", "centre"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; expected [aliases], [patterns], [centre.NAME.*]")
    exact = _string_table(data.get("aliases", {}), f"{path}: [aliases]")
    patterns = _patterns(data.get("patterns", {}), f"{path}: [patterns]")
    centre_exact: dict[str, dict[str, str]] = {}
    centre_patterns: dict[str, tuple[tuple[str, str], ...]] = {}
    centres = data.get("centre", {})
    if not isinstance(centres, dict):
        raise ValueError(f"{path}: [centre.NAME] must be tables")
    for name, tbl in centres.items():
        if not isinstance(tbl, dict) or set(tbl) - {"aliases", "patterns"}:
            raise ValueError(f"{path}: [centre.{name}] may hold only [centre.{name}.aliases] and "
                             f"[centre.{name}.patterns]")
        centre_exact[name] = _string_table(tbl.get("aliases", {}), f"{path}: [centre.{name}.aliases]")
        centre_patterns[name] = _patterns(tbl.get("patterns", {}), f"{path}: [centre.{name}.patterns]")
    if labels is not None:
        targets = list(exact.values()) + [t for _, t in patterns]
        targets += [t for d in centre_exact.values() for t in d.values()]
        targets += [t for p in centre_patterns.values() for _, t in p]
        bad = sorted({t for t in targets if t not in labels.names})
        if bad:
            raise ValueError(f"{path}: targets {bad} are not structures of the label map ({', '.join(labels.names)})")
    return Aliases(exact, patterns, centre_exact, centre_patterns, str(path))


@dataclass(frozen=True)
class NameMatch:
    """How one ROI name was resolved: ``structure`` is a label-map name, ``"unmapped"`` or
    ``"ambiguous"``; ``rule`` says which step decided (or why not)."""

    name: str
    structure: str
    rule: str

    @property
    def mapped(self) -> bool:
        return self.structure not in (UNMAPPED, AMBIGUOUS)


class NameResolver:
    """Resolve ROI names to the structures of one label map (see the module docstring)."""

    def __init__(self, labels: LabelMap, aliases: Aliases | None = None, centre: str | None = None) -> None:
        self.labels = labels
        aliases = aliases or Aliases()
        self._exact = dict(aliases.exact)
        self._patterns = list(aliases.patterns)
        if centre is not None:
            self._exact = {**self._exact, **aliases.centre_exact.get(centre, {})}
            self._patterns = list(aliases.centre_patterns.get(centre, ())) + self._patterns
        self._centre_exact = aliases.centre_exact.get(centre, {}) if centre is not None else {}
        self._names = set(labels.names)

    def resolve(self, name: str) -> NameMatch:
        if name in self._centre_exact:
            return NameMatch(name, self._centre_exact[name], "aliases file (centre)")
        if name in self._exact:
            return NameMatch(name, self._exact[name], "aliases file")
        hits = {target for pattern, target in self._patterns if re.fullmatch(pattern, name.strip(), re.IGNORECASE)}
        if len(hits) > 1:
            return NameMatch(name, AMBIGUOUS, f"patterns give {sorted(hits)}")
        if hits:
            return NameMatch(name, hits.pop(), "aliases file pattern")
        if name in self._names:
            return NameMatch(name, name, "exact")
        if small_bowel_only(name) and "Bowel" in self._names:
            return NameMatch(name, UNMAPPED, "small bowel only; Bowel is the small and large bowel (TG-263): "
                                             "map it with --aliases if that is what the centre means")
        canon = canonical_name(name)
        if canon != name and canon in self._names:
            return NameMatch(name, canon, "built-in alias")
        clinical = clinical_name(name)
        if clinical is not None and clinical in self._names:
            return NameMatch(name, clinical, "built-in clinical spelling")
        if _sideless(name):
            return NameMatch(name, UNMAPPED, "paired organ without a side")
        return NameMatch(name, UNMAPPED, "no rule matches")

    def resolve_all(self, names: list[str]) -> list[NameMatch]:
        """Resolve the ROI names of one RTSTRUCT; two names that reach one structure are
        both marked ambiguous (neither is used)."""
        matches = [self.resolve(n) for n in names]
        count: dict[str, int] = {}
        for m in matches:
            if m.mapped:
                count[m.structure] = count.get(m.structure, 0) + 1
        return [NameMatch(m.name, AMBIGUOUS, f"{count[m.structure]} ROIs map to {m.structure}")
                if m.mapped and count[m.structure] > 1 else m for m in matches]
