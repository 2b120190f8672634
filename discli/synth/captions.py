"""Web-style captions of the synthetic benchmark and their noisy tags."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


NOUNS = {  # (singular, plural) pairs, all in the shipped lexicon
    "aeroplane": [("aeroplane", "aeroplanes"), ("airplane", "airplanes"), ("plane", "planes"),
                  ("jet", "jets")],
    "bird": [("bird", "birds"), ("pigeon", "pigeons"), ("duck", "ducks"), ("seagull", "seagulls"),
             ("parrot", "parrots")],
    "boat": [("boat", "boats"), ("ship", "ships"), ("sailboat", "sailboats"), ("yacht", "yachts")],
    "car": [("car", "cars"), ("automobile", "automobiles"), ("taxi", "taxis"), ("jeep", "jeeps")],
    "cat": [("cat", "cats"), ("kitten", "kittens"), ("kitty", "kitties")],
}
TEMPLATES = ["A photo of {x}.", "{X} in this picture.", "Look at {x}!", "Here we see {x} {place}.",
             "{X} {place}, taken last summer.", "I took a picture of {x} {place}.",
             "Nice shot of {x}.", "{X}. What a lovely day!", "Just {x} {place}, nothing special."]
EMPTY = ["What a lovely day!", "Holiday memories.", "Just another afternoon outside.",
         "Look at this!", "No idea what this is."]
PLACES = ["near the river", "in the park", "by the road", "under a cloudy sky",
          "on a sunny afternoon", "at the harbour", "in the city", "next to a building"]
# Words that contain class names but must not be read as them (whole-word matching).
TRAPS = ["beside a shopping cart", "from an old catalogue", "near the boathouse",
         "on a striped carpet", "in every category", "like a cartoon", "with a scarf",
         "under the planets"]
NUMBERS = {2: "two", 3: "three", 4: "four"}


def _noun_phrase(rng, name: str, count: int) -> str:
    singular, plural = NOUNS[name][int(rng.integers(len(NOUNS[name])))]
    if count == 1:
        return ("an " if singular[0] in "aeiou" else "a ") + singular
    word = NUMBERS.get(count, "several") if rng.random() < 0.7 else \
        ["some", "several", "a few"][int(rng.integers(3))]
    return f"{word} {plural}"


def make_caption(rng: np.random.Generator, mentioned: dict[str, int]) -> str:
    """A sentence naming exactly the classes of ``mentioned`` (name -> count), in random order."""
    if not mentioned:
        text = EMPTY[int(rng.integers(len(EMPTY)))]
    else:
        names = list(mentioned)
        rng.shuffle(names)
        phrases = [_noun_phrase(rng, n, mentioned[n]) for n in names]
        x = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        text = template.format(x=x, X=x[0].upper() + x[1:],
                               place=PLACES[int(rng.integers(len(PLACES)))])
    if rng.random() < 0.25:
        text = text.rstrip(".!") + " " + TRAPS[int(rng.integers(len(TRAPS)))] + "."
    return text


def noisy_mentions(rng: np.random.Generator, counts: dict[str, int], classes: Sequence[str],
                   miss_rate: float, spurious_rate: float) -> dict[str, int]:
    """Web-caption noise: drop each present class with miss_rate; name an absent one with
    spurious_rate (the paper's Fig. 2: sentences miss objects and name absent ones)."""
    kept = {c: n for c, n in counts.items() if rng.random() >= miss_rate}
    absent = [c for c in classes[1:] if c not in counts]
    if absent and rng.random() < spurious_rate:
        kept[absent[int(rng.integers(len(absent)))]] = int(rng.choice([1, 1, 2]))
    return kept
