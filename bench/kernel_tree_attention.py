"""Tree attention over a paged KV cache: the Triton kernel against gather + PyTorch SDPA.

    python -m bench.kernel_tree_attention --out bench/results/kernel_tree_attention_h100.json
    python -m bench.kernel_tree_attention --quick          # tiny CPU smoke run (TRITON_INTERPRET)

Ratios are kernel time / baseline time (below 1: the kernel is faster). Eager times of small
configs are bound by Python launch overhead on the host; the CUDA-graph times are GPU time.

Baseline, per config: gather every sequence's paged K/V into contiguous [batch, num_heads,
max_len, head_dim] tensors (GQA heads repeated), then ``scaled_dot_product_attention`` with a
dense boolean [batch, 1, max_tree_len, max_len] mask (prefix + ancestor-or-self). Both sides get
the same inputs: bf16, block size 16, a shuffled block pool, random trees (parent uniform among
earlier tokens). Times are ``triton.testing.do_bench`` medians with warm-up excluded; the kernel,
the whole baseline and SDPA alone are also timed replayed from a CUDA graph
(``do_bench_cudagraph``: launch overhead excluded).
The kernel output is checked against the baseline once per config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from specserve_kernels.tree_attention import select_launch_config, tree_attention  # noqa: E402

MODEL_SHAPES = {  # head_dim -> (num_heads, num_kv_heads)
    64: (9, 3),  # SmolLM2-135M
    128: (32, 8),  # Llama-3-8B
}
MAX_BYTES = 20e9


@dataclass(frozen=True)
class BenchConfig:
    tree_len: int
    context_len: int
    batch: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    tree_kind: str = "random"  # "random" or "chain"


def config_grid(quick: bool) -> list[BenchConfig]:
    if quick:
        return [
            BenchConfig(1, 40, 1, 64, 4, 2),
            BenchConfig(6, 16, 2, 64, 4, 2),
            BenchConfig(12, 8, 1, 64, 4, 2, "chain"),
        ]
    configs = [
        BenchConfig(tree, context, batch, head_dim, *MODEL_SHAPES[head_dim])
        for head_dim, batch, context, tree in itertools.product(
            [64, 128], [1, 8, 32], [256, 1024, 4096, 8192], [1, 16, 64, 128, 256]
        )
        if not (batch == 32 and context == 8192 and tree == 256)
    ]
    # chunked prefill: one long chain over a context
    configs += [
        BenchConfig(chunk, context, 1, 128, *MODEL_SHAPES[128], "chain")
        for chunk, context in [(512, 0), (2048, 0), (2048, 4096)]
    ]
    return configs


def estimated_bytes(config: BenchConfig) -> float:
    total_len = config.context_len + config.tree_len
    cache = 2 * config.batch * total_len * config.num_kv_heads * config.head_dim * 2
    expanded = 2 * config.batch * total_len * config.num_heads * config.head_dim * 2 * 2
    mask = config.batch * config.tree_len * total_len
    scores_guess = config.batch * config.num_heads * config.tree_len * 64 * 4
    return cache + expanded + mask + scores_guess


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32
    prefix_lens: torch.Tensor  # [num_seqs] int32
    tree_lens: torch.Tensor  # [num_seqs] int32
    tree_parents: torch.Tensor  # [num_tokens] int32
    gather_blocks: torch.Tensor  # [num_seqs, max_len] int64, physical block of every position
    gather_slots: torch.Tensor  # [num_seqs, max_len] int64
    sdpa_mask: torch.Tensor  # [num_seqs, 1, max_tree_len, max_len] bool


def make_batch(config: BenchConfig, block_size: int, dtype: torch.dtype, device: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    batch, tree_len, context_len = config.batch, config.tree_len, config.context_len
    total_len = context_len + tree_len
    blocks_per_seq = triton.cdiv(total_len, block_size)
    num_blocks = batch * blocks_per_seq
    block_tables = torch.randperm(num_blocks, generator=generator).int().view(batch, blocks_per_seq)
    parents = []
    mask = torch.zeros(batch, 1, tree_len, total_len, dtype=torch.bool)
    mask[..., :context_len] = True
    for seq in range(batch):
        tree = [-1]
        for i in range(1, tree_len):
            parent = (
                i - 1
                if config.tree_kind == "chain"
                else int(torch.randint(0, i, (), generator=generator))
            )
            tree.append(parent)
        parents += tree
        for i, parent in enumerate(tree):
            if parent >= 0:
                mask[seq, 0, i, context_len:] = mask[seq, 0, parent, context_len:]
            mask[seq, 0, i, context_len + i] = True
    positions = torch.arange(total_len)
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return PagedBatch(
        q=torch.randn(batch * tree_len, config.num_heads, config.head_dim, generator=generator).to(
            device, dtype
        ),
        k_cache=torch.randn(shape, generator=generator).to(device, dtype),
        v_cache=torch.randn(shape, generator=generator).to(device, dtype),
        block_tables=block_tables.to(device),
        prefix_lens=torch.full((batch,), context_len, dtype=torch.int32, device=device),
        tree_lens=torch.full((batch,), tree_len, dtype=torch.int32, device=device),
        tree_parents=torch.tensor(parents, dtype=torch.int32, device=device),
        gather_blocks=block_tables[:, positions // block_size].long().to(device),
        gather_slots=(positions % block_size).expand(batch, -1).contiguous().to(device),
        sdpa_mask=mask.to(device),
    )


def run_kernel(batch: PagedBatch) -> torch.Tensor:
    return tree_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
        batch.prefix_lens, batch.tree_lens, batch.tree_parents,
    )  # fmt: skip


def gather_for_sdpa(batch: PagedBatch, group: int):
    """Paged cache -> contiguous [num_seqs, num_heads, max_len, head_dim] keys and values."""
    keys = batch.k_cache[batch.gather_blocks, batch.gather_slots]  # [num_seqs, max_len, kv, d]
    values = batch.v_cache[batch.gather_blocks, batch.gather_slots]
    keys = keys.transpose(1, 2).repeat_interleave(group, dim=1)
    values = values.transpose(1, 2).repeat_interleave(group, dim=1)
    num_seqs, tree_len = batch.sdpa_mask.shape[0], batch.sdpa_mask.shape[2]
    queries = batch.q.view(num_seqs, tree_len, *batch.q.shape[1:]).transpose(1, 2)
    return queries, keys, values


def run_sdpa(queries, keys, values, mask) -> torch.Tensor:
    return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)


def run_baseline(batch: PagedBatch, group: int) -> torch.Tensor:
    queries, keys, values = gather_for_sdpa(batch, group)
    out = run_sdpa(queries, keys, values, batch.sdpa_mask)  # [num_seqs, heads, tree, d]
    return out.transpose(1, 2).reshape(batch.q.shape)


def time_ms(fn, quick: bool, cuda_graph: bool = False, rep_ms: int = 25) -> float:
    if quick:  # the interpreter on the CPU: wall clock, a few calls
        fn()
        start = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - start) / 2 * 1e3
    if cuda_graph:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def bench_config(config: BenchConfig, quick: bool, seed: int, rep_ms: int = 25) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if quick else torch.bfloat16
    block_size = 16
    batch = make_batch(config, block_size, dtype, device, seed)
    group = config.num_heads // config.num_kv_heads
    out = run_kernel(batch)
    expected = run_baseline(batch, group)
    error = (out.float() - expected.float()).abs().max().item()
    queries, keys, values = gather_for_sdpa(batch, group)
    launch = select_launch_config(
        batch.q.shape[0], config.batch, config.num_heads, config.num_kv_heads, config.head_dim,
        batch.block_tables.shape[1] * block_size, dtype,
        torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 132,
    )  # fmt: skip
    timed = {
        "kernel": lambda: run_kernel(batch),
        "baseline": lambda: run_baseline(batch, group),
        "sdpa_only": lambda: run_sdpa(queries, keys, values, batch.sdpa_mask),
    }
    row = asdict(config)
    row.update(num_splits=launch.num_splits, block_m=launch.block_m, max_abs_error=error)
    for name, fn in timed.items():
        row[f"{name}_ms"] = time_ms(fn, quick, rep_ms=rep_ms)
    row["ratio_vs_baseline"] = row["kernel_ms"] / row["baseline_ms"]
    row["ratio_vs_sdpa_only"] = row["kernel_ms"] / row["sdpa_only_ms"]
    if not quick:
        for name, fn in timed.items():
            row[f"{name}_graph_ms"] = time_ms(fn, quick, cuda_graph=True, rep_ms=rep_ms)
        row["graph_ratio_vs_baseline"] = row["kernel_graph_ms"] / row["baseline_graph_ms"]
        row["graph_ratio_vs_sdpa_only"] = row["kernel_graph_ms"] / row["sdpa_only_graph_ms"]
    return row


RATIOS = {  # result key -> legend
    "ratio_vs_baseline": "kernel / (gather + SDPA), eager",
    "ratio_vs_sdpa_only": "kernel / SDPA alone, eager",
    "graph_ratio_vs_baseline": "kernel / (gather + SDPA), CUDA graphs",
    "graph_ratio_vs_sdpa_only": "kernel / SDPA alone, CUDA graphs",
}


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def summary_table(results: list[dict]) -> str:
    """Geomean and worst of every ratio, per (head_dim, batch)."""
    keys = [key for key in RATIOS if key in results[0]]
    lines = ["head_dim batch configs  " + "  ".join(f"{key:>26}" for key in keys)]
    groups = sorted({(row["head_dim"], row["batch"]) for row in results})
    for head_dim, batch_size in groups:
        rows = [r for r in results if (r["head_dim"], r["batch"]) == (head_dim, batch_size)]
        cells = [
            f"{geomean([r[key] for r in rows]):>11.2f} (worst {max(r[key] for r in rows):5.2f})"
            for key in keys
        ]
        lines.append(f"{head_dim:>8} {batch_size:>5} {len(rows):>7}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(results: list[dict], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head_dims = sorted({row["head_dim"] for row in results})
    figure, axes = plt.subplots(len(head_dims), 1, figsize=(16, 5 * len(head_dims)), squeeze=False)
    for axis, head_dim in zip(axes[:, 0], head_dims):
        rows = [row for row in results if row["head_dim"] == head_dim]
        labels = [
            f"b{r['batch']} c{r['context_len']} t{r['tree_len']}{'ch' if r['tree_kind'] == 'chain' else ''}"
            for r in rows
        ]
        x = range(len(rows))
        for (key, legend), marker in zip(RATIOS.items(), "os^v"):
            if key in rows[0]:
                axis.plot(x, [r[key] for r in rows], marker + "-", markersize=4, label=legend)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.axhline(1.2, color="red", linestyle="--", linewidth=0.8, label="1.2x")
        axis.set_yscale("log")
        axis.set_xticks(list(x), labels, rotation=90, fontsize=6)
        axis.set_ylabel("time ratio (lower is better)")
        heads = f"{rows[0]['num_heads']}/{rows[0]['num_kv_heads']} heads"
        axis.set_title(f"tree attention on {device}, head_dim {head_dim}, {heads}, bf16, block size 16")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def format_row(row: dict) -> str:
    graphs = (
        f"  graphs: kernel {row['kernel_graph_ms']:8.4f} ms  ratio "
        f"{row['graph_ratio_vs_baseline']:5.2f} / {row['graph_ratio_vs_sdpa_only']:5.2f}"
        if "kernel_graph_ms" in row
        else ""
    )
    return (
        f"hd{row['head_dim']:>4} b{row['batch']:>3} ctx{row['context_len']:>5} "
        f"tree{row['tree_len']:>5}{'c' if row['tree_kind'] == 'chain' else ' '} "
        f"splits{row['num_splits']:>3}  kernel {row['kernel_ms']:8.4f} ms  "
        f"baseline {row['baseline_ms']:8.4f} ms  sdpa {row['sdpa_only_ms']:8.4f} ms  "
        f"ratio {row['ratio_vs_baseline']:5.2f} / {row['ratio_vs_sdpa_only']:5.2f}"
        f"{graphs}  err {row['max_abs_error']:.1e}"
    )


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (interpreter)"


def write_report(args: argparse.Namespace, results: list[dict], skipped: list[dict], complete: bool) -> None:
    """The JSON report (``complete`` false while configs remain: a partial run)."""
    report = {
        "benchmark": "tree attention over a paged KV cache: Triton kernel vs gather + SDPA",
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": "float32" if args.quick else "bfloat16",
        "block_size": 16,
        "seed": args.seed,
        "rep_ms": args.rep_ms,
        "complete": complete,
        "results": results,
        "skipped_over_memory": skipped,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON file for the results (a PNG plot is written beside it)")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", help="only redraw the plot of an existing results JSON")
    parser.add_argument("--rep-ms", type=int, default=25, help="timing window of every do_bench (ms)")
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        plot(report["results"], os.path.splitext(args.replot)[0] + ".png", report["device"])
        return
    if not args.quick and not torch.cuda.is_available():
        parser.error("the full benchmark needs a CUDA device; use --quick on the CPU")

    grid = config_grid(args.quick)
    results, skipped = [], []
    started = time.perf_counter()
    for index, config in enumerate(grid):
        if estimated_bytes(config) > MAX_BYTES:
            skipped.append(asdict(config))
            continue
        row = bench_config(config, args.quick, args.seed + index, args.rep_ms)
        results.append(row)
        print(format_row(row), flush=True)
        if args.out:  # after every config: a run cut short still leaves what it measured
            write_report(args, results, skipped, complete=index == len(grid) - 1)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{len(results)} configs in {time.perf_counter() - started:.0f} s; time ratios:")
    print(summary_table(results))
    if args.out:
        write_report(args, results, skipped, complete=True)
        try:
            plot(results, os.path.splitext(args.out)[0] + ".png", device_name())
        except ImportError:
            print("matplotlib is not installed: no plot (redraw later with --replot)")


if __name__ == "__main__":
    main()
