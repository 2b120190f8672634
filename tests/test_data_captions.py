"""Caption parsing (a table of real-looking captions, properties) and the caption input formats."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from discli.data.captions import load_lexicon, parse_caption, words
from discli.data.idw import (CAPTION_FORMATS, CaptionReading, detect_format, make_ids,
                             prepare_idw)
from discli.data.manifest import read_manifest
from discli.data.voc import VOC_CLASSES
from discli.errors import BadInputError
from factories import solid_image

CAPTIONS = [
    ("A cat sitting on a sofa.", ["cat", "sofa"]),
    ("Two CATS!", ["cat"]),
    ("My kitten's favourite toy", ["cat"]),
    ("The category of this cart is unclear.", []),
    ("An old scar on the cartoon character", []),
    ("A car parked next to a bus", ["bus", "car"]),
    ("Airplane flying over the sea", ["aeroplane"]),
    ("aeroplanes at the airport", ["aeroplane"]),
    ("A jet and two planes", ["aeroplane"]),
    ("The dining table is set for dinner", ["diningtable"]),
    ("A potted plant next to the TV monitor", ["pottedplant", "tvmonitor"]),
    ("A man riding a motor bike", ["motorbike", "person"]),
    ("Motor-bikes lined up in a row", ["motorbike"]),
    ("A dirt bike race", ["motorbike"]),
    ("A boy on his bike", ["bicycle", "person"]),
    ("Bicycles chained to a fence", ["bicycle"]),
    ("People waiting at the bus stop", ["person"]),
    ("Men and women dancing", ["person"]),
    ("Children playing with a puppy", ["dog", "person"]),
    ("A kid feeding the ducks", ["bird", "person"]),
    ("Sheep grazing with a few lambs", ["sheep"]),
    ("A herd of cattle and a horse", ["cow", "horse"]),
    ("Ponies in a field", ["horse"]),
    ("A hot dog stand", []),
    ("Hot dogs and a dog", ["dog"]),
    ("A sailboat in the harbour near the boathouse", ["boat"]),
    ("A ship and some yachts", ["boat"]),
    ("Wine bottles on a table", ["bottle", "diningtable"]),
    ("A bottle of water", ["bottle"]),
    ("Couch potato watching television", ["sofa", "tvmonitor"]),
    ("An armchair by the window", ["chair"]),
    ("The train arrives at the station", ["train"]),
    ("A steam locomotive", ["train"]),
    ("A flock of birds above the boats", ["bird", "boat"]),
    ("Pigeons, seagulls and a parrot.", ["bird"]),
    ("A taxi, a van and an SUV", ["car"]),
    ("Double decker buses in London", ["bus"]),
    ("A scooter and a moped", ["motorbike"]),
    ("Sunset over the mountains", []),
    ("", []),
    ("A DOG. A CAT. A COW.", ["cat", "cow", "dog"]),
    ("dog,cat;horse/sheep", ["cat", "dog", "horse", "sheep"]),
    ("Monitor lizard on a rock", []),
    ("A computer monitor on a desk", ["tvmonitor"]),
    ("Un chat et un chien", []),
    ("Catalogue of carpets", []),
    ("A person with a cat on a chair", ["cat", "chair", "person"]),
    ("Tvmonitor, diningtable and pottedplant", ["diningtable", "pottedplant", "tvmonitor"]),
]


@pytest.mark.parametrize("text,expected", CAPTIONS)
def test_caption_table(text, expected):
    assert parse_caption(text) == expected


def test_table_is_large_enough():
    assert len(CAPTIONS) >= 40


def test_class_subset_and_unknown_classes():
    synthetic = ["background", "aeroplane", "bird", "boat", "car", "cat"]
    assert parse_caption("A man with a cat and a dog", synthetic) == ["cat"]
    # a word inside another class's phrase stays hidden even when that class is not listed
    assert parse_caption("motor bike and a bike", ["background", "bicycle"]) == ["bicycle"]
    # classes without a lexicon entry match their name and plural
    assert parse_caption("Two giraffes and a zebra", ["background", "giraffe", "zebra"]) == \
        ["giraffe", "zebra"]


def test_lexicon_has_every_voc_class():
    classes, ignore = load_lexicon()
    assert set(classes) == set(VOC_CLASSES[1:]) and ignore
    for name, phrases in classes.items():
        assert name in phrases


VOCAB = {w for phrases in load_lexicon()[0].values() for p in phrases for w in words(p)} | \
    {w for p in load_lexicon()[1] for w in words(p)}
UNRELATED = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=9).filter(
    lambda w: w not in VOCAB and w not in {"s", "es", "ies"})
CLASS_LISTS = st.lists(st.sampled_from(VOC_CLASSES[1:] + ["giraffe", "zebra", "tree"]),
                       min_size=1, max_size=6, unique=True).map(lambda c: ["background", *c])


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80) | st.lists(st.sampled_from(
    [*load_lexicon()[0]["cat"], *load_lexicon()[0]["person"], "the", "a", ",", ".", "hot", "dog",
     "motor", "bike", "giraffes"]), max_size=12).map(" ".join), classes=CLASS_LISTS)
def test_parser_only_returns_listed_classes(text, classes):
    tags = parse_caption(text, classes)
    assert set(tags) <= set(classes[1:])
    assert tags == sorted(tags, key=classes.index) and len(set(tags)) == len(tags)


@settings(max_examples=150, deadline=None)
@given(base=st.sampled_from([t for t, _ in CAPTIONS]), before=st.lists(UNRELATED, max_size=4),
       after=st.lists(UNRELATED, max_size=4))
def test_unrelated_words_add_no_tags(base, before, after):
    text = " ".join([*before, base, *after])
    assert parse_caption(text) == parse_caption(base)


# --- caption input formats -----------------------------------------------------------------

def image(path: Path, size=(24, 16), colour=(10, 120, 200)) -> None:
    solid_image(path, size, colour)


def test_jsonl_format(tmp_path):
    image(tmp_path / "images" / "a.jpg")
    image(tmp_path / "images" / "b.png")
    lines = [{"image": "images/a.jpg", "caption": "A cat on a sofa."},
             {"image": "images/b.png", "captions": ["Nothing here.", "Well, a dog."]},
             {"image": "images/a.jpg", "caption": "And a person."}]  # second line for a.jpg
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert detect_format(tmp_path / "caps.jsonl") == "jsonl"
    report = prepare_idw(tmp_path / "caps.jsonl", tmp_path / "out" / "m.jsonl")
    m = read_manifest(tmp_path / "out" / "m.jsonl")
    assert m.root == tmp_path and [r.id for r in m.records] == ["a", "b"]
    assert m.records[0].tags == ["cat", "person", "sofa"]
    assert m.records[0].caption == "A cat on a sofa.\nAnd a person."
    assert m.records[1].tags == ["dog"] and m.records[1].tag_source == "caption"
    assert report["tag_counts"]["cat"] == 1 and report["untagged"] == []


def test_coco_format(tmp_path):
    image(tmp_path / "train2014" / "COCO_1.jpg")
    image(tmp_path / "train2014" / "COCO_2.jpg")
    coco = {"images": [{"id": 1, "file_name": "COCO_1.jpg"}, {"id": 2, "file_name": "COCO_2.jpg"}],
            "annotations": [{"image_id": 1, "caption": "A horse in a field."},
                            {"image_id": 1, "caption": "A pony and a man."},
                            {"image_id": 2, "caption": "Sky."}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    assert detect_format(tmp_path / "captions.json") == "coco"
    report = prepare_idw(tmp_path / "captions.json", tmp_path / "m.jsonl", split="coco",
                         reading=CaptionReading(root=tmp_path / "train2014"))
    m = read_manifest(tmp_path / "m.jsonl")
    assert m.root == tmp_path / "train2014"
    assert [(r.id, r.tags, r.split) for r in m.records] == [
        ("COCO_1", ["horse", "person"], "coco"), ("COCO_2", [], "coco")]
    assert report["untagged"] == ["COCO_2"]


def test_folder_format_and_custom_classes(tmp_path):
    image(tmp_path / "pics" / "one.jpg")
    (tmp_path / "pics" / "one.txt").write_text("Two giraffes near a car\n")
    image(tmp_path / "pics" / "sub" / "one.png")  # same stem in a subfolder: path-based id
    (tmp_path / "pics" / "sub" / "one.txt").write_text("a zebra\n\nanother line: a giraffe")
    assert detect_format(tmp_path / "pics") == "folder"
    prepare_idw(tmp_path / "pics", tmp_path / "m.jsonl", classes=["background", "giraffe", "zebra"])
    m = read_manifest(tmp_path / "m.jsonl")
    assert [(r.id, r.tags) for r in m.records] == [("one", ["giraffe"]),
                                                   ("sub__one", ["giraffe", "zebra"])]


def test_manifest_format_retags(tmp_path):
    image(tmp_path / "a.jpg")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "cat and bus"}))
    prepare_idw(tmp_path / "caps.jsonl", tmp_path / "voc.jsonl")
    assert detect_format(tmp_path / "voc.jsonl") == "manifest"
    prepare_idw(tmp_path / "voc.jsonl", tmp_path / "cats.jsonl", classes=["background", "cat"])
    m = read_manifest(tmp_path / "cats.jsonl")
    assert m.classes == ["background", "cat"] and m.records[0].tags == ["cat"]
    assert m.image_path(m.records[0]) == tmp_path / "a.jpg"


def test_registry_lists_formats():
    assert {"jsonl", "coco", "folder", "manifest"} <= set(CAPTION_FORMATS.names())


def test_make_ids():
    assert make_ids(["a/x.jpg", "b/x.jpg", "y z.png", ".hidden.jpg"]) == \
        ["a__x", "b__x", "y_z", "hidden"]


def test_skip_bad_lists_every_problem(tmp_path):
    image(tmp_path / "ok.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")
    lines = [json.dumps({"image": "ok.jpg", "caption": "a cat"}),
             json.dumps({"image": "empty.jpg", "caption": "a dog"}),
             "{broken",
             json.dumps({"image": "missing.jpg", "caption": "x"}),
             json.dumps({"image": "../outside.jpg", "caption": "x"}),
             json.dumps({"image": "tiny.png", "caption": "x"})]
    (tmp_path / "caps.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe bad bytes\n")
    with pytest.raises(BadInputError, match="line 3: malformed JSON"):
        prepare_idw(tmp_path / "caps.jsonl", tmp_path / "m.jsonl")
    report = prepare_idw(tmp_path / "caps.jsonl", tmp_path / "m.jsonl", skip_bad=True)
    assert report["records"] == 1
    problems = [b["problem"] for b in report["bad"]]
    assert len(problems) == 6
    for needle in ("line 3: malformed JSON", "line 7: not UTF-8", "0 bytes", "not found",
                   "escapes the manifest root", "too small"):
        assert any(needle in p for p in problems), needle
