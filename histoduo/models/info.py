"""Model cost report: parameters, FLOPs per tile, token counts, activation memory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from histoduo.models.baselines import HybridViT
from histoduo.models.config import ModelConfig
from histoduo.models.duoformer import DuoFormer
from histoduo.models.factory import build_model
from histoduo.models.interaction import is_interaction_module


@dataclass
class ModelInfo:
    """What :func:`model_info` measured. FLOPs are counted FLOPs (= 2 x MACs)."""

    arch: str
    backbone: str
    input_size_px: int
    params_total: int
    params_trainable: int
    gflops_per_tile: float
    num_patches: int | None
    tokens_per_patch: int | None  # scale-attention sequence length (incl. scale token)
    tokens_per_stage: dict[int, int] = field(default_factory=dict)  # feature index -> N_i
    batch_size: int = 0
    device: str = "cpu"
    activation_bytes: int | None = None
    activation_method: str = "not measured"
    # Pre-attention interactions (ACP/CAT), already included in the totals above.
    params_interaction: int = 0
    gflops_interaction: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tokens_per_stage"] = {str(k): v for k, v in self.tokens_per_stage.items()}
        return data


def count_flops(model: nn.Module, input_size_px: int, in_chans: int = 3) -> int:
    """Forward FLOPs (2 x MACs) of one tile, counted by FlopCounterMode.

    Pass a meta-device model (see :func:`model_info`): it costs no compute and, unlike the CPU
    kernels, its SDPA path is counted (FlopCounterMode has no formula for the CPU
    flash-attention op and reports 0 for it on CPU tensors).
    """
    return count_flops_by_module(model, input_size_px, in_chans)[""]


def count_flops_by_module(
    model: nn.Module, input_size_px: int, in_chans: int = 3
) -> dict[str, int]:
    """Forward FLOPs of one tile per submodule name (``named_modules``; "" is the total)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.empty(1, in_chans, input_size_px, input_size_px, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    model.train(was_training)
    # The counter names modules "<RootClass>.<qualified name>" and the root "Global".
    prefix = type(model).__name__ + "."
    counts = {"": int(counter.get_total_flops())}
    for key, ops in counter.get_flop_counts().items():
        if key.startswith(prefix):
            counts[key[len(prefix) :]] = int(sum(ops.values()))
    return counts


def interaction_costs(model: nn.Module, flops: dict[str, int]) -> tuple[int, int]:
    """(parameters, FLOPs per tile) of all ACP/CAT modules of a model."""
    params = total = 0
    counted: list[str] = []
    for name, module in model.named_modules():  # parents come before their children
        if is_interaction_module(module) and not any(name.startswith(c + ".") for c in counted):
            counted.append(name)
            params += sum(p.numel() for p in module.parameters())
            total += flops.get(name, 0)
    return params, total


def _build_meta(config: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return build_model(config.replace(backbone_weights=None))


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of tensors autograd saves for backward in one training-mode forward.

    This is the activation memory a training step holds at its peak (before backward frees
    it); parameters, gradients, optimiser state and transient buffers are not included.
    Tensors saved twice (same storage) are counted once.
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if isinstance(tensor, nn.Parameter) or tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    # Parameters saved by matmuls are weights, not activations.
    for ptr in params:
        for key in [k for k in seen if k[0] == ptr]:
            total -= key[1]
            seen.discard(key)
    return total


def model_info(
    config: ModelConfig,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    measure_memory: bool = True,
) -> ModelInfo:
    """Parameters, GFLOPs per tile, token counts and activation memory of a configuration.

    ``params_interaction``/``gflops_interaction`` break out the ACP/CAT modules (counted in
    the totals too). FlopCounterMode counts matmuls and convolutions, not pooling, softmax or
    GELU, which are a rounding error here.

    Parameters and FLOPs come from a meta-device build (instant, no weights needed).
    Memory: on CUDA the peak allocated during a training forward+backward of ``batch_size``
    tiles minus the memory held before it; on CPU the bytes autograd saves for backward in a
    training forward (an estimate of activation memory, see :func:`saved_activation_bytes`).
    """
    meta_model = _build_meta(config)
    params_total = sum(p.numel() for p in meta_model.parameters())
    params_trainable = sum(p.numel() for p in meta_model.parameters() if p.requires_grad)
    flops = count_flops_by_module(meta_model, config.input_size_px, config.in_chans)
    params_interaction, flops_interaction = interaction_costs(meta_model, flops)
    info = ModelInfo(
        arch=config.arch,
        backbone=config.backbone,
        input_size_px=config.input_size_px,
        params_total=params_total,
        params_trainable=params_trainable,
        gflops_per_tile=flops[""] / 1e9,
        num_patches=getattr(meta_model, "num_patches", None),
        tokens_per_patch=getattr(meta_model, "seq_len", None),
        batch_size=batch_size,
        device=device,
        params_interaction=params_interaction,
        gflops_interaction=flops_interaction / 1e9,
    )
    if isinstance(meta_model, DuoFormer):
        info.tokens_per_stage = meta_model.tokens_per_stage()
    elif isinstance(meta_model, HybridViT):
        info.tokens_per_stage = {meta_model.stage.index: meta_model.num_patches}
    if measure_memory:
        info.activation_bytes, info.activation_method = _measure_memory(
            config, batch_size, torch.device(device)
        )
    return info


def _measure_memory(config: ModelConfig, batch_size: int, device: torch.device) -> tuple[int, str]:
    model = build_model(config.replace(backbone_weights=None)).to(device)
    size = config.input_size_px
    x = torch.randn(batch_size, config.in_chans, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model.train()
        model(x).sum().backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return int(peak), "cuda max_memory_allocated, train fwd+bwd (incl. grads)"
    return (
        saved_activation_bytes(model, x),
        "tensors saved for backward in a train forward (CPU estimate)",
    )
