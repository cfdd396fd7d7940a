"""Warm-up data: rendered once per edge into its work directory, refused for unknown styles."""

from __future__ import annotations

import pytest

from edge_agent.warmup import warmup_data
from fedocr.v1 import federation_pb2 as pb
from recognizer.lmdb_data import LmdbReader


def test_warm_up_words_are_rendered_once_and_kept(tmp_path) -> None:
    plan = pb.WarmUp(words=20, styles="clean", labels="digits", seed=3)
    seen: list[tuple[int, int]] = []
    first = warmup_data(tmp_path, "edge-0", plan, lambda done, total: seen.append((done, total)))
    assert seen[-1] == (20, 20) and len(LmdbReader(first)) == 20
    (tmp_path / ".warmup-stale.partial").mkdir()  # what a restart mid-render leaves is not used
    seen.clear()
    again = warmup_data(tmp_path, "edge-0", plan, lambda done, total: seen.append((done, total)))
    assert again == first and not seen  # a restarted edge finds its words
    other = warmup_data(tmp_path, "edge-1", plan)
    assert other != first
    labels = [[LmdbReader(path).get_label(i) for i in range(20)] for path in (first, other)]
    assert labels[0] != labels[1]


def test_a_plan_the_renderer_cannot_follow_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="warm-up styles 'glossy'"):
        warmup_data(tmp_path, "edge-0", pb.WarmUp(words=5, styles="glossy", labels="digits"))
    with pytest.raises(ValueError, match="unknown label kind 'poems'"):
        warmup_data(tmp_path, "edge-0", pb.WarmUp(words=5, styles="clean", labels="poems"))
    assert not list(tmp_path.glob("warmup-*"))
