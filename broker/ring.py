"""CreditRing: the subscribers one fetch serves, those with credit in round-robin order, and their total.

A queue feed used to ask every subscriber for its credit before each fetch and walk them all again
to deal the jobs: with 10,000 idle consumers on a queue, each wake-up cost milliseconds of Python
before a single job moved. A ring instead remembers each subscriber's credit as it was last
looked at, keeps those with some in turn order, and keeps their sum, so that a feed knows how many
jobs to fetch at once and deals them in time proportional to the jobs, not to the subscribers.

What the ring knows is only as fresh as its last look: whoever changes a member's credit must call
:meth:`CreditRing.look` (credit that comes back: an ack, a drained socket, a new subscription).
Credit that goes away without a look (a socket filled by other traffic) is found when the member's
turn comes, by :meth:`CreditRing.take` failing; the caller then calls :meth:`CreditRing.drop`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

M = TypeVar("M", bound=Hashable)


class CreditRing(Generic[M]):
    """The subscribers of one group of a feed (same ack mode and lease).

    Invariants, between calls: every member whose ``room`` was positive at its last look is in
    the ring exactly once, with that room; :attr:`total` is the sum of those rooms; the others are
    not in it. Members enter the ring at its back, and :meth:`take` hands out turns from its front.

    Args:
        room: how many jobs a member can take now (0: none); called by :meth:`look`.
    """

    def __init__(self, room: Callable[[M], int]) -> None:
        self._room = room
        self.members: dict[M, None] = {}  # every subscriber of the group, in subscription order
        self._credit: dict[M, int] = {}  # members with room at their last look -> that room
        # Turn order. A member dropped from _credit stays here until its turn comes (removing it
        # from the middle of a deque would cost O(members)); _queued says who is in it already.
        self._order: deque[M] = deque()
        self._queued: set[M] = set()
        self.total = 0

    def __len__(self) -> int:
        """How many members have credit (as last looked at)."""
        return len(self._credit)

    def credits(self) -> dict[M, int]:
        """Each member with credit and its room at the last look, in no particular order."""
        return dict(self._credit)

    def add(self, member: M) -> None:
        """A new subscriber: a member from now on, in the ring if it has room."""
        self.members[member] = None
        self.look(member)

    def remove(self, member: M) -> None:
        """The subscriber left (unsubscribed or disconnected)."""
        self.members.pop(member, None)
        self.drop(member)
        if len(self._order) > 2 * len(self.members) + 16:
            # Subscribers come and go with no job to deal: forget the departed ones, rather than
            # hold them until a turn passes over them.
            self._order = deque(m for m in self._order if m in self.members)
            self._queued = set(self._order)

    def look(self, member: M) -> int:
        """Take a member's room as it is now; it joins the ring's back if it has some and was out.

        Returns:
            Its room (0 for one that is not a member).
        """
        if member not in self.members:
            return 0
        room = self._room(member)
        old = self._credit.get(member, 0)
        if room > 0:
            self._credit[member] = room
            if member not in self._queued:
                self._queued.add(member)
                self._order.append(member)
        elif old:
            del self._credit[member]
        self.total += room - old
        return room

    def drop(self, member: M) -> None:
        """Take a member out of the ring until its next :meth:`look` finds room (it found none)."""
        self.total -= self._credit.pop(member, 0)

    def take(self) -> M | None:
        """The member whose turn it is, moved to the back of the ring; None if none has credit.

        The caller delivers to it, then calls :meth:`look` (or :meth:`drop` if it took nothing).
        """
        order = self._order
        while order:
            member = order.popleft()
            if member in self._credit:
                order.append(member)
                return member
            self._queued.discard(member)
        return None
