"""Shard splitting: sizes, disjointness and coverage, IID against non-IID by style and by Dirichlet draws."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from PIL import Image

from recognizer.lmdb_data import DatasetError, LmdbReader, LmdbWriter
from recognizer.shard import dirichlet_assignment, iid_assignment, label_kind, split_dataset, style_assignment

FAMILIES = ("clean", "blur", "curved", "noisy")


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (value % 256, value // 256, 7)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def styled(tmp_path):
    """A 203-sample set whose label is the sample number and whose styles cycle over FAMILIES."""
    with LmdbWriter(tmp_path / "in") as writer:
        for i in range(203):
            writer.add(_png(i), f"w{i}", FAMILIES[i % len(FAMILIES)])
    return tmp_path / "in"


def _contents(path) -> list[tuple[bytes, str, str | None]]:
    reader = LmdbReader(path)
    return [reader.get_raw(i) for i in range(len(reader))]


def test_iid_shards_partition_the_input_with_even_sizes(styled, tmp_path):
    paths = split_dataset(styled, 4, tmp_path / "out", mode="iid", seed=3)

    assert [p.name for p in paths] == ["shard0", "shard1", "shard2", "shard3"]
    shards = [_contents(p) for p in paths]
    assert sorted(len(s) for s in shards) == [50, 51, 51, 51]
    labels = [label for s in shards for _, label, _ in s]
    assert sorted(labels) == sorted(f"w{i}" for i in range(203))  # disjoint and complete
    original = {label: (img, style) for img, label, style in _contents(styled)}
    assert all(original[label] == (img, style) for s in shards for img, label, style in s)


def test_iid_depends_on_the_seed():
    a, b = iid_assignment(100, 3, seed=0), iid_assignment(100, 3, seed=1)
    assert [x.tolist() for x in a] == [x.tolist() for x in iid_assignment(100, 3, seed=0)]
    assert [x.tolist() for x in a] != [x.tolist() for x in b]


def test_style_shards_are_dominated_by_their_home_family(styled, tmp_path):
    paths = split_dataset(styled, 4, tmp_path / "out", mode="style", seed=0)

    shards = [Counter(style for _, _, style in _contents(p)) for p in paths]
    assert sum(sum(c.values()) for c in shards) == 203
    dominant = [c.most_common(1)[0] for c in shards]
    assert sorted(family for family, _ in dominant) == sorted(FAMILIES)
    assert all(n / sum(c.values()) > 0.6 for (_, n), c in zip(dominant, shards, strict=True))
    iid = [Counter(s for _, _, s in _contents(p)) for p in split_dataset(styled, 4, tmp_path / "iid")]
    assert max(c.most_common(1)[0][1] / sum(c.values()) for c in iid) < 0.5


def test_style_assignment_with_fewer_shards_than_families():
    styles = [FAMILIES[i % 4] for i in range(400)]
    shards = style_assignment(styles, 2, seed=1, dominance=1.0)
    assert {styles[i] for i in shards[0]} == {"blur", "curved"}
    assert {styles[i] for i in shards[1]} == {"clean", "noisy"}


def test_style_mode_needs_style_keys(tmp_path):
    with LmdbWriter(tmp_path / "plain") as writer:
        for i in range(5):
            writer.add(_png(i), str(i))
    with pytest.raises(DatasetError, match="has no style keys"):
        split_dataset(tmp_path / "plain", 2, tmp_path / "out", mode="style")


def test_argument_errors(styled, tmp_path):
    with pytest.raises(ValueError, match="unknown split mode 'random'"):
        split_dataset(styled, 2, tmp_path / "out", mode="random")
    with pytest.raises(DatasetError, match="cannot fill 300 shards"):
        split_dataset(styled, 300, tmp_path / "out")
    with pytest.raises(DatasetError, match="no such dataset"):
        split_dataset(tmp_path / "missing", 2, tmp_path / "out")
    split_dataset(styled, 2, tmp_path / "out")
    with pytest.raises(DatasetError, match="already holds"):
        split_dataset(styled, 2, tmp_path / "out")


def test_label_kinds() -> None:
    assert [label_kind(x) for x in ("0417", "o'clock", "well-known", "A4-2b", "x9", "Paris")] == [
        "digits", "words", "words", "codes", "codes", "words"]


def test_dirichlet_shards_are_skewed_by_alpha_and_fixed_by_seed() -> None:
    styles = [FAMILIES[i % len(FAMILIES)] for i in range(2000)]

    def top_share(shards) -> float:  # how much of a shard its most common family holds, on average
        shares = [Counter(styles[i] for i in s).most_common(1)[0][1] / len(s) for s in shards]
        return sum(shares) / len(shares)

    skewed = dirichlet_assignment(styles, 4, 0.1, seed=0)
    even = dirichlet_assignment(styles, 4, 100.0, seed=0)
    assert sorted(int(i) for s in skewed for i in s) == list(range(2000))  # disjoint and complete
    assert top_share(skewed) > 0.6 and top_share(even) < 0.35, (top_share(skewed), top_share(even))
    assert [s.tolist() for s in skewed] == [s.tolist() for s in dirichlet_assignment(styles, 4, 0.1, seed=0)]
    assert [s.tolist() for s in skewed] != [s.tolist() for s in dirichlet_assignment(styles, 4, 0.1, seed=1)]
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        dirichlet_assignment(styles, 4, 0.0, seed=0)


def test_shard_command_prints_each_shards_statistics(styled, tmp_path, capsys) -> None:
    from recognizer import cli

    argv = ["shard", "--input", str(styled), "--parts", "3", "--out", str(tmp_path / "out"),
            "--split", "dirichlet-style", "--alpha", "0.3", "--seed", "2"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out)
    assert [s["size"] for s in stats] == [len(LmdbReader(tmp_path / "out" / f"shard{k}")) for k in range(3)]
    assert sum(s["size"] for s in stats) == 203
    assert all(sum(s["styles"].values()) == s["size"] == sum(s["label_kinds"].values()) for s in stats)
    assert all(s["label_kinds"]["codes"] == s["size"] for s in stats)  # labels "w0" ... are codes
    assert "shard0" in captured.err and "styles" in captured.err
