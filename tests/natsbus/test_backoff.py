"""The shared backoff: the delays a retry loop waits, and their reset after a success."""

from __future__ import annotations

import pytest

from natsbus.backoff import Backoff


def test_delays_double_up_to_the_cap_and_start_over_after_reset() -> None:
    backoff = Backoff(first_s=0.1, max_s=1.0)
    assert [backoff.advance() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.delay == 0.1


@pytest.mark.parametrize(("first", "most", "factor"), [(0, 1, 2), (2, 1, 2), (0.1, 1, 0.5)])
def test_a_backoff_that_would_not_back_off_is_refused(
    first: float, most: float, factor: float
) -> None:
    with pytest.raises(ValueError, match="bad backoff"):
        Backoff(first_s=first, max_s=most, factor=factor)
