"""The engine core: the engine in a process of its own, and the client that frontends use.

The core process (`process.py`) owns the GPU and runs the step loop, nothing else; the server
and the Pipecat service reach it through `EngineClient` (`client.py`), a `Backend`, over ZeroMQ
with msgpack (`messages.py`): requests and cancels in, one message per engine step out.
`EngineCores` (`cores.py`) runs one core per device behind one `Backend`.
"""

from pipecat_orpheus.core.client import EngineClient
from pipecat_orpheus.core.cores import EngineCores

__all__ = ["EngineClient", "EngineCores"]
