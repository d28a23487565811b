"""Decode-step GEMV micro-benchmark: how to make Orpheus 3B's batch-1..8 weight GEMMs faster on an H100.

Why: at batch 1 the engine's decode step takes 3.17 ms in a CUDA graph, 2.40 ms of it in the four weight
GEMMs per layer, which cuBLAS (nvjet, split-K + reduce) runs at 2.0-2.7 TB/s against a 3.0 TB/s copy.
This times one step's GEMMs (28 layers x qkv, o, gate_up, down, each layer with its own weights so the
50 MB L2 caches nothing, + the audio head once) captured in one CUDA graph, for: F.linear (what the
engine does), mv (torch.mv at B=1, torch.mm(W, x.T).T above: cuBLAS's gemv path), F.linear with
preferred_blas_library "cublaslt" / "cublas", a Triton GEMV (`gemv_triton.py`) with a bounded per-shape
config sweep, and "mixed" (per shape, the fastest correct variant). Each shape's 28 calls are also
timed in their own graph. Every output is checked against an fp32 reference; a wrong variant or
config is marked and never "best". Without CUDA it only runs the correctness part on tiny shapes on
CPU (the Triton kernel too when TRITON_INTERPRET=1 and Triton is installed) and exits 0.

    python3 -m bench.experiments.gemv             # H100, ~60-90 s -> bench/results/gemv_h100.json
    python3 -m bench.experiments.gemv --check     # correctness only (on CPU: tiny shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import copy_bandwidth

try:
    from bench.experiments import gemv_triton as gt
except ImportError:  # CPU torch ships no Triton: torch variants only
    gt = None

SHAPES = {"qkv": (5120, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192), "head": (28672, 3072)}
TINY_SHAPES = {"qkv": (80, 64), "o": (64, 128), "gate_up": (200, 64), "down": (48, 160), "head": (96, 64)}
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")
LAYERS = 28
TOL = 1e-2  # max|y - ref| / max|ref|; rounding the output to bf16 alone gives up to ~4e-3
SPLITS = (1, 2, 4, 8)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def blas_call(fn, backend: str | None):
    """fn(x, w) run with `backend` as torch's preferred BLAS library (restored after), so variants can mix."""
    if backend is None:
        return fn

    def call(x, w):
        prev = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(backend)
        try:
            return fn(x, w)
        finally:
            torch.backends.cuda.preferred_blas_library(prev)

    return call


def mv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """cuBLAS's gemv path: W (N, K) times x (K,) at B=1, mm(W, x.T) above; returns a (B, N) view."""
    return torch.mv(w, x[0])[None] if x.shape[0] == 1 else torch.mm(w, x.t()).t()


def torch_variants(cuda: bool) -> dict:
    out = {"linear": F.linear, "mv": mv}
    if cuda:
        out |= {f"linear_{lib}": blas_call(F.linear, lib) for lib in ("cublaslt", "cublas")}
    return out


def capture(fn):
    """Warm fn up on a side stream (as the PyTorch docs say), capture it in a CUDA graph; return (graph, outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def replay_ms(graph, reps: int) -> float:
    """Median ms of one replay, each bracketed by its own CUDA events."""
    graph.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


class Bench:
    """Weights (each layer its own), inputs, fp32 references of layer 0, and graph timing of one batch size."""

    def __init__(self, shapes: dict, layers: int, device: str, reps: int):
        self.shapes, self.device, self.reps = shapes, device, reps
        self.calls = {s: (1 if s == "head" else layers) for s in shapes}  # calls of each shape per step
        self.w = {s: [torch.randn(n, k, dtype=torch.bfloat16, device=device).mul_(0.02) for _ in range(self.calls[s])]
                  for s, (n, k) in shapes.items()}  # fmt: skip
        self.step_bytes = sum(self.calls[s] * n * k * 2 for s, (n, k) in shapes.items())
        self.b = 0

    def set_batch(self, b: int) -> None:
        self.b = b
        xs = {k: torch.randn(b, k, dtype=torch.bfloat16, device=self.device) for _, k in self.shapes.values()}
        self.x = {s: xs[k] for s, (_, k) in self.shapes.items()}  # (B, K) per shape, shared by shapes of one K
        self.ref = {s: self.x[s].float() @ self.w[s][0].float().T for s in self.shapes}  # (B, N) fp32
        self.outs = {s: torch.empty(self.calls[s], b, n, dtype=torch.bfloat16, device=self.device)
                     for s, (n, _) in self.shapes.items()}  # fmt: skip  # (calls, B, N): Triton writes here

    def shape_bytes(self, s: str) -> int:
        n, k = self.shapes[s]
        return self.calls[s] * n * k * 2

    def time_shape(self, call, s: str, reps: int) -> tuple[float, float]:
        """(ms, rel. error) of one shape's calls in one graph; the error of an eager call and of the replayed output."""
        err = rel_err(call(s, 0), self.ref[s])
        graph, outs = capture(lambda: [call(s, layer) for layer in range(self.calls[s])])
        ms = replay_ms(graph, reps)
        return ms, max(err, rel_err(outs[0], self.ref[s]))

    def time_step(self, call, reps: int) -> float:
        """ms of a whole step: per layer qkv, o, gate_up, down, then the head, in one graph."""

        def step():
            outs = [call(s, layer) for layer in range(self.calls["qkv"]) for s in LAYER_SHAPES]
            return outs + [call("head", 0)]

        graph, _ = capture(step)
        return replay_ms(graph, reps)

    def measure(self, call) -> dict:
        """Step ms, TB/s, per-shape ms / TB/s and relative errors of one variant at the current batch."""
        shape_ms, errs = {}, {}
        for s in self.shapes:
            shape_ms[s], errs[s] = self.time_shape(call, s, self.reps)
        step_ms = self.time_step(call, self.reps)
        return {
            "step_ms": step_ms, "tbps": self.step_bytes / step_ms / 1e9, "shape_ms": shape_ms,
            "shape_tbps": {s: self.shape_bytes(s) / ms / 1e9 for s, ms in shape_ms.items()},
            "rel_err": errs, "ok": max(errs.values()) <= TOL,
        }  # fmt: skip


def tvariant(bench: Bench, plans: dict):
    """A call(shape, layer) running each shape's Triton plan into the preallocated outputs."""
    return lambda s, layer: plans[s](bench.x[s], bench.w[s][layer], bench.outs[s][layer])


def tiles(b: int) -> list:
    """Triton tiles worth compiling at batch b, most promising first.

    Pruned by the registers ptxas gives (Triton 3.9, sm_90): a thread loads 16-64 W elements per K step
    (2-8 16-byte vectors) at batch 1 and on the tl.dot path; the multiply + sum path holds rows x that in
    registers, so above batch 1 it gets 8..128/rows (more spills). The prior favours 32 (batch 1, dot)
    or 64/rows elements. num_stages only matters on the tl.dot path (Triton pipelines loads feeding a dot).
    """
    out = []
    for dot in (False, True) if b > 1 else (False,):
        rows = gt.padded_rows(b, dot)
        lo, hi, target = (16, 64, 32) if dot or rows == 1 else (8, 128 // rows, max(8, 64 // rows))
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256, 512):
                for nw in (4, 8):
                    per_thread = bn * bk // (32 * nw)
                    if lo <= per_thread <= hi and (not dot or bn * bk <= 16384):
                        prior = (abs(per_thread - target) / target, -bk, nw, dot)
                        out.append((prior, gt.GemvConfig(bn, bk, nw, 3, dot=dot)))
    return [cfg for _, cfg in sorted(out, key=lambda p: p[0])]


def sweep(bench: Bench, budget_s: float, reps: int, sms: int) -> tuple[dict, list]:
    """Best Triton config per shape at the current batch, compiling for about budget_s seconds.

    Stage 1: tiles in prior order on every shape, each with the smallest split giving >= one program
    per SM. Stage 2: num_stages 2 and 4 for the 3 best tiles by step time. Stage 3: per shape, its 2
    best tiles with every split and both reductions (no new compiles of the GEMV kernel).
    """
    t0, records, seen = time.perf_counter(), [], set()

    def evaluate(cfg, s):
        n, k = bench.shapes[s]
        if (cfg, s) in seen or not cfg.fits(n, k):
            return
        seen.add((cfg, s))
        rec = {"shape": s, "config": asdict(cfg)}
        try:
            plan = gt.GemvPlan(bench.b, n, k, cfg, torch.device(bench.device))
            ms, err = bench.time_shape(tvariant(bench, {s: plan}), s, reps)
            rec |= {"ms": ms, "rel_err": err, "ok": err <= TOL}
        except Exception as ex:  # out of shared memory or registers, a compile error: skip the config
            rec |= {"error": f"{type(ex).__name__}: {str(ex)[:200]}", "ok": False}
        records.append(rec)

    def programs(cfg, s):
        return -(-bench.shapes[s][0] // cfg.block_n) * cfg.split_k

    def with_split(cfg, s):
        fit = [replace(cfg, split_k=sk) for sk in SPLITS if replace(cfg, split_k=sk).fits(*bench.shapes[s])]
        return next((c for c in fit if programs(c, s) >= sms), fit[-1] if fit else cfg)

    def ranked(shapes):
        """Tiles (split reset to 1) by their best ms summed over `shapes`; tiles missing a shape are left out."""
        best = {}
        for r in records:
            if r["ok"] and r["shape"] in shapes:
                key = (replace(gt.GemvConfig(**r["config"]), split_k=1, reduce="partials"), r["shape"])
                best[key] = min(best.get(key, float("inf")), r["ms"])
        total = {}
        for (tile, _), ms in best.items():
            total[tile] = total.get(tile, 0.0) + ms
        done = [t for t in total if all((t, s) in best for s in shapes)]
        return sorted(done, key=total.get)

    for cfg in tiles(bench.b):
        if time.perf_counter() - t0 > 0.6 * budget_s:
            break
        for s in bench.shapes:
            evaluate(with_split(cfg, s), s)
    for cfg in ranked(list(bench.shapes))[:3]:
        for stages in (2, 4):
            if time.perf_counter() - t0 < 0.85 * budget_s:
                for s in bench.shapes:
                    evaluate(with_split(replace(cfg, num_stages=stages), s), s)
    for s in bench.shapes:
        for cfg in ranked([s])[:2]:
            for sk in SPLITS:
                for red in ("partials", "atomic") if sk > 1 else ("partials",):
                    if programs(replace(cfg, split_k=sk), s) <= 8 * sms:
                        evaluate(replace(cfg, split_k=sk, reduce=red), s)
    best = {}
    for r in records:
        if r["ok"] and r["ms"] < best.get(r["shape"], {}).get("ms", float("inf")):
            best[r["shape"]] = r
    return best, records


def label(cfg) -> str:
    return f"triton {cfg.block_n}x{cfg.block_k} split{cfg.split_k} {cfg.reduce}{' dot' if cfg.dot else ''}"


def check(device: str, shapes: dict, batches: list[int], triton_ok: bool) -> bool:
    """Every torch variant (and a few Triton configs when triton_ok) against x.float() @ W.float().T."""
    ok = True
    cfgs = [
        gt.GemvConfig(16, 32), gt.GemvConfig(16, 32, split_k=2), gt.GemvConfig(32, 16, split_k=2, reduce="atomic"),
        gt.GemvConfig(16, 32, dot=True), gt.GemvConfig(16, 32, split_k=4, reduce="atomic", dot=True),
    ] if triton_ok else []  # fmt: skip
    for b in batches:
        for s, (n, k) in shapes.items():
            w = torch.randn(n, k, dtype=torch.bfloat16, device=device).mul_(0.02)  # (N, K)
            x = torch.randn(b, k, dtype=torch.bfloat16, device=device)  # (B, K)
            ref = x.float() @ w.float().T  # (B, N)
            errs = {name: rel_err(fn(x, w), ref) for name, fn in torch_variants(device == "cuda").items()}
            for cfg in cfgs:
                # Triton's interpreter gets tl.dot on bf16 wrong (the bits are multiplied as ints): use fp16 there
                dt = torch.float16 if cfg.dot and device == "cpu" else torch.bfloat16
                xd, w_neg = x.to(dt), w.to(dt).neg()  # (B, K), (N, K)
                plan = gt.GemvPlan(b, n, k, cfg, torch.device(device))
                out = torch.empty(b, n, dtype=dt, device=device)  # (B, N)
                plan(xd, w_neg.neg(), out)
                plan(xd, w_neg, out)  # the atomic path must have zeroed its buffer again after the first call
                errs[label(cfg)] = rel_err(out, -ref)
            bad = [name for name, e in errs.items() if e > TOL]
            ok &= not bad
            worst = max(errs.values())
            print(f"check B={b} {s:8s} N={n:5d} K={k:4d}: {len(errs)} variants, max rel err {worst:.1e}"
                  + (f" WRONG: {bad}" if bad else ""))  # fmt: skip
    return ok


def run_batch(bench: Bench, args, sms: int) -> tuple[dict, dict, dict]:
    """(results per variant, best Triton config per shape, sweep record) at the bench's current batch."""
    calls = {
        name: (lambda s, i, fn=fn: fn(bench.x[s], bench.w[s][i]))
        for name, fn in torch_variants(bench.device == "cuda").items()
    }
    per = {name: bench.measure(call) for name, call in calls.items()}
    best, sweep_rec = {}, {}
    if gt is not None:
        t0 = time.perf_counter()
        best, records = sweep(bench, args.sweep_seconds, args.sweep_reps, sms)
        sweep_rec = {"seconds": time.perf_counter() - t0, "records": records}
        tried = {tuple(r["config"][key] for key in ("block_n", "block_k", "num_warps", "dot")) for r in records}
        print(f"B={bench.b}: Triton sweep: {len(tried)} of {len(tiles(bench.b))} tiles, {len(records)} (config, shape)"
              f" timings in {sweep_rec['seconds']:.1f} s")  # fmt: skip
        if len(best) == len(bench.shapes):
            cfgs = {s: gt.GemvConfig(**r["config"]) for s, r in best.items()}
            plans = {s: gt.GemvPlan(bench.b, *bench.shapes[s], c, torch.device(bench.device)) for s, c in cfgs.items()}
            calls["triton"] = tvariant(bench, plans)
            per["triton"] = bench.measure(calls["triton"])
    good = [name for name, r in per.items() if r["ok"]]  # per shape, "mixed" runs the fastest correct variant
    choice = {s: min(good, key=lambda name: per[name]["shape_ms"][s]) for s in bench.shapes}
    per["mixed"] = bench.measure(lambda s, i: calls[choice[s]](s, i)) | {"choice": choice}
    for name, r in per.items():
        r["vs_linear"] = per["linear"]["step_ms"] / r["step_ms"]
        shapes = " ".join(f"{s} {ms:.3f}" for s, ms in r["shape_ms"].items())
        print(f"B={bench.b} {name:16s} step {r['step_ms']:.3f} ms {r['tbps']:.2f} TB/s x{r['vs_linear']:.2f} | {shapes}"
              f" | max rel err {max(r['rel_err'].values()):.1e}{'' if r['ok'] else ' WRONG: not used'}")  # fmt: skip
    print(f"B={bench.b} mixed uses {choice}")
    return per, {s: {"config": r["config"], "sweep_ms": r["ms"]} for s, r in best.items()}, sweep_rec


def table(results: dict, batches: list[int]) -> None:
    print(f"\n{'step (ms, TB/s, x vs linear)':30s}" + "".join(f"{'B=' + str(b):>24s}" for b in batches))
    for name, per_b in results.items():
        cells = [per_b.get(str(b)) for b in batches]
        cells = [
            "-" if r is None else f"{r['step_ms']:.3f} {r['tbps']:.2f} x{r['vs_linear']:.2f}{'' if r['ok'] else ' BAD'}"
            for r in cells
        ]
        print(f"{name:30s}" + "".join(f"{c:>24s}" for c in cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default="bench/results/gemv_h100.json")
    p.add_argument("--reps", type=int, default=20, help="timed graph replays per measurement")
    p.add_argument("--sweep-reps", type=int, default=5, help="timed replays per config in the Triton sweep")
    p.add_argument("--sweep-seconds", type=float, default=12.0, help="Triton sweep budget per batch size")
    p.add_argument("--check", action="store_true", help="correctness only, then exit")
    args = p.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        interp = gt is not None and os.environ.get("TRITON_INTERPRET") == "1"
        print(f"no CUDA device: correctness only, tiny shapes on CPU (Triton {'interpreted' if interp else 'skipped'})")
        return 0 if check("cpu", TINY_SHAPES, [1, 3, 8], interp) else 1
    if args.check:
        return 0 if check("cuda", SHAPES, args.batches, gt is not None) else 1

    if gt is None:
        print("Triton is not importable here: torch variants only")
    bench = Bench(SHAPES, LAYERS, "cuda", args.reps)
    bw = copy_bandwidth(torch.device("cuda")) / 1e12  # TB/s
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    floor_ms = bench.step_bytes / bw / 1e9
    print(f"{torch.cuda.get_device_name()}, {sms} SMs: copy {bw:.2f} TB/s, step {bench.step_bytes / 1e9:.2f} GB")
    print(f"bandwidth floor of a step: {floor_ms:.3f} ms")
    results, best_cfgs, sweeps = {}, {}, {}
    for b in args.batches:
        bench.set_batch(b)
        per, best_cfgs[str(b)], sweeps[str(b)] = run_batch(bench, args, sms)
        for name, r in per.items():
            results.setdefault(name, {})[str(b)] = r
    table(results, args.batches)
    for b, cfgs in best_cfgs.items():
        print(f"Triton best B={b}: " + "; ".join(f"{s} {c['config']}" for s, c in cfgs.items()))
    out = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": gt.triton.__version__ if gt else None, "python": platform.python_version(),
        "copy_tbps": bw, "step_weight_bytes": bench.step_bytes, "floor_ms": floor_ms, "tolerance": TOL,
        "results": results, "triton_best": best_cfgs, "triton_sweep": sweeps,
        "elapsed_s": time.perf_counter() - t_start,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
