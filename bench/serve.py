"""Load generator for an OpenAI-compatible server (``specserve serve``, vLLM, ...): streamed
requests at Poisson arrival rates, per-request TTFT / TPOT / ITL / end-to-end latency.

    specserve serve --speculative-config ngram --port 8011 &
    python -m bench.serve --base-url http://127.0.0.1:8011 --wait-ready 120 \\
        --prompt-set humaneval --num-prompts 32 --max-tokens 128 --request-rate 1,4,16 \\
        --goodput ttft:500 tpot:50 --spec-stats --tag h100

Every rate in --request-rate sends --num-prompts requests (prompts taken in order, continuing
across rates so a later rate does not hit prompts an earlier one already cached): gaps between
sends are gamma-distributed with mean 1/rate (rate inf: all at once) and shape --burstiness
(1: Poisson), at most --max-concurrency in flight. One warm-up request goes first and is left
out. Figures per request, from the client's clock (``bench.metrics.stream_figures``):

    TTFT   first chunk carrying text - send
    TPOT   (E2E - TTFT) / (n - 1), n = completion_tokens of the usage chunk
    ITL    gaps between consecutive chunks carrying text (with speculation a chunk can carry
           several tokens, so mean ITL can exceed TPOT there)
    E2E    [DONE] received - send

Requests answered with a status other than 200 (or broken streams) count as failed, apart.
Writes ``<out-dir>/serve_<tag>.json`` (config, client environment, every request's figures)
and ``serve_<tag>_latency_vs_rate.png``, and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import RESULTS_DIR, environment, save_json
from bench.metrics import (
    Acceptance,
    arrival_offsets,
    goodput,
    meets_slos,
    parse_slos,
    stream_figures,
    summary_or_none,
    throughput,
)
from bench.prompt_sets import RANDOM_MAX_ID, WARMUP_TEXT, PromptSet, load_prompt_set

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a nicety
    tqdm = None


@dataclass
class RequestResult:
    index: int
    prompt_set: str
    prompt_index: int
    send_s: float  # seconds after the run started
    end_s: float | None = None  # the answer (or failure) was complete, seconds after the run started
    ok: bool = False
    status: int | None = None  # HTTP status; None: no answer (connection error, timeout)
    error: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_times_s: list[float] = field(default_factory=list)  # text-carrying chunks, after send
    num_prompt_tokens: int | None = None
    num_tokens: int | None = None
    num_tokens_from_usage: bool = False
    spec_stats: dict | None = None


def request_body(args: argparse.Namespace, model: str, endpoint: str, prompt: str | tuple[int, ...],
                 seed: int, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": args.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt if isinstance(prompt, str) else list(prompt)
    if not args.stop_at_eos:
        body["ignore_eos"] = True  # a vLLM/specserve extension: every request makes max_tokens
    if args.temperature > 0:
        body["seed"] = seed
    if args.spec_stats:
        body["return_spec_stats"] = True  # specserve's vendor field: acceptance of the request
    return body


async def send_request(session: aiohttp.ClientSession, url: str, body: dict, endpoint: str,
                       result: RequestResult, headers: dict[str, str]) -> RequestResult:
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:500]
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                now = time.perf_counter()
                data = line[5:].strip()
                if data == b"[DONE]":
                    result.e2e_s = now - start
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = json.dumps(chunk["error"])[:500]
                    return result
                if chunk.get("usage"):
                    result.num_prompt_tokens = chunk["usage"].get("prompt_tokens")
                    result.num_tokens = chunk["usage"].get("completion_tokens")
                    result.num_tokens_from_usage = result.num_tokens is not None
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") if endpoint == "completions" else (choice.get("delta") or {}).get("content")
                    if text:
                        result.chunk_times_s.append(now - start)
                    if choice.get("spec_stats"):
                        result.spec_stats = choice["spec_stats"]
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:500]
        return result
    if result.e2e_s is None:
        result.error = "the stream ended without [DONE]"
        return result
    if not result.num_tokens_from_usage:  # no usage chunk: count text chunks (a lower bound)
        result.num_tokens = len(result.chunk_times_s)
    result.ok = True
    result.ttft_s, result.tpot_s, result.itl_s = stream_figures(result.chunk_times_s, result.e2e_s, result.num_tokens)
    return result


def rate_summary(results: list[RequestResult], duration_s: float, slos: dict[str, float],
                 max_in_flight: int) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.num_tokens or 0 for r in done)
    prompt_tokens = sum(r.num_prompt_tokens or 0 for r in done)
    acceptance = None
    stats = [r.spec_stats for r in done if r.spec_stats]
    if stats:
        acceptance = sum((Acceptance(s["num_steps"], s["num_accepted_tokens"], tuple(s["accepted_per_depth"]))
                          for s in stats), Acceptance())
    summary = {
        "num_requests": len(results),
        "num_completed": len(done),
        "num_failed": len(results) - len(done),
        "failures": dict(Counter(str(r.status) if r.status is not None else "no answer" for r in results if not r.ok)),
        "duration_s": duration_s,
        "max_in_flight": max_in_flight,
        "request_throughput": throughput(len(done), duration_s),
        "output_throughput": throughput(output_tokens, duration_s),
        "total_token_throughput": throughput(output_tokens + prompt_tokens, duration_s),
        "num_output_tokens": output_tokens,
        "num_prompt_tokens": prompt_tokens,
        "ttft_ms": summary_or_none([r.ttft_s for r in done], 1000),
        "tpot_ms": summary_or_none([r.tpot_s for r in done], 1000),
        "itl_ms": summary_or_none([x for r in done for x in r.itl_s], 1000),
        "e2e_ms": summary_or_none([r.e2e_s for r in done], 1000),
        "mean_accepted_length": None if acceptance is None else acceptance.mean_accepted_length,
        "acceptance_per_depth": None if acceptance is None else acceptance.rate_per_depth,
    }
    if slos:
        figures = [(r.ttft_s, r.tpot_s, r.e2e_s) for r in done]
        summary["slos_ms"] = slos
        summary["goodput"] = goodput(slos, figures, duration_s)
        summary["num_good"] = sum(meets_slos(slos, *f) for f in figures)
    return summary


async def run_rate(args: argparse.Namespace, session: aiohttp.ClientSession, model: str, work: list[tuple],
                   rate: float, rate_index: int, slos: dict[str, float], headers: dict[str, str]) -> dict[str, Any]:
    """Send ``work`` ((set, endpoint, prompt index, prompt)) at ``rate``; every request's figures."""
    offsets = arrival_offsets(len(work), rate, args.burstiness, random.Random(args.seed * 1000 + rate_index))
    semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    bar = tqdm(total=len(work), desc=f"rate {rate:g}", disable=args.no_progress, file=sys.stderr) if tqdm else None
    in_flight = max_in_flight = 0
    start = time.perf_counter()

    async def one(i: int, item: tuple) -> RequestResult:
        nonlocal in_flight, max_in_flight
        prompt_set, endpoint, prompt_index, prompt = item
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        if semaphore is not None:
            await semaphore.acquire()
        try:
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
            result = RequestResult(i, prompt_set, prompt_index, send_s=time.perf_counter() - start)
            body = request_body(args, model, endpoint, prompt, args.seed + prompt_index, args.max_tokens)
            await send_request(session, endpoint_url(args.base_url, endpoint), body, endpoint, result, headers)
            result.end_s = time.perf_counter() - start
            return result
        finally:
            in_flight -= 1
            if semaphore is not None:
                semaphore.release()
            if bar is not None:
                bar.update(1)

    results = await asyncio.gather(*(one(i, item) for i, item in enumerate(work)))
    if bar is not None:
        bar.close()
    duration = max(r.end_s for r in results)
    return {"request_rate": "inf" if math.isinf(rate) else rate, "burstiness": args.burstiness,
            "summary": rate_summary(list(results), duration, slos, max_in_flight),
            "requests": [asdict(r) for r in results]}


def endpoint_url(base_url: str, endpoint: str) -> str:
    return base_url.rstrip("/") + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")


def choose_endpoint(args: argparse.Namespace, prompt_set: PromptSet) -> str:
    """auto: chat-template sets to /v1/chat/completions, raw text and token ids to /v1/completions."""
    if args.endpoint == "auto":
        return "chat" if prompt_set.chat_template and not prompt_set.is_token_ids else "completions"
    if args.endpoint == "chat" and prompt_set.is_token_ids:
        raise SystemExit(f"prompt set {prompt_set.name} is token ids: use --endpoint completions (or auto)")
    return args.endpoint


def work_items(sets: list[PromptSet], endpoints: list[str]) -> list[tuple]:
    """All prompts, the sets interleaved (set 0 prompt 0, set 1 prompt 0, ...)."""
    items = []
    for i in range(max(len(s.prompts) for s in sets)):
        for prompt_set, endpoint in zip(sets, endpoints):
            if i < len(prompt_set.prompts):
                items.append((prompt_set.name, endpoint, i, prompt_set.prompts[i]))
    return items


async def wait_ready(session: aiohttp.ClientSession, base_url: str, timeout_s: float, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for path in ("/health", "/v1/models"):
            try:
                async with session.get(base_url.rstrip("/") + path, headers=headers) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{base_url} did not answer /health or /v1/models with 200 within {timeout_s:g} s")
        await asyncio.sleep(0.5)


async def served_model(session: aiohttp.ClientSession, base_url: str, headers: dict[str, str]) -> str:
    async with session.get(base_url.rstrip("/") + "/v1/models", headers=headers) as response:
        if response.status != 200:
            raise SystemExit(f"GET /v1/models answered {response.status}: pass --model NAME")
        return (await response.json())["data"][0]["id"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    slos = parse_slos(args.goodput)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    needed = args.num_prompts * len(args.request_rate)
    sets = [load_prompt_set(s, needed, files_chat_template=args.files_chat_template, seed=args.seed,
                            random_max_id=args.random_max_id) for s in args.prompt_set]
    endpoints = [choose_endpoint(args, s) for s in sets]
    items = work_items(sets, endpoints)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=args.request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.wait_ready:
            await wait_ready(session, args.base_url, args.wait_ready, headers)
        model = args.model or await served_model(session, args.base_url, headers)
        for _ in range(args.warmup_requests):  # compiles kernels, fills allocators; left out
            warm = RequestResult(-1, "warm-up", -1, 0.0)
            endpoint = endpoints[0]
            await send_request(session, endpoint_url(args.base_url, endpoint),
                               request_body(args, model, endpoint, WARMUP_TEXT, args.seed, args.warmup_tokens),
                               endpoint, warm, headers)
            if not warm.ok:
                raise SystemExit(f"the warm-up request failed ({warm.status}): {warm.error}")
        runs = []
        for k, rate in enumerate(args.request_rate):
            work = [items[(k * args.num_prompts + i) % len(items)] for i in range(args.num_prompts)]
            runs.append(await run_rate(args, session, model, work, rate, k, slos, headers))
    config = vars(args) | {"request_rate": ["inf" if math.isinf(r) else r for r in args.request_rate],
                           "served_model": model, "endpoints": dict(zip([s.name for s in sets], endpoints))}
    config.pop("api_key")
    return {
        "benchmark": "serve",
        "description": "streamed requests at gamma/Poisson arrival rates against an OpenAI-compatible server; "
                       "figures from the client's clock; warm-up excluded",
        "definitions": "see the docstrings of bench/serve.py and bench/metrics.py",
        "command": shlex.join(["python", "-m", "bench.serve", *args.argv]),
        "config": config,
        "environment": environment() | {"note": "the client's machine (the same as the server's when run locally)"},
        "runs": runs,
    }


def print_table(result: dict[str, Any]) -> None:
    def cell(summary: dict | None, stat: str) -> str:
        return "-" if not summary else f"{summary[stat]:.1f}"

    print(f"\n{'rate':>6}{'ok':>5}{'fail':>5}{'req/s':>7}{'tok/s':>8}{'TTFT':>8}{'p90':>8}{'TPOT':>7}{'p90':>7}"
          f"{'ITL':>7}{'p90':>7}{'E2E':>8}{'p90':>8}{'good/s':>7}{'acc.len':>8}")
    for run_ in result["runs"]:
        s = run_["summary"]
        rate = run_["request_rate"]
        good = s.get("goodput")
        print(f"{rate if rate == 'inf' else format(rate, 'g'):>6}{s['num_completed']:>5}{s['num_failed']:>5}"
              f"{s['request_throughput'] or 0:>7.2f}{s['output_throughput'] or 0:>8.1f}"
              f"{cell(s['ttft_ms'], 'mean'):>8}{cell(s['ttft_ms'], 'p90'):>8}{cell(s['tpot_ms'], 'mean'):>7}"
              f"{cell(s['tpot_ms'], 'p90'):>7}{cell(s['itl_ms'], 'mean'):>7}{cell(s['itl_ms'], 'p90'):>7}"
              f"{cell(s['e2e_ms'], 'mean'):>8}{cell(s['e2e_ms'], 'p90'):>8}"
              f"{'-' if good is None else format(good, '.2f'):>7}"
              f"{'-' if s['mean_accepted_length'] is None else format(s['mean_accepted_length'], '.2f'):>8}")
    print("(latencies in ms; tok/s: output tokens per second; good/s: goodput)")


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line with the value of --api-key replaced, fit to be saved beside results."""
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("REDACTED")
        elif arg.startswith("--api-key="):
            out.append("--api-key=REDACTED")
        else:
            out.append(arg)
        hide_next = arg == "--api-key"
    return out


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --request-rate {text!r}: write numbers (req/s) or inf, comma-separated") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("--request-rate needs positive rates (inf: all at once)")
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # no abbreviations: see redacted_argv
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    parser.add_argument("--endpoint", default="auto", choices=["auto", "completions", "chat"],
                        help="auto: chat-template sets to chat, raw and token-id sets to completions")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--prompt-set", action="append", default=None,
                        help="humaneval, chat, random:LEN, alphabet:LEN or a JSONL file (repeatable, interleaved; default: chat)")
    template = parser.add_mutually_exclusive_group()
    template.add_argument("--chat-template", dest="files_chat_template", action="store_true", default=True,
                          help="JSONL files: chat endpoint / chat template (default)")
    template.add_argument("--raw", dest="files_chat_template", action="store_false", help="JSONL files: raw completions")
    parser.add_argument("--random-max-id", type=int, default=RANDOM_MAX_ID, help="random sets: token ids below this")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per rate")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--request-rate", type=parse_rates, default=[math.inf],
                        help="requests per second, comma-separated for several runs (inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="arrival times; sampled requests send seed + prompt index")
    parser.add_argument("--stop-at-eos", action="store_true", help="do not send ignore_eos (default: every request makes --max-tokens)")
    parser.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                        help="SLOs for goodput, e.g. ttft:500 tpot:50 e2e:10000")
    parser.add_argument("--spec-stats", action="store_true", help="ask specserve for per-request acceptance (return_spec_stats)")
    parser.add_argument("--warmup-requests", type=int, default=1)
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--wait-ready", type=float, default=0, metavar="S", help="first wait up to S s for the server")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds without a byte before a request fails")
    parser.add_argument("--label", default=None, help="what is being served, for the plot title (e.g. 'specserve ngram')")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    parser.add_argument("--tag", default="local", help="file name tag: serve_<tag>.json")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.max_tokens < 1 or args.burstiness <= 0:
        parser.error("--num-prompts and --max-tokens must be at least 1, --burstiness positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        parser.error("--max-concurrency must be at least 1")
    try:
        parse_slos(args.goodput)
    except ValueError as exc:
        parser.error(str(exc))
    args.prompt_set = args.prompt_set or ["chat"]
    args.argv = redacted_argv(list(argv if argv is not None else sys.argv[1:]))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    out_dir = Path(args.out_dir)
    path = save_json(f"serve_{args.tag}", result, out_dir / f"serve_{args.tag}.json")
    print_table(result)
    print(f"-> {path}")
    if not args.no_plots:
        from bench.plots import plot_result

        for png in plot_result(result, out_dir / f"serve_{args.tag}"):
            print(f"-> {png}")
    return result


if __name__ == "__main__":
    main()
