"""Measurement helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import threading
import time


def load_text() -> str:
    """The machine's load average (1, 5, 15 min) beside its core count, for judging a figure:
    a load above the cores means other jobs shared them during the measurement."""
    one, five, fifteen = os.getloadavg()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {cores} cores"


def print_load(when: str) -> None:
    print(f"machine {when}: {load_text()}", flush=True)


def _smaps_rollup(pid: int) -> dict[str, int]:
    """Rss and Pss of one process in bytes (Pss splits shared pages among their sharers)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def tree_memory(pid: int) -> list[tuple[int, str, int, int]]:
    """(pid, command line, RSS bytes, PSS bytes) of a process and all its descendants."""
    rows, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/cmdline") as f:
                command = f.read().replace("\0", " ").strip()
            mem = _smaps_rollup(p)
            rows.append((p, command, mem.get("Rss", 0), mem.get("Pss", 0)))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return rows


def role(command: str) -> str:
    """What a process of a histoduo run is, from its command line."""
    if "forkserver" in command:
        return "fork server + workers"  # a forkserver child keeps the server's command line
    if "resource_tracker" in command:
        return "resource tracker"
    if "multiprocessing" in command or "spawn_main" in command:
        return "worker"
    return "main"


def peak_tree_memory(cmd: list[str], interval_s: float = 0.05) -> dict[str, object]:
    """Run ``cmd``; its process tree's peak memory, sampled every interval, as a dict:
    ``rss_gib`` (peak of the summed RSS: shared pages such as torch's libraries count once
    per process), ``pss_gib`` (peak of the summed PSS: what the tree really takes) and
    ``roles`` ({role: (RSS GiB, PSS GiB)} in the sample where the RSS sum peaked).
    The fork server's children are its descendants, so a forkserver worker is counted."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_rss = peak_pss = 0
    at_peak: list[tuple[int, str, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss, at_peak
        while not done.is_set():
            rows = tree_memory(proc.pid)
            rss, pss = sum(r[2] for r in rows), sum(r[3] for r in rows)
            if rss > peak_rss:
                peak_rss, at_peak = rss, rows
            peak_pss = max(peak_pss, pss)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()}")
    roles: dict[str, tuple[float, float]] = {}
    for _, command, rss, pss in at_peak:
        r, p = roles.get(role(command), (0.0, 0.0))
        roles[role(command)] = (r + rss / 2**30, p + pss / 2**30)
    return {"rss_gib": peak_rss / 2**30, "pss_gib": peak_pss / 2**30, "roles": roles}


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
