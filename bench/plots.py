"""PNG plots of ``bench.latency`` and ``bench.serve`` results, drawn from their JSON alone.

    python -m bench.plots bench/results/latency_h100.json     # redraw (e.g. after a GPU run
                                                               # on a machine without matplotlib)

latency: ``<stem>_token_latency.png`` (per-token latency by method, one panel per prompt set:
boxes p25-p75, whiskers p10-p90, a dot at the mean) and ``<stem>_accepted_length.png``
(fraction of verification steps by accepted length, speculative methods only).
serve: ``<stem>_latency_vs_rate.png`` (TTFT, TPOT, ITL, E2E: mean, p50, p90 against request rate).
offload: ``<stem>_passes.png`` (pass time over the copy floor against tree tokens, per model, mode
and working-buffer count, with the 1.15x target) and ``<stem>_decode.png`` (ms per token with
speculation off and on per model; the random-weight shape's "on" is an estimate, hatched).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib, then "
              "python -m bench.plots RESULT.json)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _token_latencies(request: dict[str, Any]) -> list[float]:
    """Per-token latencies in ms from a request row's observations (bench.metrics definition)."""
    times, counts = request["observation_times_s"], request["observation_num_tokens"]
    values = []
    for k in range(1, len(times)):
        values += [1000 * (times[k] - times[k - 1]) / counts[k]] * counts[k]
    return values


def speculative_methods(result: dict[str, Any]) -> list[str]:
    """The measured methods that draft: our engine with speculation on, transformers' assisted modes."""
    measured = next(iter(result["prompt_sets"].values()))["methods"]
    return [name for name, c in result["config"]["method_configs"].items() if name in measured
            and (c["kind"] in ("hf-lookup", "hf-assisted") or (c["kind"] == "engine" and c["speculative"]["method"] != "off"))]


def plot_latency(result: dict[str, Any], stem: Path, plt) -> list[Path]:
    sets = result["prompt_sets"]
    paths = []
    fig, axes = plt.subplots(1, len(sets), figsize=(7 * len(sets), 4.5), squeeze=False)
    for ax, (set_name, prompt_set) in zip(axes[0], sets.items()):
        names = list(prompt_set["methods"])
        data = [[x for r in prompt_set["methods"][n]["requests"] for x in _token_latencies(r)] or [math.nan] for n in names]
        ax.boxplot(data, whis=(10, 90), showfliers=False)
        ax.set_xticks(range(1, len(names) + 1), names)
        means = [prompt_set["methods"][n]["summary"]["mean_token_latency_ms"] for n in names]
        ax.plot(range(1, len(names) + 1), [math.nan if m is None else m for m in means], "o", color="black", label="mean")
        for i, n in enumerate(names, 1):
            s = prompt_set["methods"][n]["summary"]["speedup_vs_off"]
            if s is not None:
                ax.annotate(f"{s:.2f}x", (i, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                            textcoords="offset points", ha="center", fontsize=8)
        ax.set_title(f"{set_name} ({prompt_set['num_prompts_measured']} prompts)")
        ax.set_ylabel("ms per token")
        ax.set_ylim(bottom=0)
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend(loc="upper left", fontsize=8)
    config = result["config"]
    fig.suptitle(f"per-token latency, batch {config['batch_size']}, {config['max_tokens']} tokens "
                 f"({result['environment']['device']}; box p25-p75, whiskers p10-p90, speedup over off at the foot)",
                 fontsize=9)
    fig.tight_layout()
    paths.append(Path(f"{stem}_token_latency.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    speculative = speculative_methods(result)
    if not speculative:  # off and hf only: every step adds one token, nothing to draw
        return paths
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, (set_name, prompt_set) in zip(axes[0], sets.items()):
        width = 0.8 / len(speculative)
        for j, name in enumerate(speculative):
            summary = prompt_set["methods"][name]["summary"]
            histogram = summary["accepted_length_histogram"]
            total = sum(histogram) or 1
            xs = [length + (j - (len(speculative) - 1) / 2) * width for length in range(1, len(histogram) + 1)]
            mean = summary["mean_accepted_length"]
            ax.bar(xs, [h / total for h in histogram], width=width,
                   label=f"{name} (mean {mean:.2f})" if mean is not None else name)
        longest = max(len(prompt_set["methods"][n]["summary"]["accepted_length_histogram"]) for n in speculative)
        ax.set_xticks(range(1, longest + 1))
        ax.set_title(set_name)
        ax.set_xlabel("accepted length (tokens per verification step)")
        ax.set_ylabel("fraction of steps")
        ax.set_ylim(0, 1.2)  # room for the legend above bars of at most 1
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"accepted length per verification step ({result['environment']['device']})", fontsize=9)
    fig.tight_layout()
    paths.append(Path(f"{stem}_accepted_length.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def plot_serve(result: dict[str, Any], stem: Path, plt) -> list[Path]:
    runs = result["runs"]
    finite = [r["request_rate"] for r in runs if r["request_rate"] != "inf"]
    inf_x = 2 * max(finite) if finite else 1.0
    xs = [inf_x if r["request_rate"] == "inf" else r["request_rate"] for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, [("ttft_ms", "TTFT (ms)"), ("tpot_ms", "TPOT (ms)"),
                                            ("itl_ms", "ITL (ms)"), ("e2e_ms", "end-to-end latency (ms)")]):
        for stat, style in (("mean", "o-"), ("p50", "s--"), ("p90", "^:")):
            ys = [(r["summary"][key] or {}).get(stat, math.nan) for r in runs]
            ax.plot(xs, ys, style, label=stat)
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        if len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
        ax.set_xticks(xs, [("inf" if r["request_rate"] == "inf" else f"{r['request_rate']:g}") for r in runs])
        ax.minorticks_off()  # a log axis would label its minor ticks over ours
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['config'].get('label') or result['config']['base_url']}: latency vs request rate, "
                 f"{result['config']['num_prompts']} requests per rate ({result['environment']['device']})", fontsize=9)
    fig.tight_layout()
    path = Path(f"{stem}_latency_vs_rate.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def plot_offload(result: dict[str, Any], stem: Path, plt) -> list[Path]:
    floor_known = math.isfinite(result["host_to_device_gbps"])  # no bandwidth (CPU run): plain pass times
    key = "pass_over_floor" if floor_known else "pass_s"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ticks: set[int] = set()
    for model_name, m in result["models"].items():
        by_buffers = m.get("passes_by_num_buffers") or {m["num_buffers"]: m["passes"]}
        for count, passes in by_buffers.items():
            for mode, p in passes.items():
                sizes = sorted(p[key], key=int)  # JSON keys are strings
                ticks.update(int(n) for n in sizes)
                ax.plot([int(n) for n in sizes], [p[key][n] * (1 if floor_known else 1000) for n in sizes], "o-",
                        label=f"{model_name} [{mode}, {count} buffers]")
    if floor_known:
        ax.axhline(1.15, color="grey", linestyle="--", label="target 1.15x")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(bottom=0.9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(n) for n in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("tree tokens in the pass")
    ax.set_ylabel("pass time / copy floor" if floor_known else "pass time (ms)")
    ax.legend(fontsize=7)
    ax.set_title(f"offloaded pass vs copy floor ({result['host_to_device_gbps']:.1f} GB/s measured; "
                 f"{result['environment']['device']})", fontsize=9)
    fig.tight_layout()
    paths = [Path(f"{stem}_passes.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    bars = []  # (label, off ms/token, on ms/token, on is an estimate)
    for model_name, m in result["models"].items():
        for count, decode in m.get("decode_by_num_buffers", {}).items():
            for mode, d in decode.items():
                bars.append((f"{model_name}\n[{mode}, {count} buffers]", d["speculation_off"]["ms_per_token"],
                             d["speculation_on"]["ms_per_token"], False))
        if "tokens_per_s_off" in m:
            bars.append((f"{model_name}\n(speculation on: estimated)", 1000 / m["tokens_per_s_off"],
                         1000 / m["tokens_per_s_spec_estimated"], True))
    if not bars:
        return paths
    fig, axes = plt.subplots(1, len(bars), figsize=(3.2 * len(bars), 4.5), squeeze=False)
    for ax, (label, off, on, estimated) in zip(axes[0], bars):
        ax.bar([0, 1], [off, on], color=["tab:grey", "tab:blue"], hatch=[None, "//" if estimated else None])
        ax.set_xticks([0, 1], ["speculation off", "on"])
        ax.set_title(f"{label}\n{off / on:.2f}x", fontsize=7)
        ax.set_ylabel("ms per token")
    fig.tight_layout()
    paths.append(Path(f"{stem}_decode.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def plot_result(result: dict[str, Any], stem: str | Path) -> list[Path]:
    """Draw the plots of one result next to ``stem`` (a path without suffix); [] without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    if result["benchmark"] == "latency":
        return plot_latency(result, stem, plt)
    if result["benchmark"] == "serve":
        return plot_serve(result, stem, plt)
    if result["benchmark"] == "offload":
        return plot_offload(result, stem, plt)
    raise ValueError(f"no plots for benchmark {result['benchmark']!r}")


def main() -> None:
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", nargs="+", help="JSON written by bench.latency, bench.serve or bench.offload")
    args = parser.parse_args()
    for name in args.result:
        path = Path(name)
        for png in plot_result(json.loads(path.read_text()), path.with_suffix("")):
            print(f"-> {png}")


if __name__ == "__main__":
    main()
