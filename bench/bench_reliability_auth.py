"""Reliability bench, auth phase: missing, wrong, empty, overlong and duplicated keys in header, bearer and query.

Each bad handshake must get 401 before the upgrade and each right one 101; the driver checks
that the key never reached a log line.
"""

from __future__ import annotations

import asyncio

from bench_reliability_common import KEY, Bench, http_status


def auth_cases() -> list[tuple[str, str, list[tuple[str, str]], int]]:
    """(name, query, headers, expected status)."""
    long, longer = "k" * 4000, "k" * 20000  # the second passes websockets' 8 KiB header line limit
    h, b = "kyutai-api-key", "Authorization"
    return [
        ("missing", "", [], 401),
        ("wrong header", "", [(h, "nope")], 401),
        ("wrong bearer", "", [(b, "Bearer nope")], 401),
        ("wrong query", "?auth_id=nope", [], 401),
        ("empty header", "", [(h, "")], 401),
        ("empty bearer", "", [(b, "Bearer ")], 401),
        ("empty query", "?auth_id=", [], 401),
        ("overlong header", "", [(h, long)], 401),
        ("overlong bearer", "", [(b, f"Bearer {long}")], 401),
        ("overlong query", f"?auth_id={long}", [], 401),
        ("past header limit", "", [(h, longer)], 0),  # refused by websockets' parser, any status but 101
        ("duplicated wrong header", "", [(h, "a"), (h, "b")], 401),
        ("duplicated header right+wrong", "", [(h, "a"), (h, KEY)], 401),
        ("duplicated bearer right+wrong", "", [(b, f"Bearer {KEY}"), (b, "Bearer a")], 401),
        ("duplicated query right+wrong", f"?auth_id=a&auth_id={KEY}", [], 401),
        ("header right, query wrong", "?auth_id=a", [(h, KEY)], 401),
        ("basic scheme", "", [(b, f"Basic {KEY}")], 401),
        ("case changed", "", [(h, KEY.upper())], 401),
        ("prefix", "", [(h, KEY[:-1])], 401),
        ("right header", "", [(h, KEY)], 101),
        ("right bearer", "", [(b, f"Bearer {KEY}")], 101),
        ("right query", f"?auth_id={KEY}", [], 101),
        ("right twice", f"?auth_id={KEY}", [(h, KEY)], 101),
    ]


async def auth_attempt(port: int, query: str, headers: list[tuple[str, str]]) -> int | None:
    ws_headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]
    ws_headers.append(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
    try:
        return await http_status(port, f"/api/tts_streaming{query}", ws_headers + headers)
    except (ConnectionError, OSError):
        return None


async def run_auth(bench: Bench, attempts: int) -> dict:
    cases, outcomes, n = auth_cases(), {}, 0
    while n < attempts:
        batch = cases[: attempts - n]
        got = await asyncio.gather(*(auth_attempt(bench.server.port, q, h) for _, q, h, _ in batch))
        for (name, _, _, want), status in zip(batch, got, strict=True):
            ok = status == want if want else status != 101
            outcomes[name] = outcomes.get(name, 0) + (not ok)
            if not ok:
                bench.fail(f"auth {name}: status {status}, expected {want or 'not 101'}")
        n += len(batch)
    return {"auth_attempts": n, "cases": len(cases), "wrong_outcomes": sum(outcomes.values())}
