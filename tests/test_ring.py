"""CreditRing (broker/ring.py): turn order, credit, and the running total, on plain members."""

from __future__ import annotations

import random

from broker.ring import CreditRing


def ring_over(room: dict[str, int]) -> CreditRing[str]:
    return CreditRing(lambda member: room.get(member, 0))


def check(ring: CreditRing[str], room: dict[str, int]) -> None:
    """The ring's view, recomputed the slow way: every member with room, and their sum."""
    expected = {m: room.get(m, 0) for m in ring.members if room.get(m, 0) > 0}
    assert ring.credits() == expected
    assert ring.total == sum(expected.values())
    assert len(ring) == len(expected)


def test_turns_go_round_among_members_with_credit_and_skip_the_rest() -> None:
    room = {"a": 2, "b": 0, "c": 1}
    ring = ring_over(room)
    for member in "abc":
        ring.add(member)
    check(ring, room)
    assert [ring.take() for _ in range(4)] == ["a", "c", "a", "c"]
    # b gets credit: it joins at the back of the turn order.
    room["b"] = 1
    ring.look("b")
    check(ring, room)
    assert [ring.take() for _ in range(3)] == ["a", "c", "b"]


def test_a_member_that_took_nothing_is_dropped_until_looked_at_again() -> None:
    room = {"a": 1, "b": 1}
    ring = ring_over(room)
    ring.add("a")
    ring.add("b")
    assert ring.take() == "a"
    ring.drop("a")  # its turn failed: e.g. its socket filled without the ring hearing
    assert ring.total == 1
    assert [ring.take() for _ in range(3)] == ["b", "b", "b"]
    ring.look("a")
    check(ring, room)
    assert {ring.take(), ring.take()} == {"a", "b"}


def test_an_empty_ring_has_no_turn_and_a_non_member_no_credit() -> None:
    room = {"a": 3, "z": 5}
    ring = ring_over(room)
    assert ring.take() is None
    assert ring.look("z") == 0  # not a member: looking at it changes nothing
    ring.add("a")
    room["a"] = 0
    ring.look("a")
    assert ring.take() is None and ring.total == 0
    ring.remove("a")
    assert not ring.members and ring.take() is None


def test_members_that_come_and_go_without_a_turn_are_not_held() -> None:
    room = {"stays": 1}
    ring = ring_over(room)
    ring.add("stays")
    for i in range(1000):
        room[f"m{i}"] = 1
        ring.add(f"m{i}")
        ring.remove(f"m{i}")
    assert len(ring._order) <= 2 * len(ring.members) + 16
    check(ring, room)
    assert [ring.take(), ring.take()] == ["stays", "stays"]


def test_the_total_stays_the_sum_of_credits_through_any_sequence() -> None:
    rng = random.Random(6)
    room: dict[str, int] = {}
    ring = ring_over(room)
    names = [f"m{i}" for i in range(40)]
    dealt: dict[str, int] = {}
    for _ in range(5000):
        name = rng.choice(names)
        action = rng.random()
        if action < 0.15:
            room[name] = rng.randint(0, 5)
            ring.add(name)  # subscribe (again: no effect on a member but a fresh look)
        elif action < 0.25:
            ring.remove(name)  # unsubscribe or disconnect
            room.pop(name, None)
        elif action < 0.5 and name in ring.members:
            room[name] = room.get(name, 0) + rng.randint(1, 3)  # ack, nack, drained socket: reported
            ring.look(name)
        elif action < 0.9:
            member = ring.take()  # a job dealt
            if member is None:
                assert not any(room.get(m, 0) > 0 for m in ring.members), "a member with credit had no turn"
            elif room[member] == 0:
                ring.drop(member)  # the turn failed: its credit had gone unreported
            else:
                room[member] -= 1
                dealt[member] = dealt.get(member, 0) + 1
                ring.look(member)
        elif name in ring.members:
            room[name] = 0  # its socket filled: the ring hears of it only when its turn comes
        check_superset(ring, room)
    for member in list(ring.members):
        ring.look(member)
    check(ring, room)
    assert len(dealt) > 30


def check_superset(ring: CreditRing[str], room: dict[str, int]) -> None:
    """Between looks the ring may still count a member whose credit went away unreported, but it
    never misses one with credit (every change that gives credit is reported)."""
    credits = ring.credits()
    assert ring.total == sum(credits.values())
    assert all(m in credits for m in ring.members if room.get(m, 0) > 0)
    assert all(m in ring.members for m in credits)
