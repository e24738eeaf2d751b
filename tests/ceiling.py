"""The ceiling `make bench` compares Herald with: a minimal hand-written pipeline doing the same
essential work of a Segment export, with the same batching.

It reads the audience from the segmentation tables in one pass, 1,000 rows at a time, records the
deliveries, publishes them to JetStream in batches of 500, consumes the batches (one ack each),
builds and POSTs the same track events to the same fake Segment, and records the outcomes. Nothing
more: no services, no outbox, no retries, no stop checks, no stats.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import nats
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

PAGE = 1000
BATCH = 500
IN_FLIGHT = 4


async def run_ceiling(
    database_url: str,
    nats_url: str,
    namespace: str,
    segment_url: str,
    write_key: str,
    cohort: str,
    users: int,
) -> float:
    """Seconds the pipeline takes to deliver every member of `cohort` to the fake Segment."""
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=4)
    connection = await nats.connect(nats_url)
    js = connection.jetstream()
    subject = f"{namespace}.ceiling.jobs"
    stream = f"{namespace}_CEILING".upper()
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    async with pool.acquire() as db:
        await db.execute(
            "CREATE SCHEMA IF NOT EXISTS ceiling;"
            "CREATE TABLE ceiling.deliveries (delivery_id text PRIMARY KEY, user_id text NOT NULL);"
            "CREATE TABLE ceiling.outcomes (delivery_id text PRIMARY KEY, status text NOT NULL)"
        )
    run_id = uuid.uuid4()
    done = asyncio.Event()
    delivered = 0
    started = time.perf_counter()

    async def pages() -> AsyncIterator[list[asyncpg.Record]]:
        """The cohort in pages, read in one pass: a cursor over the matches the GIN index finds
        (paging by `user_id > last` made every page a scan of the whole table)."""
        async with pool.acquire() as db, db.transaction():
            cursor = await db.cursor(
                "SELECT user_id, jsonb_strip_nulls(jsonb_build_object("
                "'first_name', properties->'first_name', 'plan', properties->'plan',"
                " 'code', properties->'code'))::text AS attributes"
                " FROM segmentation.users WHERE properties @> jsonb_build_object('cohort', $1::text)",
                cohort,
            )
            while rows := await cursor.fetch(PAGE):
                yield rows

    async def produce() -> None:
        async for rows in pages():
            for start in range(0, len(rows), BATCH):
                chunk = rows[start : start + BATCH]
                ids = [str(uuid.uuid5(run_id, r["user_id"])) for r in chunk]
                async with pool.acquire() as db:
                    await db.execute(
                        "INSERT INTO ceiling.deliveries SELECT * FROM unnest($1::text[], $2::text[])",
                        ids,
                        [r["user_id"] for r in chunk],
                    )
                payload = json.dumps(
                    [[d, r["user_id"], r["attributes"]] for d, r in zip(ids, chunk, strict=True)]
                ).encode()
                await js.publish_async(subject, payload)

    async def send(http: aiohttp.ClientSession, payload: bytes) -> None:
        nonlocal delivered
        items = json.loads(payload)
        events = []
        for delivery_id, user_id, attributes in items:
            profile = json.loads(attributes)
            name = profile.get("first_name") or "there"
            event = {
                "type": "track",
                "event": "Herald VIP Export",
                "userId": user_id,
                "messageId": delivery_id,
                "timestamp": "2026-01-01T00:00:00.000Z",
                "properties": {
                    "coupon": "VIP20",
                    "greeting": f"Hi {name}, your code is {profile.get('code', '')}",
                },
                "context": {"traits": {k: profile[k] for k in ("first_name", "plan") if k in profile}},
            }
            events.append(json.dumps(event, separators=(",", ":")))
        body = '{"batch":[' + ",".join(events) + '],"writeKey":' + json.dumps(write_key) + "}"
        auth = base64.b64encode(f"{write_key}:".encode()).decode()
        async with http.post(
            segment_url + "/v1/batch",
            data=body.encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
        ) as response:
            await response.read()
            status = "sent" if response.status == 200 else "failed"
        async with pool.acquire() as db:
            await db.execute(
                "INSERT INTO ceiling.outcomes SELECT d, $2 FROM unnest($1::text[]) AS d",
                [i[0] for i in items],
                status,
            )
        delivered += len(items)
        if delivered >= users:
            done.set()

    async def consume() -> None:
        subscription = await js.pull_subscribe(subject, durable="ceiling", stream=stream)
        async with aiohttp.ClientSession() as http:
            in_flight: set[asyncio.Task[None]] = set()
            while not done.is_set():
                try:
                    msgs = await subscription.fetch(IN_FLIGHT, timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                for msg in msgs:

                    async def one(m: Msg = msg) -> None:
                        await send(http, m.data)
                        await m.ack()

                    task = asyncio.create_task(one())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                while len(in_flight) >= IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*in_flight)

    try:
        await asyncio.gather(produce(), consume())
        return time.perf_counter() - started
    finally:
        await js.delete_stream(stream)
        await connection.close()
        async with pool.acquire() as db:
            await db.execute("DROP SCHEMA ceiling CASCADE")
        await pool.close()
