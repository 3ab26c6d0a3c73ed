"""Running out of GPU memory: recognising it, and a test hook that fakes it.

On a CUDA out-of-memory error the engine retries the epoch with half the
per-process micro-batch and twice the gradient accumulation, so the
effective (global) batch and the schedule stay what the spec asked for —
the notes' "a smaller bs when memory runs out", without changing the
optimisation.  :data:`MIN_MICRO_BATCH` is the floor.

Test hook (tests only, never set it in production): ``FITFLEET_TEST_OOM_AT_BATCH=N``
in the environment, or ``EngineOptions.oom_at_batch=N``, makes every training
forward pass on a micro-batch of N images or more raise
``torch.cuda.OutOfMemoryError`` (which works on CPU-only torch), so the OOM
path can be tested without a GPU.  Validation and prediction passes, which
run without gradients, are not affected.
"""

from __future__ import annotations

import gc
import math
import os

import torch

# Two, not one: in training mode BatchNorm needs more than one value per channel,
# and the fastai head's BatchNorm1d sees one value per image.
MIN_MICRO_BATCH = 2
TEST_HOOK_ENV = "FITFLEET_TEST_OOM_AT_BATCH"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA's OutOfMemoryError and for RuntimeErrors that say "out of memory"."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def micro_batch(per_rank: int, accumulate: int) -> int:
    """The largest micro-batch when ``per_rank`` images are split in ``accumulate`` parts."""
    return math.ceil(per_rank / max(1, accumulate))


def next_accumulate(per_rank: int, accumulate: int) -> int | None:
    """Accumulation after one more OOM (half the micro-batch), or None at the floor.

    At most ``per_rank // MIN_MICRO_BATCH`` parts, so that no micro-batch is
    smaller than :data:`MIN_MICRO_BATCH`.
    """
    most = max(1, per_rank // MIN_MICRO_BATCH)
    doubled = min(accumulate * 2, most)
    return doubled if doubled > accumulate else None


def hook_from_env() -> int | None:
    """``FITFLEET_TEST_OOM_AT_BATCH`` as an int, None when unset or empty."""
    raw = os.environ.get(TEST_HOOK_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{TEST_HOOK_ENV} must be an integer, not {raw!r}") from None
    return value


def simulate(size: int, limit: int | None) -> None:
    """The test hook: raise CUDA's OOM error when a training micro-batch is too big."""
    if limit is not None and size >= limit and torch.is_grad_enabled():
        raise torch.cuda.OutOfMemoryError(
            f"CUDA out of memory: a batch of {size} images (simulated by {TEST_HOOK_ENV}={limit})"
        )


def release_memory(device: torch.device) -> None:
    """Give back what a failed step held: garbage, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
