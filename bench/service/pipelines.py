"""Many `OrpheusTTSService` pipelines in one bot process against one shared engine, as conversations.

This process is the bot. Per level it builds N pipelines, each `Pipeline([OrpheusTTSService(config),
Recorder()])` run by its own `PipelineWorker` (one `WorkerRunner` for all), with no transport: the
`Recorder` at the end notes each `TTSAudioRawFrame`'s arrival and size. Every service speaks from
the process-wide shared synthesizer (`load_synthesizer`): an engine core child process with
`engine.core_process`, else the engine in this process. Each pipeline is a conversation for
`--duration-s`: queue a `TTSSpeakFrame` of ~`--prompt-tokens` prompt tokens, wait for its
`TTSStoppedFrame` (or all its audio), then until the audio has played, pause 0.3-2 s, speak
again. `--interrupt-fraction` of utterances are interrupted part-way (an `InterruptionFrame`
queued at the pipeline's start, as a barge-in from the input side) and timed until the last audio.

Figures per level: time to first audio (`TTSSpeakFrame` queued -> first audio frame) p50/p95/p99;
late chunks (a frame arriving after first arrival + the duration of the audio before it), the
conversations that had one and the worst lateness; the interruption's stop time; the engine's
counters (mean step, decode tokens/s); the bot's CPU seconds per second (the event loop's thread
and the whole process) and the event loop's lag. Every utterance is `--audio-tokens` long
(`sampling.min_tokens`), since random weights stop at random.

python3 -m bench.service.pipelines --random-weights --out $OUT/service_pipelines.json   # GPU, real-size random model
python3 -m bench.service.pipelines --tiny --device cpu --levels 2 4 --duration-s 5 --out /tmp/pipelines.json  # CPU
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

from pipecat.frames.frames import EndFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.workers.runner import WorkerRunner

from bench.server.load import bench_config, device_name, engine_delta, make_texts
from bench.server.report import ms_summary
from bench.service.conversation import Recorder, Utterance, converse
from bench.service.report import summarize, table
from pipecat_orpheus.config import Config
from pipecat_orpheus.format import SAMPLE_RATE, SAMPLES_PER_FRAME
from pipecat_orpheus.service import OrpheusTTSService
from pipecat_orpheus.speech import load_synthesizer

START_TIMEOUT_S = 120.0  # every pipeline of a level past its StartFrame
START_MARGIN_S = 0.5  # pipelines started -> T0
END_TIMEOUT_S = 60.0  # EndFrame -> every worker finished, else they are cancelled
LAG_PERIOD_S = 0.01  # the event-loop lag probe's sleep
SETTINGS = (
    "levels", "duration_s", "pause_s", "spread_s", "interrupt_fraction", "prompt_tokens", "audio_tokens",
    "warmup_s", "set",
)  # fmt: skip


class Load:
    """The bot process's load over a level: CPU seconds (event-loop thread, whole process) and loop lag."""

    async def __aenter__(self) -> Load:
        self.lags: list[float] = []
        self.wall, self.thread = time.monotonic(), time.thread_time()
        self.process = resource.getrusage(resource.RUSAGE_SELF)
        self.probe = asyncio.create_task(self._probe())
        return self

    async def _probe(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(LAG_PERIOD_S)
            self.lags.append(time.monotonic() - t - LAG_PERIOD_S)

    async def __aexit__(self, *exc) -> None:
        self.probe.cancel()
        wall, thread = time.monotonic() - self.wall, time.thread_time() - self.thread
        ru = resource.getrusage(resource.RUSAGE_SELF)
        process = ru.ru_utime + ru.ru_stime - self.process.ru_utime - self.process.ru_stime
        self.figures = {
            "loop_thread_cpu_s_per_s": round(thread / wall, 3),
            "process_cpu_s_per_s": round(process / wall, 3),
            "loop_lag": ms_summary(self.lags),
        }


def engine_counters(synth) -> list[dict]:
    """Each engine core's counters, as `engine_delta` takes them."""
    return [dataclasses.asdict(stats) for stats in synth.engine_stats]


async def run_level(args, config: Config, synth, level: int, texts, expected: int, *, duration_s, fraction) -> dict:
    """N pipelines started together, N conversations for `duration_s`, then EndFrame to each."""
    params = PipelineParams(audio_out_sample_rate=SAMPLE_RATE)  # the engine's rate: no resampling
    recorders = [Recorder() for _ in range(level)]
    workers = [
        PipelineWorker(
            Pipeline([OrpheusTTSService(config=config), rec]), params=params, enable_rtvi=False,
            enable_turn_tracking=False, idle_timeout_secs=None,
        )
        for rec in recorders
    ]  # fmt: skip
    started = [asyncio.Event() for _ in workers]
    for worker, rec, ev in zip(workers, recorders, started, strict=True):
        worker.event_handler("on_pipeline_started")(lambda _w, _f, ev=ev: ev.set())
        worker.event_handler("on_pipeline_error")(lambda _w, frame, rec=rec: rec.error(str(frame.error)))
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(*workers)
    running = asyncio.create_task(runner.run())
    utterances: list[Utterance] = []
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await asyncio.gather(*(ev.wait() for ev in started))
        counters = engine_counters(synth)
        t0 = time.monotonic() + START_MARGIN_S
        async with Load() as load:
            await asyncio.gather(
                *(
                    converse(args, w, rec, i, level, texts, t0, expected, utterances.append, duration_s=duration_s,
                             fraction=fraction)
                    for i, (w, rec) in enumerate(zip(workers, recorders, strict=True))
                )
            )  # fmt: skip
        wall = time.monotonic() - t0
    finally:
        for worker in workers:
            await worker.queue_frame(EndFrame())
        try:
            await asyncio.wait_for(asyncio.shield(running), END_TIMEOUT_S)
        except TimeoutError:
            await runner.cancel()
            await running
    figures = summarize([u.to_dict() for u in utterances], level, wall)  # TTSStoppedFrames came since
    figures["bot"] = load.figures
    figures["engine"] = engine_delta(counters, engine_counters(synth), wall)
    return figures


async def bench(args) -> dict:
    from bench.common import command_line

    config = bench_config(args)
    synth = await asyncio.to_thread(load_synthesizer, config)  # the front every service will get
    texts, prompt_lengths = make_texts(synth.backend.tokenizer, config.voices.default, args.prompt_tokens, 64)
    expected = args.audio_tokens // 7 * SAMPLES_PER_FRAME  # whole SNAC frames
    levels = []
    try:
        if args.warmup_s > 0:  # not recorded: first requests, cancels and joins of the engine, allocator
            warm = min(8, max(args.levels))
            await run_level(args, config, synth, warm, texts, expected, duration_s=args.warmup_s, fraction=0.5)
        for level in args.levels:
            levels.append(
                await run_level(
                    args, config, synth, level, texts, expected, duration_s=args.duration_s,
                    fraction=args.interrupt_fraction,
                )
            )  # fmt: skip
            print(table(levels[-1:], header=len(levels) == 1), flush=True)
    finally:
        synth.close()
    print("\n" + table(levels), flush=True)
    return {
        "what": "many OrpheusTTSService pipelines in one bot process against one shared engine, as conversations",
        "command": command_line(),
        "device": device_name(args),
        "speech": "engine core process" if config.engine.core_process else "engine in the bot process",
        "model": "tiny" if args.tiny else ("real-size random weights" if args.random_weights else config.model.llm),
        "settings": {k: getattr(args, k) for k in SETTINGS}
        | {
            "audio_s_per_utterance": expected / SAMPLE_RATE,
            "prompt_tokens": {"target": args.prompt_tokens, "min": min(prompt_lengths), "max": max(prompt_lengths)},
            "example_text": texts[0],
        },
        "config": dataclasses.asdict(config),
        "definitions": {
            "ttfa": "TTSSpeakFrame queued at the pipeline's start -> its first TTSAudioRawFrame at the Recorder",
            "late_chunk": "an audio frame arriving after first-arrival + duration of the audio before it",
            "interrupt_stop": "InterruptionFrame queued -> the utterance's last audio frame after it (0: none came)",
            "interrupt_reach": "InterruptionFrame queued -> the same frame at the Recorder (past the service)",
            "stopped_after_last_audio": "last audio frame -> TTSStoppedFrame",
            "bot": "CPU seconds per second of the event loop's thread and of this whole process, and the loop's lag",
            "engine": "the shared engine's counters over the level (a core reports them in its beats)",
        },
        "levels": levels,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[64, 128, 256], help="pipelines (conversations)")
    ap.add_argument("--duration-s", type=float, default=30.0, help="how long conversations keep speaking")
    ap.add_argument("--pause-s", type=float, nargs=2, default=[0.3, 2.0], help="pause range after playback")
    ap.add_argument("--spread-s", type=float, default=1.0, help="conversations start spread over this")
    ap.add_argument("--interrupt-fraction", type=float, default=0.1, help="utterances interrupted part-way")
    ap.add_argument("--prompt-tokens", type=int, default=50, help="prompt length of each utterance (tokens)")
    ap.add_argument("--audio-tokens", type=int, default=None, help="audio tokens per utterance (420 = 5.1 s; tiny: 70)")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="an unrecorded level of 8 first (0: none)")
    ap.add_argument("--config", default=None, help="YAML config (default: orpheus_config.yaml)")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. engine.max_slots=320")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (checks the machinery, on the CPU)")
    ap.add_argument("--random-weights", action="store_true", help="real-size random Orpheus, on disk")
    ap.add_argument("--model-dir", default=None, help="where --random-weights/--tiny write the models (kept for reuse)")
    ap.add_argument(
        "--core-process", action=argparse.BooleanOptionalAction, help="the engine in a core process (default: config)"
    )
    ap.add_argument("--log-level", default="WARNING", help="the bot's log level (loguru)")
    ap.add_argument("--out", default="bench/results/service_pipelines.json")
    args = ap.parse_args()
    from loguru import logger

    logger.remove()  # Pipecat logs every frame processor's start and stop at DEBUG
    logger.add(sys.stderr, level=args.log_level)
    if args.audio_tokens is None:
        args.audio_tokens = 70 if args.tiny else 420
    result = asyncio.run(bench(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
