"""Auth under attack: missing, wrong, empty, overlong and duplicated keys in header, bearer and query.

Each bad handshake must get 401 before the upgrade and each right one 101, and the key must never
reach a log line (the overlong keys repeat it, so a logged header would show it).
"""

from __future__ import annotations

import asyncio

from loguru import logger

from bench.reliability.common import KEY, Bench, http_status

H, B = "kyutai-api-key", "Authorization"


def auth_cases() -> list[tuple[str, str, list[tuple[str, str]], int]]:
    """(name, query, headers, expected status; 0: anything but 101)."""
    long, longer = KEY * 300, "k" * 20000  # the second passes websockets' 8 KiB header line limit
    return [
        ("missing", "", [], 401),
        ("wrong header", "", [(H, "nope")], 401),
        ("wrong bearer", "", [(B, "Bearer nope")], 401),
        ("wrong query", "?auth_id=nope", [], 401),
        ("empty header", "", [(H, "")], 401),
        ("empty bearer", "", [(B, "Bearer ")], 401),
        ("empty query", "?auth_id=", [], 401),
        ("overlong header", "", [(H, long)], 401),
        ("overlong bearer", "", [(B, f"Bearer {long}")], 401),
        ("overlong query", f"?auth_id={long}", [], 401),
        ("past header limit", "", [(H, longer)], 0),  # refused by websockets' parser
        ("duplicated wrong header", "", [(H, "a"), (H, "b")], 401),
        ("duplicated header right+wrong", "", [(H, "a"), (H, KEY)], 401),
        ("duplicated bearer right+wrong", "", [(B, f"Bearer {KEY}"), (B, "Bearer a")], 401),
        ("duplicated query wrong+right", f"?auth_id=a&auth_id={KEY}", [], 401),
        ("duplicated query right+wrong", f"?auth_id={KEY}&auth_id=a", [], 401),
        ("header right, query wrong", "?auth_id=a", [(H, KEY)], 401),
        ("basic scheme", "", [(B, f"Basic {KEY}")], 401),
        ("case changed", "", [(H, KEY.upper())], 401),
        ("prefix", "", [(H, KEY[:-1])], 401),
        ("right header", "", [(H, KEY)], 101),
        ("right bearer", "", [(B, f"Bearer {KEY}")], 101),
        ("right query", f"?auth_id={KEY}", [], 101),
        ("right twice", f"?auth_id={KEY}", [(H, KEY)], 101),
    ]


async def auth_attempt(port: int, query: str, headers: list[tuple[str, str]]) -> int | None:
    ws_headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]
    ws_headers.append(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
    try:
        return await http_status(port, f"/api/tts_streaming{query}", ws_headers + headers)
    except (ConnectionError, OSError):
        return None


async def run_auth(bench: Bench, attempts: int) -> dict:
    """`attempts` handshakes through auth_cases(), in batches of one of each; every log line is searched for KEY."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m} {m.record['extra']} {m.record['exception'] or ''}"), level="DEBUG")
    cases, wrong, n = auth_cases(), {}, 0
    try:
        while n < attempts:
            batch = cases[: attempts - n]
            got = await asyncio.gather(*(auth_attempt(bench.server.port, q, h) for _, q, h, _ in batch))
            for (name, _, _, want), status in zip(batch, got, strict=True):
                if not (status == want if want else status != 101):
                    wrong[name] = wrong.get(name, 0) + 1
                    bench.fail(f"auth {name}: status {status}, expected {want or 'not 101'}")
            n += len(batch)
    finally:
        logger.remove(sink)
    leaked = sum(KEY in line for line in lines)
    if leaked:
        bench.fail(f"auth: the key in {leaked} log lines")
    return {
        "auth_attempts": n,
        "cases": len(cases),
        "wrong_outcomes": sum(wrong.values()),
        "log_lines": len(lines),
        "key_in_log_lines": leaked,
    }
