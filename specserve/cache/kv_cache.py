"""The KV tensors the block manager's ids index.

Memory layout (one tensor for all layers, so a commit moves a slot in every layer at once)::

    kv [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
         layer    k/v  block id   offset      head          channel
    slot = block_id * block_size + offset
"""

from __future__ import annotations

import torch

from specserve.config import CacheConfig
from specserve.models.config import LlamaArchConfig

DEFAULT_CPU_KV_GB = 2.0


def bytes_per_block(arch: LlamaArchConfig, block_size: int, dtype: torch.dtype, num_layers: int | None = None) -> int:
    layers = arch.num_layers if num_layers is None else num_layers
    element = torch.empty((), dtype=dtype).element_size()
    return layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * element


def choose_num_blocks(
    arch: LlamaArchConfig,
    cfg: CacheConfig,
    dtype: torch.dtype,
    device: torch.device,
    extra_layers: int = 0,
) -> int:
    """Pool size: ``cfg.num_blocks``, else ``cfg.kv_cache_memory_gb`` worth, else a device default
    (2 GB on the CPU; on CUDA ``gpu_memory_utilization`` of the memory still free).

    ``extra_layers``: a drafter's own pool mirrors every block with that many layers of the
    same shape, so a memory budget is shared out as if the model had them too.
    """
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    if cfg.kv_cache_memory_gb is not None:
        budget = cfg.kv_cache_memory_gb * 1e9
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = max(0.0, free - (1 - cfg.gpu_memory_utilization) * total)
    else:
        budget = DEFAULT_CPU_KV_GB * 1e9
    per_block = bytes_per_block(arch, cfg.block_size, dtype, arch.num_layers + extra_layers)
    return max(1, int(budget // per_block))


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.kv = torch.zeros(
            num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's contents (every layer) into block dst."""
        if not copies:
            return
        src, dst = self._indices([s for s, _ in copies], [d for _, d in copies])
        self.kv[:, :, dst] = self.kv[:, :, src]

    def move_slots(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Depth-first commit: slot src's K/V (every layer) to slot dst; gathered before scattering."""
        if not src_slots:
            return
        flat = self.kv.view(*self.kv.shape[:2], -1, *self.kv.shape[4:])
        src, dst = self._indices(src_slots, dst_slots)
        flat[:, :, dst] = flat[:, :, src]

    def _indices(self, src: list[int], dst: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``src`` and ``dst`` as index tensors on the cache's device, sent in one host-to-device copy."""
        index = torch.tensor(src + dst, device=self.kv.device)
        return index[: len(src)], index[len(src) :]
