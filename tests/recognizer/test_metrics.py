"""Case-insensitive alphanumeric word accuracy on literal examples."""

from __future__ import annotations

import pytest

from recognizer.metrics import normalize, word_accuracy


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Hello", "hello"), ("Don't!", "dont"), ("$12.50", "1250"), ("CAFÉ", "caf"), ("!!", ""), ("", "")],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_word_accuracy_ignores_case_and_punctuation():
    predictions = ["HELLO", "worid", "dont", "12:30", "x"]
    labels = ["hello", "world", "Don't", "1230", "y"]
    assert word_accuracy(predictions, labels) == pytest.approx(3 / 5)


def test_label_without_alphanumerics_matches_only_an_empty_prediction():
    assert word_accuracy(["", "?", "a"], ["!!", "...", "-"]) == pytest.approx(2 / 3)


def test_word_accuracy_errors():
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        word_accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no samples"):
        word_accuracy([], [])


def test_edit_distance_and_char_accuracy():
    from recognizer.metrics import char_accuracy, edit_distance

    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    # "Hello" vs "hallo": one substitution in five; "" vs "": perfect; "x" vs "abcd": nothing right.
    assert char_accuracy(["Hello", "", "x"], ["hallo", "!", "abcd"]) == pytest.approx((0.8 + 1.0 + 0.0) / 3)
    with pytest.raises(ValueError):
        char_accuracy([], [])
