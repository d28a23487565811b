"""Auth under attack: every bad key refused with 401 before the upgrade, and the key never in a log line."""

from bench.reliability.auth import auth_cases, run_auth
from bench.reliability.common import KEY, Bench, http_status, idle
from pipecat_orpheus.wire.server import serve
from tests.reliability_helpers import config, expected, synth  # noqa: F401 (fixtures)


async def test_auth_refuses_every_bad_key_before_upgrade_and_never_logs_it(config, synth, expected):
    """Missing, wrong, empty, overlong, duplicated keys (header, bearer, query) get 401; the key is never logged."""
    async with serve(config, synth, port=0, api_keys=[KEY]) as server:
        bench = Bench(server, synth, expected)
        result = await run_auth(bench, len(auth_cases()))  # each case once
        assert not bench.failures, bench.failures
        assert result["wrong_outcomes"] == 0 and result["key_in_log_lines"] == 0
        assert result["log_lines"] > 0  # the sink saw the refusals: "never logged" is not vacuous
        assert await bench.speak(1) == [expected]
        assert await http_status(server.port, "/healthz") == 200
        await idle(server, synth)
