"""Structure names: plain-English display names, synonyms, spelling and word-order normalisation.

One place that decides when two names mean the same structure, shared by the data builders
(``sources``, ``make_bench``) and the evaluation (naming accuracy, grounding F1):

- case and punctuation are ignored;
- British and American spellings are equal (``tumour``/``tumor``, ``oesophagus``/``esophagus``);
- left/right word order is equal (``kidney left`` == ``left kidney`` == ``kidney (left)``);
- a small table of synonyms (``ivc`` == ``inferior vena cava``, ``lesion`` == ``tumour``);
- a plural of the name counts (``kidneys`` names ``kidney``).
"""

from __future__ import annotations

import re

SIDES = ("left", "right")

# American spelling -> British spelling (display names are British, as in the schema's "tumour").
_BRITISH = {
    "tumor": "tumour",
    "tumors": "tumours",
    "esophagus": "oesophagus",
    "esophageal": "oesophageal",
    "hemorrhage": "haemorrhage",
    "edema": "oedema",
    "anemia": "anaemia",
    "color": "colour",
    "center": "centre",
    "fiber": "fibre",
}

# Canonical (normalised, British) name -> other names that mean the same thing.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "tumour": ("lesion", "mass", "neoplasm", "cancer", "carcinoma", "malignancy", "tumour lesion"),
    "inferior vena cava": ("ivc", "vena cava inferior"),
    "superior vena cava": ("svc", "vena cava superior"),
    "gallbladder": ("gall bladder",),
    "urinary bladder": ("bladder",),
    "small bowel": ("small intestine",),
    "colon": ("large bowel", "large intestine"),
    "oesophagus": ("gullet",),
    "portal and splenic vein": ("portal vein and splenic vein", "portal vein", "splenic vein"),
    "heart": ("cardiac silhouette", "cardiac shadow"),
    "kidney tumour": ("renal tumour", "renal mass", "kidney mass", "kidney lesion", "renal cell carcinoma"),
    "pancreatic tumour": ("pancreas tumour", "pancreatic mass", "pancreatic lesion", "pancreatic cancer"),
    "spinal cord": ("cord",),
}

# TotalSegmentator/BTCV-style identifiers whose plain-English name is not just "words with the side first".
_SPECIAL_NAMES = {
    "portal_vein_and_splenic_vein": "portal and splenic vein",
    "clavicula_left": "left clavicle",
    "clavicula_right": "right clavicle",
    "iliac_vena_left": "left iliac vein",
    "iliac_vena_right": "right iliac vein",
    "hip_left": "left hip bone",
    "hip_right": "right hip bone",
    "autochthon_left": "left autochthonous back muscle",
    "autochthon_right": "right autochthonous back muscle",
    "lung_upper_lobe_left": "left upper lung lobe",
    "lung_lower_lobe_left": "left lower lung lobe",
    "lung_upper_lobe_right": "right upper lung lobe",
    "lung_middle_lobe_right": "right middle lung lobe",
    "lung_lower_lobe_right": "right lower lung lobe",
    "esophagus": "oesophagus",
    "colon": "large bowel",  # the plain-English name; "colon" stays its canonical form
    "thyroid_gland": "thyroid gland",
    "costal_cartilages": "costal cartilages",
    "cancer": "tumour",
    "tumor": "tumour",
}

_ORDINALS = {1: "1st", 2: "2nd", 3: "3rd"}


def _words(text: str) -> list[str]:
    """Lower-case words, punctuation and underscores removed, American spellings made British."""
    tokens = re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))
    return [_BRITISH.get(token, token) for token in tokens]


def normalize(text: str) -> str:
    """Lower-case, punctuation-free, British-spelled text with single spaces."""
    return " ".join(_words(text))


def canonical_name(name: str) -> str:
    """The normalised name with a side word moved to the front: ``"Kidney (Left)"`` -> ``"left kidney"``."""
    words = _words(name)
    sides = [word for word in words if word in SIDES]
    rest = [word for word in words if word not in SIDES]
    canonical = " ".join(sides[:1] + rest)
    for key, others in SYNONYMS.items():
        if canonical in others:
            return key
    return canonical


def display_name(identifier: str) -> str:
    """Plain-English name of a TotalSegmentator/MSD/BTCV label identifier.

    ``kidney_left`` -> ``left kidney``; ``vertebrae_L1`` -> ``L1 vertebra``;
    ``rib_right_4`` -> ``right 4th rib``; ``adrenal_gland_right`` -> ``right adrenal gland``.
    """
    key = identifier.strip()
    if key.lower() in _SPECIAL_NAMES:
        return _SPECIAL_NAMES[key.lower()]
    vertebra = re.fullmatch(r"vertebrae?_([CTLS]\d+)", key, flags=re.IGNORECASE)
    if vertebra:
        return f"{vertebra.group(1).upper()} vertebra"
    rib = re.fullmatch(r"rib_(left|right)_(\d+)", key, flags=re.IGNORECASE)
    if rib:
        number = int(rib.group(2))
        return f"{rib.group(1).lower()} {_ORDINALS.get(number, f'{number}th')} rib"
    return canonical_name(key)


def _name_variants(name: str) -> list[list[str]]:
    """Word sequences that count as naming ``name`` (synonyms, both side orders)."""
    canonical = canonical_name(name)
    variants = [canonical, *SYNONYMS.get(canonical, ())]
    sequences: list[list[str]] = []
    for variant in variants:
        words = variant.split()
        sequences.append(words)
        if words and words[0] in SIDES and len(words) > 1:
            sequences.append(words[1:] + words[:1])  # "kidney left"
    return sequences


def _contains(words: list[str], sequence: list[str]) -> bool:
    size = len(sequence)
    for start in range(len(words) - size + 1):
        window = words[start : start + size]
        if all(w == s or w == s + "s" or w == s + "es" for w, s in zip(window, sequence)):
            return True
    return False


def names_structure(text: str, name: str) -> bool:
    """Whether ``text`` (an answer or a grounded phrase) names the structure ``name``.

    A side word must agree: ``"right kidney"`` does not name ``"left kidney"``, while
    ``"the left kidney"`` names ``"kidney"``.
    """
    words = _words(text)
    if not words or not name.strip():
        return False
    return any(_contains(words, sequence) for sequence in _name_variants(name))


def same_structure(a: str, b: str) -> bool:
    """Whether two names denote the same structure (both canonicalised)."""
    return canonical_name(a) == canonical_name(b)
