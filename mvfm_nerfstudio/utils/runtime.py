"""Where and how torch runs: one device convention and scoped CPU thread counts.

Device names everywhere in the package (configs, CLIs, the feature store) are one of

* ``"auto"``: the CUDA GPU of this process when CUDA is available (``LOCAL_RANK``'s GPU
  under ``torchrun``), else the CPU;
* ``"cpu"``;
* ``"cuda"`` (this process's ``LOCAL_RANK`` GPU) or ``"cuda:N"``.

:func:`resolve_device` is the only place that turns such a name into a ``torch.device``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Union

import torch

__all__ = ["DEVICE_HELP", "DeviceLike", "resolve_device", "torch_threads", "single_threaded", "compute_precision",
           "join_torchrun"]

DEVICE_HELP = "'auto' (this process's CUDA GPU if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"

DeviceLike = Union[str, torch.device]


def resolve_device(name: Optional[DeviceLike] = "auto", default: Optional[DeviceLike] = None) -> torch.device:
    """Turn a device name (see the module docstring) into a ``torch.device``.

    Args:
        name: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``; None means ``"auto"``.
        default: what ``"auto"`` means when given (e.g. the device of the Nerfstudio trainer a
            feature store runs in); otherwise ``"auto"`` picks CUDA when available.

    Raises:
        ValueError: an unknown name, or CUDA asked for where it is not available.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = "auto" if name is None else str(name).strip()
    if name == "auto":
        if default is not None:
            return resolve_device(default)
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use 'cpu' or 'auto'")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        index = name.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", int(index))
    raise ValueError(f"unknown device {name!r}; use {DEVICE_HELP}")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` torch CPU threads inside the block (0 = leave unchanged); restores the previous count."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_precision(device: torch.device, bf16: bool = False):
    """Context for a model's forward (and loss) on ``device``.

    On CUDA: TF32 matrix products (``torch.set_float32_matmul_precision("high")``, process-wide: Nerfstudio's
    trainer does the same) and, with ``bf16``, bf16 autocast. On the CPU: nothing, and never bf16 (it is ~100x
    slower than fp32 on these CPUs). Camera maths stays in float64 on the CPU either way (the MVFM normalises
    cameras before anything reaches the device).
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    torch.set_float32_matmul_precision("high")
    if bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def single_threaded():
    """Run torch ops single-threaded inside the block (restores the thread count afterwards).

    The data layer's work is many small elementwise ops, which gain nothing from intra-op
    threads; on shared CPUs a 2-thread pool made them up to ~10x slower (threads waiting for
    each other while descheduled), so batch jobs (scene rendering, covisibility) use one thread.
    """
    return torch_threads(1)


def join_torchrun(device: torch.device) -> bool:
    """Join ``torchrun``'s process group (NCCL on CUDA, gloo on the CPU) when this process was started by it
    with ``WORLD_SIZE > 1`` and has not joined yet.

    Returns:
        Whether this call initialised the group (the caller then destroys it when done).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if device.type == "cuda":
        # NCCL uses the current device; this process owns the job here, so binding it is ours to do
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return True
