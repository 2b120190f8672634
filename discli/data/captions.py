"""Caption -> image-level tags, the way IDW's tags come from its sentences.

The paper parses IDW's sentences into VOC tags, synonyms included (Fig. 2: "blue" words are
synonyms of VOC tags). :func:`parse_caption` does this with a shipped lexicon
(``lexicon.json``: class -> words and phrases, plus phrases to ignore):

- whole words only, case-insensitive: the text is lower-cased and every run of characters that
  are not letters or digits becomes one word boundary, so "cat" is not found in "category" and
  "car" not in "cart"; "Cat's", "CATS!" and "motor-bike" are found;
- the longest phrase wins at each position: "motor bike" is a motorbike (not a bicycle), "hot
  dog" is ignored (not a dog), "dining table" is one diningtable;
- classes without a lexicon entry (a custom class list) match their own name and its plural.

Negation and word sense are not modelled ("no cats here" tags cat, "people train dogs" tags
train): caption tags are noisy by nature, which is what DIS's tag cleaning is for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

from discli.data.fileio import json_loads, read_text
from discli.data.voc import VOC_CLASSES
from discli.errors import BadInputError

LEXICON_FORMAT = "dis-lexicon"
_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script; everything else separates
IGNORE = -1


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def plurals(name: str) -> list[str]:
    """Naive English plurals for class names that have no lexicon entry."""
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return [name + "es"]
    if name.endswith("y") and len(name) > 1 and name[-2] not in "aeiou":
        return [name[:-1] + "ies"]
    return [name + "s"]


@lru_cache(maxsize=8)
def load_lexicon(path: str | None = None) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """(class -> phrases, ignored phrases) from ``path`` or the shipped lexicon."""
    if path is None:
        text = resources.files("discli.data").joinpath("lexicon.json").read_text("utf-8")
        where: object = "discli/data/lexicon.json"
    else:
        text, where = read_text(path, "lexicon"), path
    try:
        data = json_loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"malformed JSON ({exc.msg} at line {exc.lineno})", where) from None
    if not isinstance(data, dict) or data.get("format") != LEXICON_FORMAT:
        raise BadInputError(f'not a lexicon (expected {{"format": "{LEXICON_FORMAT}", '
                            f'"classes": {{...}}}})', where)
    classes = data.get("classes")
    ignore = data.get("ignore", [])
    ok = (isinstance(classes, dict) and isinstance(ignore, list)
          and all(isinstance(v, list) and all(isinstance(w, str) for w in v)
                  for v in classes.values()) and all(isinstance(w, str) for w in ignore))
    if not ok:
        raise BadInputError("'classes' must map names to lists of phrases and 'ignore' must be "
                            "a list of phrases", where)
    return {k: tuple(v) for k, v in classes.items()}, tuple(ignore)


@lru_cache(maxsize=32)
def _matcher(classes: tuple[str, ...], lexicon: str | None) -> tuple[dict[tuple[str, ...], int],
                                                                      int]:
    """Phrase (as a word tuple) -> class index (or IGNORE), and the longest phrase length."""
    entries, ignore = load_lexicon(lexicon)
    table: dict[tuple[str, ...], int] = {}
    for index, name in enumerate(classes):
        if index == 0:  # the background is never a tag
            continue
        for phrase in (name, *(entries.get(name) or plurals(name))):
            key = tuple(words(phrase))
            if key:
                table.setdefault(key, index)
    # Phrases of lexicon classes outside `classes` still consume their words, producing nothing:
    # with a class list lacking motorbike, "motor bike" must not turn into a bicycle.
    others = [p for name, phrases in entries.items() if name not in classes for p in phrases]
    for phrase in [*ignore, *others]:
        key = tuple(words(phrase))
        if key and key not in table:
            table[key] = IGNORE
    return table, max((len(k) for k in table), default=1)


def parse_caption(text: str, classes: Sequence[str] = VOC_CLASSES,
                  lexicon: str | Path | None = None) -> list[str]:
    """Class names mentioned in ``text``, unique, in class-index order (background excluded)."""
    table, longest = _matcher(tuple(classes), None if lexicon is None else str(lexicon))
    tokens = words(text)
    found: set[int] = set()
    i = 0
    while i < len(tokens):
        for length in range(min(longest, len(tokens) - i), 0, -1):
            index = table.get(tuple(tokens[i:i + length]))
            if index is not None:
                if index != IGNORE:
                    found.add(index)
                i += length
                break
        else:
            i += 1
    return [classes[i] for i in sorted(found)]


def parse_captions(texts: Sequence[str], classes: Sequence[str] = VOC_CLASSES,
                   lexicon: str | Path | None = None) -> list[str]:
    """Union of the tags of several captions of one image, in class-index order."""
    index = {c: i for i, c in enumerate(classes)}
    tags = {t for text in texts for t in parse_caption(text, classes, lexicon)}
    return sorted(tags, key=index.__getitem__)
