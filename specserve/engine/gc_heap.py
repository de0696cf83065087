"""Keep Python's cyclic garbage collector off the serving path's heap.

A loaded engine leaves hundreds of thousands of long-lived objects (torch modules, the
tokenizer, captured graphs' bookkeeping). A full collection walks all of them: 0.18 to 0.19 s on
this project's 2-core CPU (``python -m bench.ngram_host --load-model``), and likely the 225 ms
step met once at batch 32 on the H200, where a decode step takes 2 ms. After start-up everything alive is
moved to the permanent generation (``gc.freeze``), as vLLM does, so later collections walk only
what serving allocated since.

This is a process-wide choice, so only entry points that own their process call it (the
server's engine thread, ``specserve generate``, the benchmarks, once their engines are built):
an object frozen while still in a reference cycle is never collected, which a library building
and dropping engines must not risk.
"""

from __future__ import annotations

import atexit
import gc


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive; the number of objects now frozen. The heap is
    unfrozen at exit, so that shutdown frees what it holds (extension modules report objects
    left alive then as leaks)."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # one exit handler however often this is called
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()
