"""A client process to be killed mid-utterance: it speaks, says `audio` on stdout at its first Audio, then waits.

`python bench/reliability/killed_client.py URL TEXT [API_KEY]`, started and SIGKILLed by the
`killed_client` scenario of faults.py (a script, not a module: it imports nothing of this repository).
"""

import asyncio
import sys

import msgpack
from websockets.asyncio.client import connect


async def main(url: str, text: str, key: str | None) -> None:
    ws = await connect(url, additional_headers={"kyutai-api-key": key} if key else None)
    await ws.recv()  # Ready
    await ws.send(msgpack.packb({"type": "Speak", "text": text, "id": 1}))
    while msgpack.unpackb(await ws.recv())["type"] != "Audio":
        pass
    sys.stdout.write("audio\n")  # the parent's cue to kill us
    sys.stdout.flush()
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
