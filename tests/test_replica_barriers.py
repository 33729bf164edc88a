"""Replica pins: a barrier read before a later change must never lift the later pin.

Two resolutions of one pin (two notifications of one serial, a revocation's own pin and
the notification of a later change, two listener reconnections) read the primary's WAL
position concurrently; the one begun first may come back last or first. The pin must end
at the highest position read, and stay unresolved (primary only) until every read is back.
The barrier reads are scripted here (their order is what is tested); tests/test_replicas.py
runs the pins against a real streaming replica.
"""

from __future__ import annotations

import asyncio
from typing import cast

import asyncpg

from responder.replicas import UNRESOLVED, Replica, ReplicaSet
from responder.store import serial_key

KEY = (1, serial_key(0x1234))


class ScriptedBarriers(ReplicaSet):
    """Each barrier read waits for the test to answer it, in the order asked."""

    def __init__(self) -> None:
        pool = cast(asyncpg.Pool, None)
        super().__init__(replicas=[Replica("replica0", pool, healthy=True)], primary=pool)
        self.reads: list[asyncio.Future[int]] = []

    async def barrier(self) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.reads.append(future)
        return await future


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_an_earlier_global_barrier_read_does_not_lift_a_later_reconnection() -> None:
    async def run() -> None:
        replicas = ScriptedBarriers()
        replicas.pin_everything_now()  # listener connected: read A under way
        await _settle()
        replicas.pin_everything_now()  # lost and reconnected meanwhile: read B
        await _settle()
        replicas.reads[0].set_result(100)  # A read before what B must cover
        await _settle()
        assert replicas.global_barrier == UNRESOLVED
        replicas.reads[1].set_result(200)
        await _settle()
        assert replicas.global_barrier == 200

    asyncio.run(run())


def test_an_earlier_pin_read_does_not_lower_a_later_one() -> None:
    async def run() -> None:
        replicas = ScriptedBarriers()
        replicas.pin_now(*KEY)  # first revocation's notification: read A under way
        await _settle()
        replicas.pin_now(*KEY)  # a later keyCompromise replacing it: read B
        await _settle()
        replicas.reads[0].set_result(100)  # A read before the later commit
        await _settle()
        assert replicas.pins[KEY] == UNRESOLVED
        replicas.reads[1].set_result(200)
        await _settle()
        assert replicas.pins[KEY] == 200

    asyncio.run(run())


def test_the_revokers_own_pin_never_lowers_a_later_notifications_pin() -> None:
    async def run() -> None:
        replicas = ScriptedBarriers()
        own = asyncio.create_task(replicas.pin(*KEY))  # after our commit
        await _settle()
        assert replicas.pins.get(KEY) == UNRESOLVED  # in place before the acknowledgement
        replicas.pin_now(*KEY)  # a later change of the same serial
        await _settle()
        replicas.reads[0].set_result(100)
        await own
        await _settle()
        assert replicas.pins[KEY] == UNRESOLVED
        replicas.reads[1].set_result(200)
        await _settle()
        assert replicas.pins[KEY] == 200

    asyncio.run(run())


def test_a_barrier_read_before_the_listener_was_lost_does_not_lift_the_hold() -> None:
    async def run() -> None:
        replicas = ScriptedBarriers()
        replicas.pin_everything_now()  # listener connected: read A under way
        await _settle()
        replicas.hold_everything()  # and lost again: notifications are missed now
        replicas.reads[0].set_result(100)
        await _settle()
        assert replicas.global_barrier == UNRESOLVED  # primary only while away
        replicas.pin_everything_now()  # listening again: read B covers what was missed
        await _settle()
        replicas.reads[1].set_result(200)
        await _settle()
        assert replicas.global_barrier == 200

    asyncio.run(run())
