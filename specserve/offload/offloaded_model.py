"""A Llama model whose last layers live in host memory and stream to the device per forward.

Layout on the device and the host (L layers, the first R resident)::

    device: embeddings, final norm, LM head, layers 0 .. R-1, B working buffers [layer numel]
    host:   layers R .. L-1 as flat buffers (pinned on CUDA so copies run asynchronously)

Streaming (B-fold buffering, B >= 2; 2 is double buffering): offloaded layer k (counting from
R) runs from working buffer k % B. Its copy was issued on a separate copy stream B layers
earlier, right after the compute stream finished enqueueing the layer that last used that
buffer, so layer k's copy overlaps the compute of layers k-B+1 .. k-1. With B = 2 a layer whose
compute outlasts one layer's copy stalls the copy stream; a third buffer lets the copies run
ahead and absorbs such jitter. Events order the two streams:

    copy stream:    wait freed[b] -> copy layer into buffer b -> record copied[b]
    compute stream: wait copied[b] -> run the layer from buffer b -> record freed[b]

A forward forks the copy stream from the compute stream before its first copies (which
orders them after the previous forward's use of every buffer) and joins it back after its last
layer, and records every event it waits on itself: so the whole streamed forward can be captured
in a CUDA graph (host buffers and working buffers never move) and replayed.

Prefetch across passes (P = B - 1 layers): a forward's first P offloaded layers are copied by
the *previous* forward, right after its last layer, into buffers 0 .. P-1::

    pass n:    ... layer L-1 | prefetch layers 0 .. P-1 of pass n+1 (copy stream)
    host:                      read-back, accept, draft the next tree ...   | pass n+1
    pass n+1:  wait for the prefetch, copy layer P into buffer P, ...

so the host's work between two passes (and a drafter's forwards) overlaps P layers' copies
instead of leaving the copy engine idle. Every full pass still streams every offloaded layer
once; a forward of few layers (an early-exit drafter's) re-copies only the prefetched buffers
it overwrote (``stale``). (The copy of layer P is issued at the fork, before any resident
layer runs; the wait for ``ready`` comes before the first streamed layer.)
Invariant: whenever no forward is running, buffers 0 .. P-1 hold (or are being copied) layers
0 .. P-1 and ``ready`` is recorded after those copies. An eager forward waits for ``ready``
and prefetches at its end itself. A captured forward does neither: ``ready`` is recorded
outside the capture, so waiting on it inside would fail, and a prefetch inside the graph would
hold the graph (and the host's read of its logits) until the copies end. Whoever replays it
calls ``wait_for_prefetch`` before and ``prefetch`` after it (``before_graph_replay`` and
``after_graph_replay``, which ``cuda_graphs.GraphRunner`` calls for runners whose forward
streams: ``ModelRunner``). (Waiting inside the graph, on an external event, would let the
graph's first copies overlap the prefetch's last, but on the H200 such a wait node waited for
the record made after the launch, here the next prefetch, which waits for the replay itself:
``bench/results/graph_event_wait_semantics_h200.log``.) The join and the prefetch run when the
layer iterator is exhausted: callers iterate it to the end (``LlamaForCausalLM.run_layers``).

Keeping the *last* layers offloaded leaves the first ones resident, where an early-exit drafter
runs them without streaming. On the CPU the same code copies synchronously (the test path).
One forward streams every offloaded layer once, whatever the number of tokens: a whole token
tree of every running sequence costs one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call

from specserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from specserve.offload.layer_store import FlatLayout


class LayerStreamer:
    """Host flat buffers of the offloaded layers, ``num_buffers`` device working buffers, streams
    and events; the first ``num_prefetched`` (B - 1) layers are prefetched across passes."""

    def __init__(self, template: LlamaDecoderLayer, layout: FlatLayout, host_flats: list[torch.Tensor],
                 device: torch.device, dtype: torch.dtype, num_buffers: int = 2) -> None:
        if num_buffers < 2:
            raise ValueError(f"streaming needs at least 2 working buffers, not {num_buffers}")
        self.template = template  # a layer on the meta device: structure only, weights come per call
        self.layout = layout
        self.host_flats = host_flats  # [num_offloaded] of [numel]
        self.buffers = [torch.empty(layout.numel, dtype=dtype, device=device) for _ in range(num_buffers)]
        self.buffer_views = [layout.views(b) for b in self.buffers]
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.copied = [torch.cuda.Event() for _ in range(num_buffers)] if cuda else None
        self.freed = [torch.cuda.Event() for _ in range(num_buffers)] if cuda else None
        self.num_prefetched = min(num_buffers - 1, len(host_flats))  # P
        self.ready = torch.cuda.Event() if cuda else None  # recorded after the prefetch's copies
        self.prefetch()

    @property
    def num_buffers(self) -> int:
        return len(self.buffers)

    @property
    def num_offloaded(self) -> int:
        return len(self.host_flats)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device by one full forward."""
        return sum(flat.numel() * flat.element_size() for flat in self.host_flats)

    def stale(self, count: int | None) -> list[int]:
        """The prefetched buffers a forward of the first ``count`` offloaded layers overwrote
        (layer b + B, b + 2B, ... ran from buffer b); every one of them for ``None``."""
        if count is None:
            return list(range(self.num_prefetched))
        return [b for b in range(self.num_prefetched) if b + self.num_buffers < count]

    def prefetch(self, count: int | None = None) -> None:
        """Copy layer b into buffer b again for every prefetched buffer b that a forward of
        ``count`` offloaded layers overwrote (``stale``), on the copy stream after everything
        enqueued on the current stream so far; records ``ready`` after them (earlier copies on
        that stream precede it). Synchronous off CUDA."""
        stale = self.stale(count)
        if not stale:
            return  # ``ready`` still stands for buffers the forward left alone
        if self.copy_stream is None:
            for index in stale:
                self.buffers[index].copy_(self.host_flats[index])
            return
        self.copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.copy_stream):
            for index in stale:
                self.buffers[index].copy_(self.host_flats[index], non_blocking=True)
            self.ready.record(self.copy_stream)

    def wait_for_prefetch(self) -> None:
        """The current stream waits for the prefetch (before a forward's first streamed layer, or
        before replaying a captured forward)."""
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)

    def _copy(self, index: int, buffer: int, after_freed: bool) -> None:
        if self.copy_stream is None:
            self.buffers[buffer].copy_(self.host_flats[index])
            return
        with torch.cuda.stream(self.copy_stream):
            if after_freed:
                self.copy_stream.wait_event(self.freed[buffer])
            self.buffers[buffer].copy_(self.host_flats[index], non_blocking=True)
            self.copied[buffer].record(self.copy_stream)

    def _layer_in(self, buffer: int) -> Callable[..., torch.Tensor]:
        """The template layer run with working buffer ``buffer``'s weights."""
        views = self.buffer_views[buffer]
        return lambda *args: functional_call(self.template, views, args)

    def layers(self, count: int) -> Iterator[Callable[..., torch.Tensor]]:
        """The first ``count`` offloaded layers, each streamed in before it is handed out. Layers
        0 .. P-1 are already prefetched; the copies of layers P .. B-1 are issued now, so they
        overlap whatever the caller runs before it asks for the first layer (the resident
        layers)."""
        capturing = self.copy_stream is not None and torch.cuda.is_current_stream_capturing()
        if self.copy_stream is not None and count:
            self.copy_stream.wait_stream(torch.cuda.current_stream())  # fork
        for index in range(self.num_prefetched, min(self.num_buffers, count)):
            self._copy(index, index, after_freed=False)
        return self._stream(count, eager=not capturing)

    def _stream(self, count: int, eager: bool) -> Iterator[Callable[..., torch.Tensor]]:
        """An eager forward waits for the prefetch before its first streamed layer and prefetches
        after its last; a captured one leaves both to whoever replays it."""
        ahead = self.num_buffers
        for index in range(count):
            buffer = index % ahead
            if index == 0 and eager:
                self.wait_for_prefetch()
            if self.copied is not None and index >= self.num_prefetched:  # prefetched: waited for ``ready``
                torch.cuda.current_stream().wait_event(self.copied[buffer])
            yield self._layer_in(buffer)
            if self.freed is not None:  # the caller has enqueued this layer's compute
                self.freed[buffer].record(torch.cuda.current_stream())
            if index + ahead < count:
                self._copy(index + ahead, buffer, after_freed=True)
        if self.copy_stream is not None and count:
            torch.cuda.current_stream().wait_stream(self.copy_stream)  # join
        if count and eager:
            self.prefetch(count)


class OffloadedLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with ``self.layers`` holding only the resident layers."""

    def __init__(self, resident_model: LlamaForCausalLM, streamer: LayerStreamer) -> None:
        nn.Module.__init__(self)
        self.cfg = resident_model.cfg
        self.attention = resident_model.attention
        self.embed_tokens = resident_model.embed_tokens
        self.layers = resident_model.layers
        self.norm = resident_model.norm
        self.lm_head = resident_model.lm_head
        self.register_buffer("cos_sin", resident_model.cos_sin, persistent=False)
        self.streamer = streamer

    @property
    def num_resident(self) -> int:
        return len(self.layers)

    def streamed_layers(self, num_layers: int) -> int:
        return max(0, num_layers - self.num_resident)

    def before_graph_replay(self) -> None:
        self.streamer.wait_for_prefetch()

    def after_graph_replay(self, num_layers: int) -> None:
        self.streamer.prefetch(self.streamed_layers(num_layers))

    def layer_sequence(self, num_layers: int) -> Iterator[Callable[..., torch.Tensor]]:
        streamed = self.streamer.layers(self.streamed_layers(num_layers))  # copies start here
        yield from self.layers[: min(num_layers, self.num_resident)]
        yield from streamed


def offload_model(model: LlamaForCausalLM, device: torch.device, num_resident: int,
                  num_buffers: int = 2) -> OffloadedLlamaForCausalLM:
    """Keep layers 0 .. num_resident-1 (and everything outside the layers) on ``device``; move
    the rest into host flat buffers. ``model`` should live on the CPU; it is consumed."""
    cfg = model.cfg
    if not 0 <= num_resident <= cfg.num_layers:
        raise ValueError(f"num_resident must lie in [0, {cfg.num_layers}]")
    dtype = model.embed_tokens.weight.dtype
    layout = FlatLayout.of(model.layers[0])
    pin = device.type == "cuda"
    host_flats = []
    for layer in model.layers[num_resident:]:
        flat = torch.empty(layout.numel, dtype=dtype, pin_memory=pin)
        host_flats.append(layout.flatten(layer, flat))
    del model.layers[num_resident:]
    with torch.device("meta"):
        template = LlamaDecoderLayer(cfg).to(dtype)
    model = model.to(device)
    streamer = LayerStreamer(template, layout, host_flats, device, dtype, num_buffers)
    return OffloadedLlamaForCausalLM(model, streamer).eval().requires_grad_(False)
