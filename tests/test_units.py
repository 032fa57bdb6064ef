"""Dollars as a person reads them."""

import pytest

from spoold.units import seconds, usd


@pytest.mark.parametrize(("amount", "text"), [
    (0, "$0.00"), (None, "-"), (3e-05, "$0.00003"), (0.00055, "$0.00055"), (9.199999999999999e-05, "$0.000092"),
    (0.4213, "$0.42"), (0.05, "$0.05"), (1, "$1.00"), (1234.5, "$1,234.50"), (0.999, "$1.00"),
])
def test_usd(amount, text) -> None:
    assert usd(amount) == text


@pytest.mark.parametrize(("text", "secs"), [("600", 600.0), ("90s", 90.0), ("1.5 h", 5400.0), ("30min", 1800.0),
                                            (" 2hr ", 7200.0), ("0", 0.0), ("soon", None), ("5d", None), ("-1", None)])
def test_seconds_of_a_duration_a_person_writes(text: str, secs: float | None) -> None:
    assert seconds(text) == secs
