"""Device, precision and data-movement policy shared by ``predict``, ``evaluate`` and ``train``.

One place decides: which device (``auto``, ``cpu``, ``cuda``, ``cuda:N``), the inference dtype
(bf16 weights on CUDA; fp32 on CPU unless asked, see docs/performance.md), channels_last,
optional ``torch.compile``, pinned memory with non-blocking copies, and how many DataLoader
workers. torch is imported inside functions so importing this module stays instant.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

DEVICE_HELP = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "bf16")
DECODES = ("auto", "worker", "device")  # where JPEG tiles are decoded (decode.py)
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
GPU_BATCH = 256  # tiles per inference batch on a GPU (paper config fits easily in bf16)
CPU_BATCH = 64


class DeviceError(ValueError):
    """The device asked for does not exist here; the message says what is available."""


def check_device_name(name: str) -> str:
    """``name`` if it is a device this package accepts, else a ValueError naming the choices."""
    if not _DEVICE_RE.match(name):
        raise ValueError(f"device must be {DEVICE_HELP}, got {name!r}")
    return name


def check_decode(decode: str) -> str:
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    return decode


def _cuda_state() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The torch.device for ``--device NAME``.

    ``auto``: the GPU (``local_rank``'s under torchrun) when CUDA works, else the CPU, without
    a word (auto means "whatever is here"). An explicit ``cuda`` or ``cuda:N`` that is not
    there is an error, not a silent 100x slower CPU run.
    """
    import torch

    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        if not available:
            return torch.device("cpu")
        name = "cuda"
    if not available:
        raise DeviceError(f"--device {name} was asked for but {_cuda_state()}; use --device cpu")
    if name == "cuda":
        return torch.device("cuda", local_rank if local_rank is not None else 0)
    index = int(name.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"--device {name} was asked for but torch sees {count} CUDA device(s) "
            f"(cuda:0 to cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA; fp32 on CPU, where bf16 is only faster on CPUs with native bf16
    (benchmarks/bench_precision.py, docs/performance.md) and would change CPU results."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def default_batch_size(device: torch.device) -> int:
    return GPU_BATCH if device.type == "cuda" else CPU_BATCH


@dataclass(frozen=True)
class Runtime:
    """Where and how a model runs; built once per run by :meth:`create`."""

    device: torch.device
    precision: str  # "bf16" or "fp32"
    channels_last: bool = True
    compile: bool = False

    @classmethod
    def create(
        cls,
        device: str = "auto",
        precision: str = "auto",
        *,
        channels_last: bool = True,
        compile: bool = False,
        torch_threads: int | None = None,
        local_rank: int | None = None,
    ) -> Runtime:
        import torch

        torch_device = resolve_device(device, local_rank)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if torch_device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed tile shapes: pick the fastest conv
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 paths (heads, fallbacks)
            torch.backends.cudnn.allow_tf32 = True
        return cls(torch_device, resolve_precision(precision, torch_device), channels_last, compile)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Eval-mode model on the device, in the inference dtype, channels_last, compiled.

        bf16 means bf16 *weights* (half the memory traffic, no per-call weight casts) plus
        autocast in :meth:`autocast`, which keeps softmax and norms in fp32.
        """
        import torch

        model = model.to(self.device).eval()
        if self.precision == "bf16":
            model = model.to(torch.bfloat16)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return maybe_compile(model, self.compile)

    def autocast(self) -> Any:
        import torch

        return torch.autocast(
            device_type=self.device.type,
            dtype=torch.bfloat16,
            enabled=self.precision == "bf16",
        )

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A float batch already on the device -> the model's dtype and memory format."""
        import torch

        x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.device)

    def peak_memory_gib(self) -> float | None:
        return peak_memory_gib(self.device)

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "gpu": gpu_name(self.device),
        }


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; to a GPU from pinned memory without blocking.

    The DataLoader pins batches itself (``pin_memory=True``); a batch that arrives unpinned
    is pinned here so the copy can overlap the previous batch's compute.
    """
    if device.type != "cuda" or x.device == device:
        return x.to(device)
    if x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def loader_options(device: torch.device, workers: int, prefetch: int = 4) -> dict[str, Any]:
    """DataLoader keywords: pinned batches for a GPU, a deep prefetch queue with workers."""
    return {
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        "prefetch_factor": prefetch if workers > 0 else None,
    }


def reset_peak_memory(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak GPU memory allocated by torch since the last reset, GiB; None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def gpu_name(device: torch.device) -> str | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.get_device_name(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (timings are meaningless without it); no-op on CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput_report(
    device: torch.device,
    train_tiles_per_s: list[float],
    eval_tiles_per_s: float | None,
    **details: Any,
) -> dict[str, Any]:
    """report.json's ``throughput`` block: tiles/s and the GPU memory peak (None on CPU).

    The first epoch pays for worker start-up (and compilation with ``--compile``), so the
    last epoch's rate is given beside the mean.
    """
    rates = [float(r) for r in train_tiles_per_s]
    return {
        "device": str(device),
        "gpu": gpu_name(device),
        "train_tiles_per_s": sum(rates) / len(rates) if rates else None,
        "train_tiles_per_s_last_epoch": rates[-1] if rates else None,
        "eval_tiles_per_s": eval_tiles_per_s,
        "peak_gpu_memory_gib": peak_memory_gib(device),
        **details,
    }


def maybe_compile(model: nn.Module, enabled: bool, **kwargs: object) -> nn.Module:
    """``torch.compile(model)`` when enabled (and available), else the model unchanged."""
    if not enabled:
        return model
    import torch

    if not hasattr(torch, "compile"):
        log.warning("torch.compile is not available in this torch; running eagerly")
        return model
    return torch.compile(model, **kwargs)  # type: ignore[return-value]
