"""The hand-written frontmatter writer against PyYAML's own: where it answers, byte for byte the same."""

from __future__ import annotations

import string

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from spoold import plainyaml, task

# Text that exercises every rule: YAML's indicators, spaces, quotes, digits, dates, words, odd Unicode.
ALPHABET = (string.ascii_letters + string.digits + " _./+-,?()!'\"&*%$;=<>~^@[]{}:#|`\\\t\n\x85\u2028\ufeffé日\U0001f600"
            "\xa0\u3000\u2009")
FRAGMENTS = st.sampled_from(["yes", "No", "null", "~", "0x1f", "012", "1_000", "1.5", "1e5", ".5", "2026-12-02",
                             "2026-12-02T01:02:03Z", "1:20", ": ", " #", "- ", "? ", "...", "---", "'", "''", "<<", "=", ".inf"])
TEXT = st.lists(st.one_of(st.text(ALPHABET, max_size=12), FRAGMENTS), max_size=4).map("".join)
SCALARS = st.one_of(TEXT, st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none())
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(TEXT, SCALARS, max_size=2))
KEYS = st.one_of(st.sampled_from(["id", "title", "max_budget_usd", "tags", "k" * 120 + "éééé", "k" * 125 + "é"]), TEXT)


def _pyyaml(meta: dict[str, object]) -> str:
    return task._handler().export(meta)


@settings(max_examples=2000, deadline=None)
@given(st.dictionaries(KEYS, VALUES, min_size=1, max_size=5))
def test_what_it_writes_is_pyyamls_own(meta: dict[str, object]) -> None:
    out = plainyaml.dump(meta)
    if out is not None:
        assert out == _pyyaml(meta)
        assert yaml.safe_load(out) == meta


def test_it_answers_for_a_task_as_spoold_writes_one() -> None:
    meta = {"id": "20261202-010203-abcd", "title": "What is X? A (short) answer, please", "model": "sonnet",
            "priority": "normal", "submitted_at": "2026-12-02T01:13:23.495Z", "source": "x.md", "timeout": 30.0,
            "tags": ["a", "b"], "max_turns": 3, "notify": "none", "title2": "l'été 日本"}
    out = plainyaml.dump(meta)
    assert out is not None and out == _pyyaml(meta)
    assert "submitted_at: '2026-12-02T01:13:23.495Z'\n" in out


def test_it_leaves_to_pyyaml_what_it_is_unsure_of() -> None:
    for meta in ({"schema": {"type": "object"}}, {"title": "a: b"}, {"title": "- a list?"}, {"tags": []},
                 {"x": None}, {"x": 1e20}, {"x": "two\nlines"}, {"x": "nel\x85"}, {"x": "emoji \U0001f600"}):
        assert plainyaml.dump(meta) is None, meta


def test_it_quotes_what_pyyaml_would_read_as_no_string() -> None:
    for text in ("yes", "Off", "null", "~", "1:20", "0x1f", "012", "1_000", "1.5", ".5", ".inf", "2026-12-02",
                 "2026-12-02T01:02:03.5Z", "<<", "=", "0"):
        out = plainyaml.dump({"x": text})
        assert out == f"x: '{text}'\n" == _pyyaml({"x": text}), text
    for text in ("1e5", "a:b", "a#b", "~x", "12:30:00x", "20261202-010203-abcd", "it's", "n", "y"):
        out = plainyaml.dump({"x": text})
        assert out == f"x: {text}\n" == _pyyaml({"x": text}), text


def test_a_value_ending_in_a_unicode_space_keeps_it() -> None:
    """python-frontmatter's own export strips its text, which took a trailing U+00A0 off the last value."""
    for meta in ({"x": "a\xa0"}, {"x": "a\xa0", "tags": ["b\u3000"]}, {"schema": {"k": "v\xa0"}}):
        assert yaml.safe_load(_pyyaml(meta)) == meta
        text = task.render(meta, "body\n").decode()
        assert task.parse_text(text)[0] == meta
