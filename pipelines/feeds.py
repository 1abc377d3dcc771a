"""Feed silence: is a source quiet for longer than it should be?

The most common real interface failure is a feed that silently stops: the
EHR's interface engine queues, a firewall rule changes, a certificate
expires, and nothing errors on our side. What "too long" means depends on
the hour: a lab feed sends hundreds of results an hour at 10:00 on a Tuesday
and a handful at 03:00 on a Sunday.

So each source keeps its **expected messages per hour for each of the 168
hours of the week**, either declared in the site config
(``monitoring.feeds.<source>.expected_per_hour``) or learned: an
exponentially weighted moving average of the count seen in that hour of the
week, updated as each hour ends (``alpha`` 0.3: the latest week weighs 30%,
so a few weeks teach it, and a one-off quiet hour does not wipe it out). An
hour never seen yet has no expectation (NaN), and no alert can fire for it.

With expected rate ``lambda`` per hour, a Poisson feed is silent for ``t``
seconds with probability exp(-lambda * t / 3600); the shipped alert fires
after six expected gaps (p ~ 0.25%), never sooner than 10 minutes
(``monitoring/alerts.yml``, EhrbridgeFeedSilent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

HOURS_PER_WEEK = 168
ALPHA = 0.3
_EPOCH_HOUR_OF_WEEK = 72  # 1970-01-01 00:00 UTC was a Thursday: 3 days * 24 hours


def hour_of_week(moment: datetime) -> int:
    """0 = Monday 00:00-01:00 UTC .. 167 = Sunday 23:00-24:00 UTC."""
    utc = moment.astimezone(UTC)
    return utc.weekday() * 24 + utc.hour


def hour_number(moment: datetime) -> int:
    """Hours since the Unix epoch: the index of the hour ``moment`` is in."""
    return math.floor(moment.timestamp() / 3600)


@dataclass
class FeedClock:
    """One source's traffic: the last message, this hour's count, what each hour expects."""

    declared: float | None = None  # expected_per_hour from the config, for every hour
    last_message: float | None = None  # Unix time of the last message received
    hour: int | None = None  # hour_number of the hour being counted
    count: int = 0  # messages in that hour so far
    learned: list[float] = field(default_factory=lambda: [math.nan] * HOURS_PER_WEEK)

    def arrived(self, now: datetime) -> None:
        self.roll(now)
        self.count += 1
        self.last_message = now.timestamp()

    def roll(self, now: datetime) -> None:
        """Close the hours that ended before ``now``, learning each one's count."""
        current = hour_number(now)
        if self.hour is None:
            self.hour = current
            return
        ended = range(self.hour, current)
        # After a week away every slot has been seen once more; the rest repeats it.
        for hour in list(ended)[-HOURS_PER_WEEK:]:
            self._learn(hour, self.count if hour == self.hour else 0)
        if current != self.hour:
            self.hour, self.count = current, 0

    def _learn(self, hour: int, count: int) -> None:
        slot = (hour + _EPOCH_HOUR_OF_WEEK) % HOURS_PER_WEEK
        old = self.learned[slot]
        self.learned[slot] = float(count) if math.isnan(old) else ALPHA * count + (1 - ALPHA) * old

    def expected(self, now: datetime) -> float:
        """Messages expected in the hour of ``now``; NaN while that hour is unknown."""
        if self.declared is not None:
            return self.declared
        return self.learned[hour_of_week(now)]

    def silence_s(self, now: datetime) -> float:
        """Seconds since the last message; NaN before the first one."""
        if self.last_message is None:
            return math.nan
        return max(0.0, now.timestamp() - self.last_message)

    def to_json(self) -> dict[str, Any]:
        return {
            "last_message": self.last_message,
            "hour": self.hour,
            "count": self.count,
            "learned": [None if math.isnan(x) else round(x, 3) for x in self.learned],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], declared: float | None) -> FeedClock:
        learned = [math.nan if x is None else float(x) for x in data.get("learned", [])]
        if len(learned) != HOURS_PER_WEEK:
            learned = [math.nan] * HOURS_PER_WEEK
        return cls(
            declared=declared,
            last_message=data.get("last_message"),
            hour=data.get("hour"),
            count=int(data.get("count", 0)),
            learned=learned,
        )
