"""Secure aggregation on the aggregator's side: one round's protocol record and the part that runs it.

``record`` holds a round's keys, dealt shares, survivors and unmasking (pure; the round record
embeds it, so it is re-exported here). ``phases`` is SecureRounds, the part the RoundCoordinator
composes: its RPCs, its phase clock and the masked sum, wired to the coordinator through the
explicit ``Wiring`` it is given. Import ``phases`` by its path: it depends on aggregator.rounds,
which depends on the record.
"""

from aggregator.secure.record import (
    ADVERTISE,
    DONE,
    KINDS,
    MASK_KEY,
    PHASES,
    SELF_SEED,
    SHARE,
    UNMASK,
    UPLOAD,
    OutsideClip,
    SecureRecord,
)

__all__ = [
    "ADVERTISE",
    "DONE",
    "KINDS",
    "MASK_KEY",
    "PHASES",
    "SELF_SEED",
    "SHARE",
    "UNMASK",
    "UPLOAD",
    "OutsideClip",
    "SecureRecord",
]
