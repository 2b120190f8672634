"""Manifests: round trips (examples and property-based), every refusal with file and line."""

import io
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from discli.data.manifest import (Manifest, Record, parse_classes, read_manifest,
                                  write_manifest)
from discli.data.voc import VOC_CLASSES
from discli.errors import BadInputError, UsageError

REPO = Path(__file__).resolve().parents[1]
HEADER = {"format": "dis-manifest", "version": 1, "root": ".", "classes": VOC_CLASSES}


def write_lines(path: Path, *lines) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines), encoding="utf-8")
    return path


def test_round_trip_and_relative_root(tmp_path):
    records = [Record("2007_000033", "JPEGImages/2007_000033.jpg",
                      "SegmentationClass/2007_000033.png", ["aeroplane"]),
               Record("web_1", "images/web 1.jpg", None, ["person", "dog"], "caption", "tagged",
                      "A man walks his dog.\nUn homme et son chien — café")]
    root = tmp_path / "data" / "VOC2012"
    write_manifest(tmp_path / "manifests" / "m.jsonl", Manifest(VOC_CLASSES, records, root))
    header = json.loads((tmp_path / "manifests" / "m.jsonl").read_text().splitlines()[0])
    assert header["root"] == "../data/VOC2012"  # relative to the manifest's folder
    m = read_manifest(tmp_path / "manifests" / "m.jsonl")
    assert m.root == root and m.classes == VOC_CLASSES
    assert m.records[0] == records[0]
    assert m.records[1].tags == ["dog", "person"]  # normalised to class-index order
    assert m.image_path(m.records[1]) == root / "images" / "web 1.jpg"
    assert m.labelmap_path(m.records[1]) is None
    vec = m.tag_vector(m.records[1])
    assert vec.shape == (21,) and vec[0] == 1 and vec.sum() == 3
    assert vec[VOC_CLASSES.index("dog")] == 1 and vec[VOC_CLASSES.index("person")] == 1
    assert [r.id for r in m.select("tagged").records] == ["web_1"]
    # Moving the whole tree keeps it readable; root= overrides the header.
    assert read_manifest(tmp_path / "manifests" / "m.jsonl", root=tmp_path).root == tmp_path


def test_stdin_and_stdout(tmp_path, monkeypatch, capsys):
    m = Manifest(["background", "cat"], [Record("a", "a.jpg", tags=["cat"])], tmp_path)
    write_manifest("-", m)
    text = capsys.readouterr().out
    assert json.loads(text.splitlines()[0])["root"] == str(tmp_path)  # absolute on stdout
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    again = read_manifest("-")
    assert again.records == m.records and again.root == tmp_path


def test_shipped_example_manifests_are_valid():
    examples = sorted((REPO / "data_manifests").glob("*.jsonl"))
    assert examples, "data_manifests/ should hold example manifests"
    for path in examples:
        assert read_manifest(path).records


@pytest.mark.parametrize("lines,needle", [
    ([], "empty manifest"),
    (['{"id": "a"}'], "line 1: not a dis manifest"),
    ([{**HEADER, "version": 2}], "line 1: manifest format version 2 is not supported"),
    ([{**HEADER, "classes": ["background"]}], "line 1: 'classes' must list at least two"),
    ([HEADER, ""], "line 2: empty line"),
    ([HEADER, {"id": "a", "image": "a.jpg"}, "{not json"], "line 3: malformed JSON"),
    ([HEADER, {"id": "a", "image": "a.jpg", "tags": ["kitten"]}], "line 2: unknown class 'kitten'"),
    ([HEADER, {"id": "a", "image": "a.jpg", "tags": ["background"]}], "line 2: 'background' is"),
    ([HEADER, {"id": "a", "image": "../../etc/passwd"}], "line 2: 'image' path '../../etc/passwd' "
                                                         "escapes the manifest root"),
    ([HEADER, {"id": "a", "image": "a.jpg", "labelmap": "x/../../b.png"}], "line 2: 'labelmap'"),
    ([HEADER, {"id": "../evil", "image": "a.jpg"}], "line 2: id '../evil' is not a safe"),
    ([HEADER, {"id": "a", "image": "a.jpg", "tag_source": "web"}], "line 2: 'tag_source'"),
    ([HEADER, {"id": "a", "image": "a.jpg", "lablemap": "a.png"}], "line 2: unknown key"),
    ([HEADER, {"image": "a.jpg"}], "line 2: missing key 'id'"),
    ([HEADER, {"id": "a", "image": "a.jpg"}, {"id": "a", "image": "b.jpg"}],
     "line 3: duplicate id 'a' .first on line 2"),
])
def test_bad_manifests(tmp_path, lines, needle):
    path = write_lines(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(BadInputError, match=needle) as info:
        read_manifest(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_not_utf8_and_missing(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(json.dumps(HEADER).encode() + b'\n{"id": "a", "image": "\xff.jpg"}\n')
    with pytest.raises(BadInputError, match="line 2: not UTF-8"):
        read_manifest(path)
    with pytest.raises(BadInputError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_absolute_record_paths_allowed(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", HEADER, {"id": "a", "image": str(tmp_path / "a.jpg")})
    m = read_manifest(path)
    assert m.image_path(m.records[0]) == tmp_path / "a.jpg"


def test_write_refuses_what_read_would_refuse(tmp_path):
    bad = Manifest(VOC_CLASSES, [Record("a", "../a.jpg")], tmp_path)
    with pytest.raises(BadInputError, match="escapes"):
        write_manifest(tmp_path / "m.jsonl", bad)
    assert not (tmp_path / "m.jsonl").exists()


def test_parse_classes(tmp_path):
    assert parse_classes("cat,dog") == ["background", "cat", "dog"]
    assert parse_classes(["background", "cat"]) == ["background", "cat"]
    (tmp_path / "classes.txt").write_text("background\naeroplane\n\n# comment\nbird\n")
    assert parse_classes(str(tmp_path / "classes.txt")) == ["background", "aeroplane", "bird"]
    with pytest.raises(UsageError, match="duplicate"):
        parse_classes("cat,cat")
    with pytest.raises(UsageError, match="'background' must come first"):
        parse_classes("cat,background")


# --- property-based: any valid manifest survives a write and a read unchanged ----------------

NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
IDS = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,20}", fullmatch=True)
SEGMENT = st.text(st.characters(blacklist_characters="/\\\x00", blacklist_categories=("Cs",)),
                  min_size=1, max_size=10).filter(lambda s: s not in (".", "..") and s.strip())
RELPATH = st.lists(SEGMENT, min_size=1, max_size=3).map("/".join)


@st.composite
def manifests(draw):
    classes = ["background"] + draw(st.lists(NAMES, min_size=1, max_size=6, unique=True)
                                    .filter(lambda c: "background" not in c))
    ids = draw(st.lists(IDS, max_size=8, unique=True))
    records = []
    for rec_id in ids:
        tags = draw(st.lists(st.sampled_from(classes[1:]), unique=True))
        records.append(Record(
            id=rec_id, image=draw(RELPATH), labelmap=draw(st.none() | RELPATH),
            tags=sorted(tags, key=classes.index),
            tag_source=draw(st.sampled_from(["pixels", "caption", "manual"])),
            split=draw(st.sampled_from(["train", "val", "tagged", "x y"])),
            caption=draw(st.none() | st.text(max_size=40))))
    return Manifest(classes, records, Path("/data/root"))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(manifest=manifests())
def test_manifest_round_trip_property(tmp_path, manifest):
    path = tmp_path / "m.jsonl"
    write_manifest(path, manifest)
    again = read_manifest(path)
    assert again.classes == manifest.classes
    assert again.records == manifest.records
    assert again.root == manifest.root
