"""CT display windows, chosen by structure.

Each structure is shown in the window a reader would use for it: lungs, lung
lobes and airways in a lung window, bones in a bone window, the brain in a
brain window, everything else in a soft-tissue (abdomen) window.
"""

from __future__ import annotations

import re

from oarbench.tiles import Window

__all__ = ["Window", "ABDOMEN_WINDOW", "LUNG_WINDOW", "BONE_WINDOW", "BRAIN_WINDOW", "WINDOW_RULES", "window_for"]


ABDOMEN_WINDOW = Window(400.0, 40.0, "abdomen")
LUNG_WINDOW = Window(1500.0, -600.0, "lung")
BONE_WINDOW = Window(1800.0, 400.0, "bone")
BRAIN_WINDOW = Window(80.0, 40.0, "brain")

#: (regular expression on the lower-case structure name, window), first match wins;
#: no match gives :data:`ABDOMEN_WINDOW`. Names are matched as written and as their
#: TG-263 form (``kidney_left`` and ``Kidney_L`` alike).
WINDOW_RULES: tuple[tuple[str, Window], ...] = (
    (r"lung|trachea|bronch", LUNG_WINDOW),
    (r"vertebra|rib(_|$)|ribs|sternum|clavic|scapula|humerus|femur|hip(_|$)|sacrum|skull|bone|mandible|spine$|"
     r"costal_cartilage", BONE_WINDOW),
    (r"^brain", BRAIN_WINDOW),
)


def window_for(structure: str) -> Window:
    """The display window of a structure (see :data:`WINDOW_RULES`).

    Lung_L, Lung_R, lung lobes (``Lung_LUL``, ``lung_upper_lobe_left``) and
    airways: lung W1500/L-600; bones (vertebrae, ribs, femur, ...): bone
    W1800/L400; brain: W80/L40; anything else: abdomen W400/L40.
    """
    from oarbench.labels import canonical_name

    names = {structure.strip().lower(), canonical_name(structure).lower()}
    for pattern, window in WINDOW_RULES:
        if any(re.search(pattern, n) for n in names):
            return window
    return ABDOMEN_WINDOW
