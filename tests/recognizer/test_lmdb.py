"""Round trips and error cases of the word-image LMDB writer and reader."""

from __future__ import annotations

import io
import pickle

import lmdb
import pytest
from PIL import Image

from recognizer.lmdb_data import (
    IMAGE_KEY,
    LABEL_KEY,
    NUM_SAMPLES_KEY,
    STYLE_KEY,
    DatasetError,
    LmdbReader,
    LmdbWriter,
    sample_key,
)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (12, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_bytes_labels_styles(tmp_path):
    samples = [
        (_png((255, 0, 0)), "Hello", "clean"),
        (_png((0, 9, 0)), "wörld", None),
        (_png((1, 2, 3)), "", "blur"),
    ]
    with LmdbWriter(tmp_path / "db", commit_every=2) as writer:
        for image, label, style in samples:
            writer.add(image, label, style)

    reader = LmdbReader(tmp_path / "db")

    assert len(reader) == 3
    assert [reader.get_raw(i) for i in range(3)] == samples
    img, label, style = reader.get(1)
    assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (12, 5), (0, 9, 0))
    assert (label, style) == ("wörld", None)
    assert reader.get_label(2) == "" and reader.get_style(0) == "clean"


def test_key_patterns_match_the_clovaai_layout():
    assert sample_key(IMAGE_KEY, 1) == b"image-000000001"
    assert sample_key(LABEL_KEY, 12) == b"label-000000012"
    assert sample_key(STYLE_KEY, 3) == b"style-000000003"
    assert NUM_SAMPLES_KEY == b"num-samples"


def test_reads_a_dataset_written_with_plain_lmdb_calls(tmp_path):
    env = lmdb.open(str(tmp_path / "clova"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"image-000000001", _png((10, 20, 30)))
        txn.put(b"label-000000001", b"Street")
        txn.put(b"image-000000002", _png((40, 50, 60)))
        txn.put(b"label-000000002", b"42")
        txn.put(b"num-samples", b"2")
    env.close()

    reader = LmdbReader(tmp_path / "clova")

    assert len(reader) == 2
    img, label, style = reader.get(0)
    assert (img.getpixel((3, 3)), label, style) == ((10, 20, 30), "Street", None)
    assert reader.get_label(1) == "42"


def test_writer_grows_the_map(tmp_path):
    blob = bytes(range(256)) * 400  # ~100 KB, incompressible by LMDB anyway
    with LmdbWriter(tmp_path / "db", map_size=1 << 16, commit_every=50) as writer:
        for i in range(30):
            writer.add(blob, str(i))

    reader = LmdbReader(tmp_path / "db")
    assert len(reader) == 30 and reader.get_raw(29)[:2] == (blob, "29")


def test_writer_refuses_an_existing_dataset_unless_told(tmp_path):
    with LmdbWriter(tmp_path / "db") as writer:
        writer.add(_png((0, 0, 0)), "a")
    with pytest.raises(DatasetError, match="already holds"):
        LmdbWriter(tmp_path / "db")
    with LmdbWriter(tmp_path / "db", overwrite=True) as writer:
        writer.add(_png((0, 0, 0)), "b")
        writer.add(_png((0, 0, 0)), "c")
    assert len(LmdbReader(tmp_path / "db")) == 2


def test_failed_write_leaves_no_sample_count(tmp_path):
    with pytest.raises(RuntimeError), LmdbWriter(tmp_path / "db", commit_every=1) as writer:
        writer.add(_png((0, 0, 0)), "a")
        raise RuntimeError("boom")
    with pytest.raises(DatasetError, match="num-samples"):
        LmdbReader(tmp_path / "db")


def test_readers_of_one_path_share_an_environment_and_pickle(tmp_path):
    with LmdbWriter(tmp_path / "db") as writer:
        writer.add(_png((5, 5, 5)), "x")
    reader = LmdbReader(tmp_path / "db")
    reader.get(0)

    clone = pickle.loads(pickle.dumps(reader))
    other = LmdbReader(tmp_path / "db")

    assert clone.get_label(0) == "x" and other.get(0)[1] == "x" and reader.get_label(0) == "x"
    reader.close()
    assert clone.get_label(0) == "x"


def test_missing_path(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset"):
        LmdbReader(tmp_path / "nope")


def test_directory_that_is_not_an_lmdb(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError, match="not an LMDB"):
        LmdbReader(tmp_path / "junk")


def _raw_db(path, items: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()


def test_missing_num_samples(tmp_path):
    _raw_db(tmp_path / "db", {b"image-000000001": _png((0, 0, 0)), b"label-000000001": b"a"})
    with pytest.raises(DatasetError, match=r"db: key 'num-samples' missing"):
        LmdbReader(tmp_path / "db")


def test_bad_num_samples(tmp_path):
    _raw_db(tmp_path / "db", {b"num-samples": b"many"})
    with pytest.raises(DatasetError, match="not an integer"):
        LmdbReader(tmp_path / "db")


def test_missing_sample_key(tmp_path):
    _raw_db(tmp_path / "db", {b"num-samples": b"2", b"image-000000001": _png((0, 0, 0)),
                              b"label-000000001": b"a", b"image-000000002": _png((0, 0, 0))})
    reader = LmdbReader(tmp_path / "db")
    assert reader.get(0)[1] == "a"
    with pytest.raises(DatasetError, match=r"key 'label-000000002' missing"):
        reader.get(1)
    with pytest.raises(IndexError):
        reader.get(2)


def test_undecodable_image(tmp_path):
    _raw_db(tmp_path / "db", {b"num-samples": b"1", b"image-000000001": b"not an image",
                              b"label-000000001": b"a"})
    reader = LmdbReader(tmp_path / "db")
    assert reader.get_raw(0) == (b"not an image", "a", None)
    with pytest.raises(DatasetError, match=r"db: key 'image-000000001' is not a decodable image"):
        reader.get(0)
