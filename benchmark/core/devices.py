"""Which device a job runs on: one GPU per job on a multi-GPU node, the GPU that SLURM gave it, or the CPU."""
from __future__ import annotations


def pick_device(requested: str, job_num: int = 0, n_gpus: int | None = None) -> str:
    """``auto``: GPU ``job_num % n_gpus`` when GPUs are visible, else ``cpu``; anything else is kept as is.

    Under SLURM each job sees only its own GPU (CUDA_VISIBLE_DEVICES), so n_gpus is 1 and every job takes cuda:0.
    """
    if requested != "auto":
        return requested
    if n_gpus is None:
        import torch

        n_gpus = torch.cuda.device_count()
    return f"cuda:{job_num % n_gpus}" if n_gpus else "cpu"
