"""The file fault corpus: bad datasets, keys, model files and configs get an error naming the file,
leave the file as it was and write nothing (no key, no model, no directory)."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from aggregator import cli as aggregator_cli
from aggregator.config import AggregatorConfig, ConfigError
from recognizer import cli as recognizer_cli
from recognizer.keys import KeyFileError, generate_key, load_key
from recognizer.lmdb_data import DatasetError, LmdbReader, LmdbWriter
from recognizer.model_io import FORMAT, ModelFileError, load_model, read_model_file

WORDS = ["fault", "corpus", "Hello", "42nd"]


def png(width: int = 48, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, "PNG")
    return buffer.getvalue()


def write_words(path: Path, labels: list[str] = WORDS, images: list[bytes] | None = None) -> Path:
    """An LMDB of `labels` with small PNG images (or `images`)."""
    with LmdbWriter(path) as writer:
        for k, label in enumerate(labels):
            writer.add(images[k] if images else png(), label)
    return path


def edit_lmdb(path: Path, put: dict[bytes, bytes] | None = None, delete: tuple[bytes, ...] = ()) -> Path:
    """Put and delete raw keys of an LMDB."""
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        for key, value in (put or {}).items():
            txn.put(key, value)
        for key in delete:
            txn.delete(key)
    env.close()
    return path


def write_npz(path: Path, meta: object, state: np.ndarray) -> Path:
    with path.open("wb") as f:
        np.savez(f, meta=np.array(meta if isinstance(meta, str) else json.dumps(meta)), state=state)
    return path


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under `root`."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
    }


@dataclass(frozen=True)
class Assets:
    """A good word LMDB, a federation key and an untrained fedocr-tiny model made under it."""

    words: Path
    key: Path
    model: Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    from recognizer.model import build_model
    from recognizer.model_io import save_model
    from recognizer.state import fingerprint

    root = tmp_path_factory.mktemp("assets")
    key = generate_key(root / "fed.key")
    model = build_model("fedocr-tiny", key, 0.5)
    save_model(root / "fed.npz", model, key, "fedocr-tiny", fingerprint(model, key))
    return Assets(write_words(root / "words"), root / "fed.key", root / "fed.npz")


# -- cases: (tmp, assets) -> (the bad file, the call that must fail) -------------------------------

Case = Callable[[Path, Assets], tuple[Path, Callable[[], object]]]


def lmdb_with(data: Callable[[Path], object]) -> Case:
    """A directory whose data.mdb is written by `data`; read with LmdbReader."""

    def case(tmp: Path, a: Assets) -> tuple[Path, Callable[[], object]]:
        (tmp / "bad").mkdir()
        data(tmp / "bad" / "data.mdb")
        return tmp / "bad", lambda: LmdbReader(tmp / "bad")

    return case


def truncated_lmdb(path: Path) -> None:
    write_words(path.parent / "full", WORDS * 50)
    path.write_bytes((path.parent / "full" / "data.mdb").read_bytes()[: 3 * 4096])
    for name in ("data.mdb", "lock.mdb"):
        (path.parent / "full" / name).unlink()
    (path.parent / "full").rmdir()


def edited_words(read: Callable[[Path], object], **edits) -> Case:
    """A good LMDB changed by `edit_lmdb(**edits)`, then `read`."""

    def case(tmp: Path, a: Assets) -> tuple[Path, Callable[[], object]]:
        path = edit_lmdb(write_words(tmp / "bad"), **edits)
        return path, lambda: read(path)

    return case


def key_of(data: bytes | None) -> Case:
    def case(tmp: Path, a: Assets) -> tuple[Path, Callable[[], object]]:
        if data is not None:
            (tmp / "bad.key").write_bytes(data)
        return tmp / "bad.key", lambda: load_key(tmp / "bad.key")

    return case


def model_file(write: Callable[[Path], object], load: bool = False) -> Case:
    """A model file written by `write`; read with read_model_file (or loaded under the key)."""

    def case(tmp: Path, a: Assets) -> tuple[Path, Callable[[], object]]:
        path = tmp / "bad.npz"
        write(path)
        key = load_key(a.key)
        return path, (lambda: load_model(path, key)) if load else (lambda: read_model_file(path))

    return case


def truncated_model(path: Path) -> None:
    write_npz(path, {"format": FORMAT}, np.zeros(5000, np.float32))
    path.write_bytes(path.read_bytes()[:3000])


def meta(**fields) -> Callable[[Path], object]:
    doc = {"format": FORMAT, "preset": "fedocr-tiny", "gamma": 0.5, "alphabet": "alnum36", **fields}
    doc.setdefault("fingerprint", "00")
    return lambda path: write_npz(path, doc, np.zeros(10, np.float32))


def other_key_model(tmp: Path, a: Assets) -> tuple[Path, Callable[[], object]]:
    path = tmp / "copy.npz"
    path.write_bytes(a.model.read_bytes())
    other = os.urandom(32)
    return path, lambda: load_model(path, other)


def garbage(n: int) -> bytes:
    """n fixed pseudo-random bytes: a garbage file that is the same in every run."""
    return np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()


def config(text: str) -> Case:
    def case(tmp: Path, a: Assets) -> tuple[Path, Callable[[], object]]:
        (tmp / "agg.toml").write_text(text)
        return tmp / "agg.toml", lambda: AggregatorConfig.load(tmp / "agg.toml")

    return case


FILE_CASES = [
    # word-image LMDBs
    pytest.param(
        lmdb_with(lambda p: p.write_bytes(garbage(3 * 4096))), DatasetError, "LMDB", id="lmdb-garbage"
    ),
    pytest.param(lmdb_with(truncated_lmdb), DatasetError, "truncated", id="lmdb-truncated"),
    pytest.param(lmdb_with(lambda p: p.write_bytes(b"")), DatasetError, "LMDB", id="lmdb-empty-file"),
    pytest.param(lmdb_with(lambda p: p.mkdir()), DatasetError, "LMDB", id="lmdb-data-file-is-a-directory"),
    pytest.param(lmdb_with(lambda p: None), DatasetError, "not an LMDB", id="lmdb-no-data-file"),
    pytest.param(
        edited_words(LmdbReader, delete=(b"num-samples",)), DatasetError, "num-samples", id="lmdb-no-count"
    ),
    pytest.param(
        edited_words(LmdbReader, put={b"num-samples": b"four"}),
        DatasetError,
        "integer",
        id="lmdb-count-not-int",
    ),
    pytest.param(
        edited_words(LmdbReader, put={b"num-samples": b"-4"}),
        DatasetError,
        "negative",
        id="lmdb-count-negative",
    ),
    pytest.param(
        edited_words(lambda p: LmdbReader(p).get(3), delete=(b"image-000000004",)),
        DatasetError,
        "image-000000004",
        id="lmdb-record-missing",
    ),
    pytest.param(
        edited_words(lambda p: LmdbReader(p).get(1), put={b"image-000000002": b"GIF89a not really"}),
        DatasetError,
        "image-000000002",
        id="lmdb-image-not-an-image",
    ),
    pytest.param(
        edited_words(lambda p: LmdbReader(p).get(0), put={b"label-000000001": b"\xff\xfe"}),
        DatasetError,
        "label-000000001",
        id="lmdb-label-not-utf8",
    ),
    # federation keys
    pytest.param(key_of(b"k" * 31), KeyFileError, "31", id="key-short"),
    pytest.param(key_of(b"k" * 33), KeyFileError, "33", id="key-long"),
    pytest.param(key_of(b""), KeyFileError, "has 0", id="key-empty"),
    pytest.param(key_of(None), KeyFileError, "no such", id="key-missing"),
    # model files
    pytest.param(
        model_file(lambda p: p.write_bytes(garbage(600))), ModelFileError, "not a", id="model-garbage"
    ),
    pytest.param(model_file(truncated_model), ModelFileError, "not a FedOCR", id="model-truncated"),
    pytest.param(
        model_file(lambda p: zipfile.ZipFile(p, "w").close()),
        ModelFileError,
        "not a FedOCR",
        id="model-empty-zip",
    ),
    pytest.param(
        model_file(lambda p: write_npz(p, "{not json", np.zeros(3))),
        ModelFileError,
        "not a",
        id="model-meta-bad",
    ),
    pytest.param(
        model_file(lambda p: write_npz(p, [1, 2], np.zeros(3))),
        ModelFileError,
        "format",
        id="model-meta-list",
    ),
    pytest.param(model_file(meta(format="other/9")), ModelFileError, "other/9", id="model-format-unknown"),
    pytest.param(model_file(meta(gamma="x")), ModelFileError, "malformed", id="model-gamma-not-a-number"),
    pytest.param(model_file(meta(preset=None)), ModelFileError, "malformed", id="model-preset-missing"),
    pytest.param(
        model_file(meta(preset="nope"), load=True), ModelFileError, "nope", id="model-preset-unknown"
    ),
    pytest.param(model_file(meta(), load=True), ModelFileError, "needs", id="model-state-wrong-size"),
    pytest.param(
        model_file(meta(alphabet="runes"), load=True), ModelFileError, "runes", id="model-alphabet-unknown"
    ),
    pytest.param(other_key_model, ModelFileError, "another federation key", id="model-other-key"),
    # aggregator configs
    pytest.param(config("[rounds]\nquorom = 3\n"), ConfigError, "quorom", id="config-unknown-key"),
    pytest.param(config("[round]\nquorum = 3\n"), ConfigError, "[round]", id="config-unknown-section"),
    pytest.param(config('[rounds]\nquorum = "three"\n'), ConfigError, "quorum", id="config-string-for-int"),
    pytest.param(config("[rounds]\nquorum = true\n"), ConfigError, "quorum", id="config-bool-for-int"),
    pytest.param(
        config("[transfer]\nmax_chunk_bytes = 8192.5\n"), ConfigError, "max_chunk", id="config-float-for-int"
    ),
    pytest.param(
        config("[plan]\nlr_decay_rounds = 5\n"), ConfigError, "lr_decay_rounds", id="config-int-for-list"
    ),
    pytest.param(config("[tls]\ncert = 3\n"), ConfigError, "cert", id="config-int-for-path"),
    pytest.param(config("[rounds]\ndeadline_s = nan\n"), ConfigError, "deadline_s", id="config-nan"),
    pytest.param(
        config("[rounds]\nquorum = 1\nmin_edges = 2\n"), ConfigError, "min_edges", id="config-bad-range"
    ),
    pytest.param(
        config('[server]\nlog_level = "LOUD"\n'), ConfigError, "log_level", id="config-bad-log-level"
    ),
    pytest.param(config("[rounds]\nquorum = \n"), ConfigError, "TOML", id="config-not-toml"),
]


@pytest.mark.parametrize("case, error, text", FILE_CASES)
def test_bad_file_gets_an_error_naming_it(case: Case, error: type, text: str, tmp_path: Path, assets) -> None:
    bad, call = case(tmp_path, assets)
    before = tree(tmp_path)
    with pytest.raises(error) as raised:
        call()
    assert str(bad) in str(raised.value) and text in str(raised.value)
    assert tree(tmp_path) == before  # the bad file untouched, nothing written beside it


# -- the command lines: exit status 2, the file named, no key or model written ----------------------


def corrupt_lmdb(tmp: Path) -> Path:
    (tmp / "bad").mkdir()
    truncated_lmdb(tmp / "bad" / "data.mdb")
    return tmp / "bad"


def bad_image_lmdb(tmp: Path) -> Path:
    return write_words(tmp / "bad", images=[png(), png(), b"\x89PNG but not", png()])


def short_key(tmp: Path) -> Path:
    (tmp / "short.key").write_bytes(b"k" * 16)
    return tmp / "short.key"


def junk_model(tmp: Path) -> Path:
    (tmp / "junk.npz").write_bytes(b"PK\x03\x04 not a zip")
    return tmp / "junk.npz"


TRAIN = ["train", "--preset", "fedocr-tiny", "--epochs", "1", "--batch-size", "4", "--threads", "1"]
CLI_CASES = [
    pytest.param(corrupt_lmdb, [*TRAIN, "--data", "{bad}", "--out", "{out}"], id="train-corrupt-lmdb"),
    pytest.param(
        bad_image_lmdb, [*TRAIN, "--data", "{bad}", "--out", "{out}"], id="train-record-not-an-image"
    ),
    pytest.param(
        short_key, [*TRAIN, "--data", "{words}", "--out", "{out}", "--key", "{bad}"], id="train-short-key"
    ),
    pytest.param(
        corrupt_lmdb,
        [*TRAIN, "--data", "{words}", "--val", "{bad}", "--out", "{out}"],
        id="train-corrupt-validation-lmdb",
    ),
    pytest.param(
        corrupt_lmdb, ["eval", "--model", "{model}", "--key", "{key}", "--data", "{bad}"], id="eval-corrupt"
    ),
    pytest.param(
        bad_image_lmdb,
        ["eval", "--model", "{model}", "--key", "{key}", "--data", "{bad}", "--beam", "1"],
        id="eval-record-not-an-image",
    ),
    pytest.param(
        junk_model, ["eval", "--model", "{bad}", "--key", "{key}", "--data", "{words}"], id="eval-junk-model"
    ),
    pytest.param(
        short_key, ["eval", "--model", "{model}", "--key", "{bad}", "--data", "{words}"], id="eval-short-key"
    ),
]


@pytest.mark.parametrize("make, argv", CLI_CASES)
def test_recognizer_cli_names_the_bad_file_and_writes_nothing(
    make: Callable[[Path], Path], argv: list[str], tmp_path: Path, assets, capsys
) -> None:
    bad = make(tmp_path)
    names = {"bad": bad, "out": tmp_path / "out" / "m.npz", "words": assets.words}
    names |= {"model": assets.model, "key": assets.key}
    before, assets_before = tree(tmp_path), tree(assets.words.parent)
    code = recognizer_cli.main([arg.format(**names) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2 and "error" in err and str(bad) in err, err
    assert tree(tmp_path) == before  # no key, no model, no output directory
    assert tree(assets.words.parent) == assets_before


def test_aggregator_cli_names_the_bad_config(tmp_path: Path, capsys) -> None:
    path = tmp_path / "agg.toml"
    path.write_text('[rounds]\nquorum = 2\nmin_edges = 1\ndeadline_s = "ten minutes"\n')
    before = tree(tmp_path)
    assert aggregator_cli.main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "deadline_s" in err
    assert tree(tmp_path) == before  # no state directory was created
