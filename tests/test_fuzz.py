"""Hostile input over real sockets: the server answers Error (or a 4xx) or closes that one stream, and stays up.

The strategies and checks are bench/reliability/fuzz.py's; here they replay a fixed set
(derandomized), while the bench draws fresh ones at length. The server runs on its own event
loop in a thread (so hypothesis can drive plain sync clients); every unhandled exception on that
loop is recorded and must not happen.
"""

import asyncio
import threading

import pytest
from hypothesis import HealthCheck, given, settings

from bench.reliability.common import Bench
from bench.reliability.fuzz import (
    ODD_TARGETS,
    RAW_CASES,
    batches,
    check_batch,
    check_raw_case,
    check_target,
    run_fuzz,
    speak_once,
    targets,
)
from pipecat_orpheus.config import LimitsConfig, load_config
from pipecat_orpheus.speech import load_synthesizer
from pipecat_orpheus.wire.server import serve
from tests.reliability_helpers import tiny_overrides

LIMITS = LimitsConfig(max_message_bytes=1024, max_frame_bytes=4096)  # this module's server: small, so frames pass both


class ServerThread:
    """`serve()` on an event loop of its own thread; `errors` collects what reached the loop's exception handler."""

    def __init__(self, config, synth):
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict] = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self._thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self._thread.start()
        self._cm = serve(config, synth, port=0, api_keys=[])
        self.server = self.call(self._cm.__aenter__())
        self.url = self.server.url

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.call(self._cm.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def running(tiny_model_dir):
    overrides = {**tiny_overrides(tiny_model_dir), "limits.max_message_bytes": LIMITS.max_message_bytes}
    config = load_config(overrides={**overrides, "limits.max_frame_bytes": LIMITS.max_frame_bytes})
    synth = load_synthesizer(config)
    running = ServerThread(config, synth)
    yield running
    running.close()
    synth.close()


# derandomize: CI replays the same 80 batches every run; bench/reliability/run.py fuzzes at random, at length
@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batches(LIMITS))
def test_hostile_frames_get_error_or_close_only_their_stream(running, batch):
    """Every malformed frame gets Error{bad_request} (or the stream closes with 1007/1009); nothing else breaks."""
    check_batch(running.url, batch)
    assert not running.errors


@pytest.mark.parametrize("case", RAW_CASES)
def test_raw_protocol_violations_close_only_that_stream(running, case):
    """Frames that break RFC 6455 close that stream with the matching code; a stream beside it gets all its audio."""
    check_raw_case(running.server.port, running.url, case)
    assert not running.errors


@pytest.mark.parametrize("target", ODD_TARGETS, ids=lambda t: t[:20])
def test_odd_request_targets_get_4xx_and_no_error_log(running, target):
    """A target not exactly a known path gets a 4xx: never a stream, a probe's answer, a 500 or an ERROR line."""
    status = check_target(running.server.port, target)
    assert 400 <= status < 500, status
    assert not running.errors


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(targets)
def test_request_targets_are_matched_exactly(running, target):
    """Any target: a 4xx unless its path is exactly a known one (a probe's without a query); never a 5xx or an ERROR."""
    check_target(running.server.port, target)
    assert not running.errors


def test_the_bench_fuzzer_draws_fresh_frames_and_finds_nothing(running):
    """The bench's driver (fresh seeded draws from two threads, the raw cases, the targets) runs clean, short."""
    bench = Bench(running.server, None, speak_once(running.url))
    result = running.call(run_fuzz(bench, LIMITS, 200, seed=1, threads=2), timeout=240)
    assert not bench.failures, bench.failures
    assert result["frames_fuzzed"] >= 200 and len(result["raw_cases"]) == len(RAW_CASES)
    assert result["odd_targets_4xx"] == f"{len(ODD_TARGETS)}/{len(ODD_TARGETS)}"
    assert not running.errors
