"""Measurement helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import threading
import time


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def peak_tree_rss_gib(cmd: list[str], interval_s: float = 0.05) -> float:
    """Run ``cmd``; the peak RSS of it and its children in GiB, sampled every interval."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(interval_s)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()}")
    return peak / 2**30


def untrained_checkpoint(
    path, config, class_names: list[str], target_mpp: float, tile_size_px: int
):  # noqa: ANN001, ANN201 - a ModelConfig in, the checkpoint's Path out
    """Save an untrained model (seed 0) as a histoduo checkpoint: benchmarks need no weights."""
    import torch

    from histoduo.grading import ClassRoles
    from histoduo.models import build_model
    from histoduo.models.checkpoint import CheckpointMeta, save_checkpoint

    torch.manual_seed(0)
    net = build_model(config)
    mean, std = net.normalization
    meta = CheckpointMeta(
        model_config=config.to_dict(),
        class_names=class_names,
        class_roles=ClassRoles.infer(class_names).to_dict(),
        target_mpp=target_mpp,
        tile_size_px=tile_size_px,
        input_size_px=config.input_size_px,
        mean=list(mean),
        std=list(std),
    )
    return save_checkpoint(path, net.state_dict(), meta)
