"""When is a CUDA graph's external event-wait node bound to a record: at launch or at execution?

A captured graph sleeps about 30 ms, waits on an external event E, then adds. Before each launch
E is recorded after a sleep twice as long on another stream (record A); right after the launch
E is recorded again on an idle stream (record B, complete at once). A graph that finishes before
record A completes waited for a record made after its launch. (The printed ns/cycle comes from
a first sleep that includes CUDA's start-up and overstates it; only the ratio of the two sleeps
matters.) Why ``offload.offloaded_model`` waits for its prefetch before a replay, not inside it.

    python3 -m bench.graph_event_wait        # CUDA only
"""

from __future__ import annotations

import time

import torch


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench.graph_event_wait needs a CUDA device")
    other, idle = torch.cuda.Stream(), torch.cuda.Stream()
    event = torch.cuda.Event(external=True)
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(100_000_000)
    torch.cuda.synchronize()
    per_cycle = (time.perf_counter() - start) / 1e8
    print(f"sleep: {per_cycle * 1e9:.3f} ns/cycle")
    cycles = int(0.05 / per_cycle)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.cuda._sleep(cycles)
        torch.cuda.current_stream().wait_event(event)
        x.add_(1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    graph.replay()  # E's last record is complete: the graph's own time
    torch.cuda.synchronize()
    alone = time.perf_counter() - start
    print(f"graph alone: {alone * 1e3:.1f} ms; record A completes after about {2 * alone * 1e3:.0f} ms")
    for trial in range(3):
        torch.cuda.synchronize()
        with torch.cuda.stream(other):
            torch.cuda._sleep(2 * cycles)
            event.record(other)  # record A
        start = time.perf_counter()
        graph.replay()
        with torch.cuda.stream(idle):
            event.record(idle)  # record B
        torch.cuda.current_stream().synchronize()
        seconds = time.perf_counter() - start
        verdict = "LAUNCH (waited for record A)" if seconds > 1.5 * alone else "EXECUTION (record B)"
        print(f"trial {trial}: graph done after {seconds * 1e3:.1f} ms -> bound at {verdict}")


if __name__ == "__main__":
    main()
