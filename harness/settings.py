"""How each cell is run and measured: a matrix file's [settings] and [offload.*] tables (harness/matrix.py reads
them). A leaf: the run, the stacks and the offload read it without the matrix model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.models.sources import Source


@dataclass(frozen=True)
class Settings:
    """How each cell is run and measured."""

    seed: int = 0
    batch: int = 1
    warmup: int = 2
    min_steps: int = 5
    max_steps: int = 50
    min_time_s: float = 0.3
    cell_timeout_s: float = 300.0
    memory_limit_mb: int = 0  # per-cell address-space cap on CPU cells; 0: none
    # [offload.balanced]: fractions of device memory and class-name lists; None: SD.Next's defaults for the
    # device's memory class (offload.sdnext_balanced_defaults)
    high_watermark: float | None = None
    low_watermark: float | None = None
    offload_always: tuple[str, ...] | None = None
    offload_never: tuple[str, ...] | None = None
    # SD.Next's models_not_to_offload: model types (offload.sdnext_model_type) whose components never sweep the
    # others off the device when they start; empty by default
    models_not_to_offload: tuple[str, ...] = ()
    group_type: str = "leaf_level"  # [offload.group], SD.Next's defaults: "leaf_level" | "block_level"
    group_blocks: int = 1  # blocks per group (block_level)
    group_stream: bool = False  # CUDA streams (accelerators only: a CPU cell runs without)
    group_low_cpu_mem: bool = False  # diffusers' low_cpu_mem_usage (SD.Next passes False)
    models: tuple[Source, ...] = ()  # [models.NAME]: models read from disk (registered in each cell's process)
