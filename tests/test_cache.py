import h5py
import numpy as np
import pytest

from discli.pseudo.cache import CacheEntry, CacheWriter, PseudoCache, make_attrs
from discli.errors import IncompatibleError


def _entry(i, k=4):
    rng = np.random.default_rng(i)
    return CacheEntry(f"dir/img{i}", rng.integers(0, k, (5, 7)).astype(np.uint8),
                      rng.random((5, 7)).astype(np.float16), rng.random(k).astype(np.float32),
                      (rng.random(k) > 0.5).astype(np.uint8))


def test_parts_then_merge_roundtrip(tmp_path):
    attrs = make_attrs(["background", "a", "b", "c"], 10, "abc123", {"lr": 0.1})
    writer = CacheWriter(tmp_path / "cache.h5", attrs)
    writer.write([_entry(0), _entry(1)])
    writer.write([_entry(2)])
    assert writer.done_ids() == {"dir/img0", "dir/img1", "dir/img2"}
    path = writer.merge()
    assert not (tmp_path / "cache.parts").exists()
    cache = PseudoCache(path, checkpoint_hash="abc123")
    assert sorted(cache.ids()) == ["dir/img0", "dir/img1", "dir/img2"]
    got, want = cache.get("dir/img1"), _entry(1)
    assert np.array_equal(got.labelmap, want.labelmap)
    assert np.array_equal(got.confidence, want.confidence)
    assert np.array_equal(got.tag_probs, want.tag_probs)
    assert cache.classes == ["background", "a", "b", "c"] and cache.attrs["t_tr"] == 10
    with h5py.File(path) as h5:  # plain h5py can read it
        assert h5["entries/dir%2Fimg0/labelmap"].dtype == np.uint8


def test_killed_part_write_leaves_no_entry(tmp_path):
    attrs = make_attrs(["background", "a"], 0, "h", {})
    writer = CacheWriter(tmp_path / "cache.h5", attrs)
    writer.write([_entry(0, 2)])
    # A kill during a write leaves only a hidden temporary file, never a visible part.
    (writer.parts_dir / ".part-r0-000001.h5.tmp999").write_bytes(b"\x89HDF half")
    again = CacheWriter(tmp_path / "cache.h5", attrs)
    assert again.done_ids() == {"dir/img0"}
    assert PseudoCache(again.merge()).ids() == ["dir/img0"]


def test_stale_and_foreign_caches_refused(tmp_path):
    writer = CacheWriter(tmp_path / "c.h5", make_attrs(["background", "a"], 0, "old", {}))
    writer.write([_entry(0, 2)])
    path = writer.merge()
    with pytest.raises(IncompatibleError, match="stale cache: made by checkpoint old"):
        PseudoCache(path, checkpoint_hash="new")
    assert len(PseudoCache(path, checkpoint_hash="new", force=True)) == 1
    # Part files of an unfinished E-step by another checkpoint are refused the same way.
    CacheWriter(tmp_path / "e.h5", make_attrs(["background", "a"], 0, "old", {})).write(
        [_entry(0, 2)])
    with pytest.raises(IncompatibleError, match="stale"):
        CacheWriter(tmp_path / "e.h5", make_attrs(["background", "a"], 0, "new", {}))
    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = 99
    with pytest.raises(IncompatibleError, match="format version 99"):
        PseudoCache(path)



def test_ids_from_link_names_and_reads_across_reopens(tmp_path, monkeypatch):
    import discli.pseudo.cache

    odd = ["a/b", "50%", "x%2Fy", "plain", "%25/%"]  # the escapes of key_of, and literal ones
    entries = [CacheEntry(i, *(vars(_entry(n))[k] for k in ('labelmap', 'confidence', 'tag_probs',
                                                         'noisy_tags')))
               for n, i in enumerate(odd)]
    attrs = make_attrs(["background", "a", "b", "c"], 0, "h", {})
    writer = CacheWriter(tmp_path / "cache.h5", attrs)
    writer.write(entries)
    cache = PseudoCache(writer.merge())
    assert sorted(cache.ids()) == sorted(odd) and "x%2Fy" in cache and "x/y" not in cache
    monkeypatch.setattr(discli.pseudo.cache, "REOPEN_EVERY", 2)  # the file closes every second read
    for _ in range(2):
        for entry in entries:
            assert np.array_equal(cache.get(entry.id).labelmap, entry.labelmap)
