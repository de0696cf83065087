"""Paired serving comparison: speculative configurations against speculation off, alternately,
several times, in one process, one JSON.

    python -m bench.serve_compare --spec off=off --spec ngram=ngram --concurrency 16,32 \\
        --repeats 3 --prompt-set humaneval --prompt-set chat --num-prompts 256 --max-tokens 128 \\
        --out bench/results/serve_compare_h200.json

Single runs of ``bench.serve`` against one server vary between runs as much as speculation
changes throughput, so one pair of runs says little. Here every run starts a fresh
``python -m specserve serve --port P --speculative-config CONFIG`` (P = --port-base + run index,
so a slow-to-close server never answers for the next), waits until ``/v1/models`` answers 200,
sends the ``bench.serve`` workload in-process (its one warm-up request left out) with at most
CONCURRENCY requests in flight, scrapes ``/metrics``, and stops the server with SIGTERM.

Order (``--order alternate``): for each repeat r, for each concurrency, every spec in turn,
the spec list rotated left by r, so with two specs each goes first in alternate repeats::

    r0: c16 off ngram, c32 off ngram    r1: c16 ngram off, c32 ngram off    r2: as r0

(``--order fixed``: the given order every time.) Summary per concurrency, over repeats::

    tokens/s          output tokens / seconds of the run (bench.serve's output_throughput)
    ratio to off      spec tokens/s of repeat r / baseline tokens/s of the same repeat r (paired),
                      then their median and min; the baseline is the spec named --baseline
                      (default: off), and must be one of the --spec names (--baseline none: no ratios)

The JSON is rewritten after every run (``complete`` false until the last), so a run cut short
keeps what it measured. The ``/metrics`` figures include the warm-up request.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import serve
from bench.common import RESULTS_DIR, environment, save_json
from specserve.config import SpeculativeConfig
from specserve.errors import SpecserveError

ORDERS = ("alternate", "fixed")
KEPT_METRICS = ("specserve_engine_", "specserve_spec_decode_", "specserve_generation_tokens_total")
RESERVED_SERVER_ARGS = ("--port", "--host", "--speculative-config", "--api-key")  # the driver sets or needs these
SPEC_NAME = re.compile(r"[A-Za-z0-9_.-]+")
STOP_TIMEOUT_S = 90.0  # SIGTERM to exit; the server's own drain is --shutdown-timeout (30 s)


@dataclass(frozen=True)
class Spec:
    """One arm of the comparison: a name for tables, and what ``--speculative-config`` gets."""

    name: str
    config: str


@dataclass(frozen=True)
class Slot:
    """One run of the plan. ``order_index``: its place among the specs of the same
    (repeat, concurrency), 0 = ran first; ``run_index``: its place in the whole plan."""

    run_index: int
    repeat: int
    concurrency: int
    spec: str
    order_index: int


@dataclass(frozen=True)
class ComparePlan:
    """What is compared and how often. Spec names are unique; the baseline, when not None, is one
    of them; concurrencies are unique and at least 1; repeats at least 1."""

    specs: tuple[Spec, ...]
    concurrencies: tuple[int, ...]
    repeats: int = 3
    order: str = "alternate"
    baseline: str | None = "off"

    def __post_init__(self) -> None:
        names = [s.name for s in self.specs]
        if not names:
            raise ValueError("give at least one --spec NAME=CONFIG, e.g. --spec off=off --spec ngram=ngram")
        if len(set(names)) != len(names):
            raise ValueError(f"--spec names must differ, got {', '.join(names)}: rename one")
        if not self.concurrencies or any(c < 1 for c in self.concurrencies):
            raise ValueError("--concurrency needs requests-in-flight counts of at least 1, e.g. 16,32")
        if len(set(self.concurrencies)) != len(self.concurrencies):
            raise ValueError("--concurrency lists a count twice: give each once")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be at least 1, not {self.repeats}")
        if self.order not in ORDERS:
            raise ValueError(f"--order must be one of {', '.join(ORDERS)}, not {self.order!r}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"the baseline {self.baseline!r} is not a --spec name ({', '.join(names)}): "
                             f"add --spec {self.baseline}=off, pass --baseline NAME, or --baseline none")

    @property
    def spec_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def spec(self, name: str) -> Spec:
        return next(s for s in self.specs if s.name == name)


def run_order(plan: ComparePlan) -> list[Slot]:
    """Every run, in the order it runs: repeat, then concurrency, then spec (rotated by the repeat
    under ``alternate``)."""
    names = plan.spec_names
    slots = []
    for repeat in range(plan.repeats):
        shift = repeat % len(names) if plan.order == "alternate" else 0
        turn = names[shift:] + names[:shift]
        for concurrency in plan.concurrencies:
            for order_index, name in enumerate(turn):
                slots.append(Slot(len(slots), repeat, concurrency, name, order_index))
    return slots


def paired_summary(runs: list[dict[str, Any]], plan: ComparePlan) -> dict[str, Any]:
    """Per concurrency: each spec's tokens/s per repeat (None: not run yet) with median, min, max,
    and (``ratio_to_baseline``; empty without a baseline) each other spec's ratios to the
    baseline's tokens/s of the same repeat, with their median and min.
    ``runs`` need ``spec``, ``concurrency``, ``repeat``, ``output_throughput``, ``num_failed``."""
    summary: dict[str, Any] = {}
    for concurrency in plan.concurrencies:
        by_spec = {name: [None] * plan.repeats for name in plan.spec_names}
        failed = dict.fromkeys(plan.spec_names, 0)
        for run in runs:
            if run["concurrency"] == concurrency:
                by_spec[run["spec"]][run["repeat"]] = run["output_throughput"]
                failed[run["spec"]] += run["num_failed"]
        throughput = {}
        for name, per_repeat in by_spec.items():
            done = [x for x in per_repeat if x is not None]
            throughput[name] = {"per_repeat": per_repeat, "num_failed_requests": failed[name],
                                "median": statistics.median(done) if done else None,
                                "min": min(done) if done else None, "max": max(done) if done else None}
        ratios = {}
        if plan.baseline is not None:
            base = by_spec[plan.baseline]
            for name in plan.spec_names:
                if name == plan.baseline:
                    continue
                per_repeat = [None if x is None or b is None or b == 0 else x / b for x, b in zip(by_spec[name], base)]
                done = [r for r in per_repeat if r is not None]
                ratios[name] = {"per_repeat": per_repeat, "median": statistics.median(done) if done else None,
                                "min": min(done) if done else None}
        summary[str(concurrency)] = {"tokens_per_s": throughput, "ratio_to_baseline": ratios}
    return summary


def kept_metrics(text: str) -> dict[str, float]:
    """The ``specserve_engine_*``, ``specserve_spec_decode_*`` and generated-token series of a
    Prometheus text page, ``name{labels}`` -> value."""
    kept = {}
    for line in text.splitlines():
        if not line.startswith(KEPT_METRICS) or "_created" in line.split("{", 1)[0]:
            continue
        series, _, value = line.rpartition(" ")
        try:
            kept[series] = float(value)
        except ValueError:
            continue
    return kept


# ---- one run: a fresh server, the load, the metrics ------------------------------------------


class Server:
    """One ``python -m specserve serve`` child on 127.0.0.1:``port``, its output in ``log_path``."""

    def __init__(self, spec: Spec, port: int, server_args: list[str], log_path: Path) -> None:
        with socket.socket() as sock:  # something else answering on the port would be measured instead
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is fine
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                raise SystemExit(f"port {port} is in use: pass a --port-base with free ports above it") from None
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.command = [sys.executable, "-m", "specserve", "serve", "--port", str(port),
                        "--speculative-config", spec.config, *server_args]
        self.start_s = time.perf_counter()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        self.wall_s: float | None = None

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def fail(self, reason: str) -> SystemExit:
        self.stop()
        return SystemExit(f"{reason} ({shlex.join(self.command)}); the server's log {self.log_path} ends:\n"
                          f"{self.log_tail()}")

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ``/v1/models`` answered 200."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise self.fail(f"the server exited with status {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(self.base_url + "/v1/models", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - self.start_s
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while loading
            if time.monotonic() > deadline:
                raise self.fail(f"the server did not answer /v1/models within {timeout_s:g} s: raise --startup-timeout")
            time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=30) as response:
            return kept_metrics(response.read().decode())

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.wall_s is None:
            self.wall_s = time.perf_counter() - self.start_s
        return self.proc.returncode


def bench_argv(args: argparse.Namespace, base_url: str, concurrency: int) -> list[str]:
    """bench.serve's command line for one run: the workload options passed through."""
    argv = ["--base-url", base_url, "--max-concurrency", str(concurrency), "--num-prompts", str(args.num_prompts),
            "--max-tokens", str(args.max_tokens), "--request-rate", args.request_rate,
            "--burstiness", str(args.burstiness), "--seed", str(args.seed), "--spec-stats", "--no-progress"]
    for prompt_set in args.prompt_set:
        argv += ["--prompt-set", prompt_set]
    if args.stop_at_eos:
        argv.append("--stop-at-eos")
    return argv


def run_one(args: argparse.Namespace, plan: ComparePlan, slot: Slot, log_dir: Path) -> dict[str, Any]:
    """Start a server for ``slot``, load it, scrape it, stop it; the run's record."""
    spec = plan.spec(slot.spec)
    log_path = log_dir / f"run{slot.run_index:02d}_r{slot.repeat}_c{slot.concurrency}_{spec.name}.log"
    server = Server(spec, args.port_base + slot.run_index, shlex.split(args.server_args), log_path)
    try:
        startup_s = server.wait_ready(args.startup_timeout)
        bench_args = serve.parse_args(bench_argv(args, server.base_url, slot.concurrency))
        try:
            result = asyncio.run(asyncio.wait_for(serve.run(bench_args), args.timeout_per_run))
        except TimeoutError:
            raise server.fail(f"the load did not finish within --timeout-per-run {args.timeout_per_run:g} s") from None
        except SystemExit as exc:  # bench.serve's one-sentence failures (a failed warm-up request)
            raise server.fail(str(exc)) from None
        except Exception as exc:  # the server died under load, a broken stream: point at its log
            raise server.fail(f"the load failed: {type(exc).__name__}: {exc}") from exc
        try:
            metrics = server.metrics()
        except Exception as exc:
            raise server.fail(f"reading /metrics failed: {type(exc).__name__}: {exc}") from exc
    finally:
        exit_code = server.stop()
    (bench_run,) = result["runs"]
    s = bench_run["summary"]

    def p50_p90(figures: dict | None) -> dict | None:
        return None if figures is None else {"p50": figures["p50"], "p90": figures["p90"]}

    return asdict(slot) | {
        "speculative_config": spec.config,
        "output_throughput": s["output_throughput"],
        "request_throughput": s["request_throughput"],
        "num_completed": s["num_completed"], "num_failed": s["num_failed"], "failures": s["failures"],
        "max_in_flight": s["max_in_flight"], "duration_s": s["duration_s"],
        "num_output_tokens": s["num_output_tokens"], "num_prompt_tokens": s["num_prompt_tokens"],
        "ttft_ms": p50_p90(s["ttft_ms"]), "tpot_ms": p50_p90(s["tpot_ms"]), "itl_ms": p50_p90(s["itl_ms"]),
        "mean_accepted_length": s["mean_accepted_length"], "acceptance_per_depth": s["acceptance_per_depth"],
        "metrics": metrics,
        "server": {"startup_s": startup_s, "wall_s": server.wall_s, "exit_code": exit_code,
                   "command": shlex.join(server.command)},
        "bench_command": result["command"], "served_model": result["config"]["served_model"],
    }


# ---- the whole comparison -------------------------------------------------------------------


def payload(args: argparse.Namespace, plan: ComparePlan, runs: list[dict], complete: bool) -> dict[str, Any]:
    return {
        "benchmark": "serve_compare",
        "description": "fresh specserve servers per run, speculative configs alternated with the baseline, "
                       "bench.serve load in-process; summary paired by repeat",
        "definitions": "see the docstrings of bench/serve_compare.py, bench/serve.py and bench/metrics.py",
        "command": shlex.join(["python", "-m", "bench.serve_compare", *args.argv]),
        "complete": complete,
        "config": {"specs": {s.name: s.config for s in plan.specs}, "concurrencies": list(plan.concurrencies),
                   "repeats": plan.repeats, "order": plan.order, "baseline": plan.baseline,
                   "prompt_set": args.prompt_set, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                   "request_rate": args.request_rate, "burstiness": args.burstiness, "seed": args.seed,
                   "stop_at_eos": args.stop_at_eos, "server_args": args.server_args, "port_base": args.port_base},
        "environment": environment() | {"note": "the client's machine, also the servers' (started locally)"},
        "runs": runs,
        "summary": paired_summary(runs, plan),
    }


def print_table(result: dict[str, Any], plan: ComparePlan) -> None:
    def num(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    print(f"\n{'conc':>5} {'spec':<12}{'tok/s med':>10}{'min':>9}{'max':>9}{'fail':>5}  "
          f"{'x ' + str(plan.baseline) + ' med':>10}{'min':>7}  per repeat")
    for concurrency, entry in result["summary"].items():
        ratios = entry["ratio_to_baseline"]
        for name, t in entry["tokens_per_s"].items():
            r = ratios.get(name)
            per_repeat = r["per_repeat"] if r else t["per_repeat"]
            print(f"{concurrency:>5} {name:<12}{num(t['median'], '.1f'):>10}{num(t['min'], '.1f'):>9}"
                  f"{num(t['max'], '.1f'):>9}{t['num_failed_requests']:>5}  "
                  f"{num(r and r['median'], '.3f'):>10}{num(r and r['min'], '.3f'):>7}  "
                  + " ".join(num(x, '.3f' if r else '.1f') for x in per_repeat))
    print(f"(tok/s: output tokens per second; x {plan.baseline}: paired by repeat; per repeat: ratios, "
          f"or tok/s for the baseline)")


def parse_spec(text: str) -> Spec:
    name, sep, config = text.partition("=")
    if not sep or not SPEC_NAME.fullmatch(name) or not config.strip():
        raise argparse.ArgumentTypeError(f"bad --spec {text!r}: write NAME=CONFIG, e.g. off=off, ngram=ngram or "
                                         "'tree16={\"method\": \"ngram\", \"max_tree_tokens\": 16}'")
    try:
        SpeculativeConfig.parse(config)
    except SpecserveError as exc:
        raise argparse.ArgumentTypeError(f"bad --spec {name}: {exc}") from None
    return Spec(name, config)


def parse_concurrencies(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --concurrency {text!r}: write whole numbers, comma-separated") from None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ComparePlan]:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_compare", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=parse_spec, action="append", default=[], metavar="NAME=CONFIG",
                        help="a --speculative-config to serve, under a name (repeatable)")
    parser.add_argument("--concurrency", type=parse_concurrencies, default=(16, 32), help="requests in flight, e.g. 16,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--order", choices=ORDERS, default="alternate")
    parser.add_argument("--baseline", default="off", help="the spec name ratios divide by ('none': no ratios)")
    parser.add_argument("--prompt-set", action="append", default=None, help="as bench.serve (repeatable; default: chat)")
    parser.add_argument("--num-prompts", type=int, default=256, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--request-rate", default="inf", help="requests per second of every run (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-at-eos", action="store_true")
    parser.add_argument("--server-args", default="", help="more arguments for specserve serve, e.g. '--dtype float32 --max-num-seqs 32' "
                             "(one argument alone: --server-args=--enforce-eager)")
    parser.add_argument("--port-base", type=int, default=8100, help="run i serves on port PORT_BASE + i")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds for a server to answer /v1/models")
    parser.add_argument("--timeout-per-run", type=float, default=1800, help="seconds for one run's load")
    parser.add_argument("--log-dir", default=None, help="server logs (default: a new temporary folder)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "serve_compare_local.json"))
    args = parser.parse_args(argv)
    args.prompt_set = args.prompt_set or ["chat"]
    try:
        plan = ComparePlan(tuple(args.spec), args.concurrency, args.repeats, args.order,
                           None if args.baseline == "none" else args.baseline)
    except ValueError as exc:
        parser.error(str(exc))
    reserved = [a for a in shlex.split(args.server_args) if a.split("=", 1)[0] in RESERVED_SERVER_ARGS]
    if reserved:
        parser.error(f"--server-args must not set {', '.join(reserved)}: the driver chooses ports and configs, "
                     "and talks to its servers without a key")
    try:
        num_rates = len(serve.parse_rates(args.request_rate))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if num_rates != 1:
        parser.error("--request-rate takes one rate here: run the comparison once per rate")
    last_port = args.port_base + len(plan.concurrencies) * plan.repeats * len(plan.specs) - 1
    if args.port_base < 1024 or last_port > 65535:
        parser.error(f"--port-base {args.port_base} gives ports up to {last_port}: use one in 1024..65535 "
                     "with room for one port per run")
    if args.num_prompts < 1 or args.max_tokens < 1 or args.burstiness <= 0:
        parser.error("--num-prompts and --max-tokens must be at least 1, --burstiness positive")
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args, plan


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, plan = parse_args(argv)
    slots = run_order(plan)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="serve_compare_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(slots)} runs; server logs in {log_dir}", flush=True)
    runs: list[dict] = []
    for slot in slots:
        runs.append(run_one(args, plan, slot, log_dir))
        run = runs[-1]
        save_json("serve_compare", payload(args, plan, runs, complete=False), args.out)
        print(f"[{slot.run_index + 1}/{len(slots)}] repeat {slot.repeat} c{slot.concurrency} {slot.spec}: "
              f"{run['output_throughput']:.1f} tok/s, {run['num_failed']} failed, "
              f"acc.len {'-' if run['mean_accepted_length'] is None else format(run['mean_accepted_length'], '.2f')}, "
              f"startup {run['server']['startup_s']:.1f} s, load {run['duration_s']:.1f} s", flush=True)
    result = payload(args, plan, runs, complete=True)
    path = save_json("serve_compare", result, args.out)
    print_table(result, plan)
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
