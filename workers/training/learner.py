"""The Learner: a model, its layer groups, the optimizer and the loss, on a device.

Like fastai's Learner, the optimizer is rebuilt whenever what trains changes
(freeze/unfreeze resets Adam's state) and otherwise carries over between
stages.  AdamW with betas (0.9, 0.99) *is* fastai's ``true_wd``: it multiplies
each parameter by (1 - lr·wd) before the Adam step, BatchNorm and biases
included (``bn_wd=True``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.training import oom
from workers.training.models import layer_groups, param_groups, set_trainable

ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


@dataclass
class Precision:
    """One mixed-precision path: autocast dtype (None = fp32) and a scaler for fp16."""

    name: str
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def choose(cls, requested: str, device: torch.device) -> Precision:
        """``auto`` = bf16 on a CUDA device that supports it, else fp32."""
        name = requested
        if requested == "auto":
            cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            name = "bf16" if cuda_bf16 else "fp32"
        if name == "fp16" and device.type != "cuda":
            name = "fp32"  # fp16 autocast is a GPU feature; CPUs train in fp32
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")
        return cls(name, dtype, scaler)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        """The forward pass's context: autocast, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


@dataclass
class Learner:
    """What training needs, in one place (the unwrapped model is ``core``)."""

    core: nn.Sequential
    arch: str
    device: torch.device
    multi_label: bool
    precision: Precision
    model: nn.Module = field(init=False)
    groups: list[list[nn.Module]] = field(init=False)
    optimizer: torch.optim.Optimizer | None = None
    train_mode: str | None = None
    wd: float = 1e-2
    oom_at_batch: int | None = None  # test hook: see workers.training.oom

    def __post_init__(self) -> None:
        self.core.to(self.device)
        if self.device.type == "cuda":
            self.core.to(memory_format=torch.channels_last)
            # Fixed image sizes: let cuDNN pick the fastest kernels once.
            torch.backends.cudnn.benchmark = True
        self.model = self.core
        self.groups = layer_groups(self.core, self.arch)

    def wrap(self, wrapper: nn.Module) -> None:
        """Use a wrapper (DDP) for forward passes; ``core`` stays the unwrapped model."""
        self.model = wrapper

    def set_train(self, train: str, *, wd: float) -> bool:
        """Freeze or unfreeze; build a new optimizer when that changed. True if rebuilt."""
        if self.optimizer is not None and self.train_mode == train and self.wd == wd:
            return False
        set_trainable(self.groups, train)
        self.train_mode = train
        self.wd = wd
        self.optimizer = self._new_optimizer(wd)
        return True

    def _new_optimizer(self, wd: float) -> torch.optim.Optimizer:
        groups = [{"params": params} for params in param_groups(self.groups)]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(
            groups, lr=1e-3, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=wd, fused=fused
        )

    def set_hyper(self, lrs: Sequence[float], momentum: float) -> None:
        """Per layer group lr (2 optimizer groups each) and Adam's beta1."""
        assert self.optimizer is not None
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lrs[index // 2]
            group["betas"] = (momentum, ADAM_BETAS[1])

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean"
    ) -> torch.Tensor:
        """Cross-entropy, or BCE-with-logits for multi-label (mean over N x C)."""
        logits = logits.float()
        if self.multi_label:
            if reduction == "sum":
                return (
                    F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
                    .mean(dim=1)
                    .sum()
                )
            return F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
        return F.cross_entropy(logits, targets, reduction=reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The (wrapped) model under the precision's autocast."""
        oom.simulate(int(x.shape[0]), self.oom_at_batch)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self.precision.autocast(self.device):
            out: torch.Tensor = self.model(x)
        return out

    def trainable_parameters(self) -> int:
        """How many parameters the current optimizer updates."""
        return sum(p.numel() for p in self.core.parameters() if p.requires_grad)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode and no grad, restoring train mode afterwards.

        Forward passes use the bare model meanwhile: under DDP each rank
        evaluates its own share, and the wrapper's hooks (buffer broadcasts)
        must not turn that into collectives the other ranks never join.
        """
        was_training = self.core.training
        wrapped = self.model
        self.core.eval()
        self.model = self.core
        try:
            with torch.inference_mode():
                yield
        finally:
            self.model = wrapped
            self.core.train(was_training)
