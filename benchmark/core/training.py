"""What the suite's trainers share (testbed, DDPM): AdamW with warm-up and cosine decay, gradient clipping, EMA,
one seeded generator for all randomness, and a checkpoint beside the output folder, so that an interrupted run
resumes to exactly the weights of an uninterrupted one."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel


class Trainer:
    def __init__(self, model: torch.nn.Module, steps: int, lr: float, warmup: int, ema_decay: float, seed: int,
                 checkpoint: Path, checkpoint_every: int, counters: tuple[str, ...] = ()):
        self.model, self.steps, self.checkpoint, self.every = model, steps, Path(checkpoint), checkpoint_every
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / steps))))
        self.ema = EMAModel(model.parameters(), decay=ema_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.counters = {name: 0 for name in counters}  # e.g. samples dropped, kept across resumption
        if self.checkpoint.exists():
            state = torch.load(self.checkpoint, weights_only=False)  # our own file, written by save()
            self.model.load_state_dict(state["unet"])
            for part in ("optimizer", "schedule", "ema"):
                getattr(self, part).load_state_dict(state[part])
            self.generator.set_state(state["generator"])
            self.step = state["step"]
            self.counters = {name: state.get(name, 0) for name in counters}

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.ema.step(self.model.parameters())
        self.step += 1
        if self.step % self.every == 0 or self.done:
            self.save()

    def save(self) -> None:
        state = {"unet": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict(),
                 "generator": self.generator.get_state(), "step": self.step, **self.counters}
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint)

    @contextmanager
    def ema_weights(self):
        """The EMA weights in the model for the block (e.g. to save a snapshot), the trained ones after it."""
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        try:
            yield self.model
        finally:
            self.ema.restore(self.model.parameters())

    def finish(self) -> torch.nn.Module:
        """The model with its EMA weights, for saving."""
        self.ema.copy_to(self.model.parameters())
        return self.model.eval()
