"""Jain et al.'s mitigation: classifier-free guidance only after the transition out of the attraction basin, and
opposite guidance before it.

Jain et al., "Classifier-Free Guidance inside the Attraction Basin May Cause Memorization" (CVPR 2025), official
code ``SonyResearch/mitigating_memorization``. Each step's noise prediction is ``eps_u + s * (eps_c - eps_u)`` with
a guidance scale ``s`` that depends on whether the transition has happened:

- static transition point (``generate_test_dataset_stp.py``): ``s = before`` while the timestep ``t >
  transition_t``, ``s = after`` from ``t <= transition_t`` on. README commands: ``before = 0``, ``transition_t =
  500``, ``after = 7.5``; with opposite guidance ``before = -2``, ``transition_t = 650``; ImageNette 600 or 700;
- dynamic transition point (``generate_test_dataset_dtp.py``): the transition is the first step whose guidance
  magnitude ``||eps_c - eps_u||`` rose again after falling (``d_j > d_{j-1} < d_{j-2}``), detected online;
  ``s = 1`` (the conditional prediction alone) before it, ``s = 7.5`` from that step on;
- opposite guidance with a dynamic transition point (``generate_test_dataset-opposite_guidance.py``): a first,
  probing pass with opposite guidance ``s = -g`` at every step records ``1 - cos(x_{t-1}, x_t)`` of consecutive
  latents; the transition step is its first local minimum (the second when the first is step 1; step 5 when there is
  none); the generation then uses ``s = -g`` before that step and ``s = g`` from it on (g = 7.5).

What the official scripts do besides, and be-bench does not (docs/protocols.md): at the static transition
timestep, and at the dynamic one of the opposite-guidance script, the scheduler switches to a 200-step grid for the
rest of the trajectory; the opposite-guidance script as committed flips the sign of its scale at every step
before the transition (``guidance_scale = -guidance_scale``) and exits at the transition (``exit(0)``, a debugging
leftover); here the scale before the transition is ``-g`` at every step, as the paper describes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.signal import argrelextrema

from benchmark.core.config_types import Timestep
from benchmark.mitigation.interface import Intervention
from benchmark.models.text_to_image import TextToImage
from benchmark.registry import MITIGATIONS
from benchmark.sampling.capture import SamplingSetup, ddim_step, guided_eps

RULES = ("static", "dynamic", "opposite_dynamic")
NO_MINIMUM_STEP = 5  # generate_test_dataset-opposite_guidance.py: the transition step when the probe has no minimum


@dataclass(frozen=True)
class TransitionGuidance:
    """The official knobs. ``rule``: one of :data:`RULES`. ``before`` / ``after``: the guidance scales before and
    from the transition (``opposite_dynamic`` uses ``-after`` before, ``before`` is then unused and must be its
    default). ``transition_t`` (static only): the timestep in [0, num_train_timesteps) at and below which ``after``
    applies; the strength axis of the static rule, LOWER is stronger (more steps without full guidance)."""

    rule: str = "static"
    before: float = 0.0
    after: float = 7.5
    transition_t: int = 500

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"mitigation jain: unknown transition rule {self.rule!r}; choose from {', '.join(RULES)}")
        if not all(np.isfinite([self.before, self.after])):
            raise ValueError(f"mitigation jain: guidance scales must be finite, got before={self.before}, "
                             f"after={self.after}")
        if self.rule == "static" and not 0 <= self.transition_t < 1000:
            raise ValueError(f"mitigation jain: transition_t must be in [0, 1000), got {self.transition_t}")
        if self.rule != "static" and self.transition_t != 500:
            raise ValueError(f"mitigation jain ({self.rule}): transition_t is the static rule's, got "
                             f"{self.transition_t}")
        if self.rule == "opposite_dynamic" and self.before != 0.0:
            raise ValueError(f"mitigation jain (opposite_dynamic): the scale before the transition is -after; "
                             f"before must stay unset, got {self.before}")

    @property
    def tag(self) -> str:
        """Store-key part: the rule and every scale and point it reads."""
        if self.rule == "static":
            return f"jain-stp{self.transition_t}-b{self.before:g}-a{self.after:g}"
        if self.rule == "dynamic":
            return f"jain-dtp-b{self.before:g}-a{self.after:g}"
        return f"jain-ogdtp-g{self.after:g}"


# The official commands (README.md; the dynamic scripts hard-code their scales).
OFFICIAL = {
    "static": TransitionGuidance("static", before=0.0, after=7.5, transition_t=500),
    "static_opposite": TransitionGuidance("static", before=-2.0, after=7.5, transition_t=650),
    "dynamic": TransitionGuidance("dynamic", before=1.0, after=7.5),
    "opposite_dynamic": TransitionGuidance("opposite_dynamic", after=7.5),
}


def static_scale(t: int, settings: TransitionGuidance) -> float:
    """The static rule's scale at timestep ``t``: ``before`` while ``t > transition_t``, else ``after``
    (generate_test_dataset_stp.py)."""
    return settings.before if t > settings.transition_t else settings.after


def dynamic_transition_reached(magnitudes: torch.Tensor) -> torch.Tensor:
    """(n,) bool: whether each image's transition has happened by the latest step, from its guidance magnitudes so
    far ``magnitudes`` (steps so far, n), ``||eps_c - eps_u||`` per image and step. The transition is the first step
    j >= 2 with ``d_j > d_{j-1}`` and ``d_{j-2} > d_{j-1}`` (generate_test_dataset_dtp.py, where the magnitude is
    ``torch.norm`` over its batch of one image); once reached it stays reached."""
    if len(magnitudes) < 3:
        return torch.zeros(magnitudes.shape[1:], dtype=torch.bool, device=magnitudes.device)
    d = magnitudes
    return ((d[2:] > d[1:-1]) & (d[:-2] > d[1:-1])).any(0)


def latent_change(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """(n,) ``1 - cos`` between each image's consecutive latents (n, c, h, w), flattened (the opposite-guidance
    probe's ``diffs``)."""
    return 1 - torch.nn.functional.cosine_similarity(current.flatten(1).float(), previous.flatten(1).float(), dim=1)


def opposite_transition_step(changes: Sequence[float]) -> int:
    """The transition step from one image's probe ``changes`` (one per step): the first strict local minimum
    (scipy's ``argrelextrema(np.less)``, endpoints excluded), the second when the first is step 1 and there is a
    second, :data:`NO_MINIMUM_STEP` when there is none (generate_test_dataset-opposite_guidance.py)."""
    minima = argrelextrema(np.asarray(changes, dtype=np.float64), np.less)[0]
    if len(minima) == 0:
        return NO_MINIMUM_STEP
    return int(minima[1] if minima[0] == 1 and len(minima) >= 2 else minima[0])


@torch.no_grad()
def probe_transition_steps(model: TextToImage, latents: torch.Tensor, context: torch.Tensor, steps: int,
                           guidance: float) -> torch.Tensor:
    """(n,) each image's transition step for ``opposite_dynamic``: a DDIM pass (eta = 0) over ``steps`` steps with
    opposite guidance ``eps_u - guidance * (eps_c - eps_u)`` from the initial ``latents`` (n, c, h, w), ``context``
    the CFG embeddings (2n, tokens, dim, unconditional half first), then :func:`opposite_transition_step` on each
    image's latent changes. Costs one full guided pass (2 UNet evaluations per image and step)."""
    scheduler = model.scheduler
    scheduler.set_timesteps(steps)
    changes = []
    for t in scheduler.timesteps.tolist():
        eps_u, eps_c = guided_eps(model, latents, torch.tensor(t, device=latents.device), context)
        following = ddim_step(scheduler, eps_u - guidance * (eps_c - eps_u), t, latents, 0.0, None)
        changes.append(latent_change(latents, following))
        latents = following
    changes = torch.stack(changes).cpu().numpy()  # (steps, n)
    return torch.tensor([opposite_transition_step(changes[:, i]) for i in range(changes.shape[1])])


def transition_scales(settings: TransitionGuidance, step: int, t: int, magnitudes: torch.Tensor | None = None,
                      transition_steps: torch.Tensor | None = None) -> torch.Tensor | float:
    """The guidance scale of each image at 0-based ``step`` (timestep ``t``): a float for ``static``; (n,) for
    ``dynamic`` from ``magnitudes`` (steps 0..step, n), the guidance magnitudes including this step's; (n,) for
    ``opposite_dynamic`` from the probe's ``transition_steps`` (n,). Raises ValueError when the rule's input is
    missing."""
    if settings.rule == "static":
        return static_scale(t, settings)
    if settings.rule == "dynamic":
        if magnitudes is None or len(magnitudes) != step + 1:
            raise ValueError(f"mitigation jain (dynamic): needs the guidance magnitudes of steps 0..{step}")
        reached = dynamic_transition_reached(magnitudes)
        return torch.where(reached, settings.after, settings.before).to(magnitudes.dtype)
    if transition_steps is None:
        raise ValueError("mitigation jain (opposite_dynamic): needs the probe's transition steps")
    return torch.where(transition_steps <= step, settings.after, -settings.after).float()


def transition_intervention(settings: TransitionGuidance) -> Intervention:
    """The guidance hook of ``settings``: each step's prediction ``eps_u + s (eps_c - eps_u)`` with the rule's
    scale per image. ``dynamic`` keeps each image's guidance magnitudes of the steps so far (a fresh intervention
    per sampling call); ``opposite_dynamic`` runs its probe before the loop (outside capture, so the trace holds the
    generation alone) from the same initial noise, which it leaves unchanged. Reports ``transition_step`` per image
    in ``stats`` (the static rule: the first step at or below ``transition_t``)."""
    state: dict = {"magnitudes": []}
    out = Intervention()

    def probe(setup: SamplingSetup) -> torch.Tensor:
        steps = probe_transition_steps(setup.model, setup.latents, setup.context, len(setup.steps), settings.after)
        state["transition"] = steps.to(setup.latents.device)
        out.stats["transition_step"] = steps.numpy().astype(np.float64)
        return setup.latents

    def guidance(setup: SamplingSetup, step: int, t: int, latents: torch.Tensor, eps_u: torch.Tensor,
                 eps_c: torch.Tensor) -> torch.Tensor:
        delta = eps_c - eps_u
        if settings.rule == "dynamic":
            state["magnitudes"].append(delta.flatten(1).float().norm(dim=1))
        magnitudes = torch.stack(state["magnitudes"]) if state["magnitudes"] else None
        scale = transition_scales(settings, step, t, magnitudes, state.get("transition"))
        if settings.rule == "static" and "transition_step" not in out.stats and scale == settings.after:
            out.stats["transition_step"] = np.full(len(eps_u), float(step))
        if settings.rule == "dynamic":
            first = out.stats.setdefault("transition_step", np.full(len(eps_u), np.nan))
            first[np.isnan(first) & (scale == settings.after).cpu().numpy()] = step
        if isinstance(scale, torch.Tensor):
            scale = scale.to(delta.device, delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
        return eps_u + scale * delta

    out.guidance = guidance
    if settings.rule == "opposite_dynamic":
        out.latents = probe
    return out


_JAIN = {"acts_on": "guidance", "needs_mask": False}


@MITIGATIONS.register("jain_stp", label="Jain et al. (static transition)", strength="transition_t",
                      stronger="lower", strengths=(500,), tag=lambda k: TransitionGuidance("static", **k).tag, **_JAIN)
def jain_stp(transition_t: Timestep = 500, before: float = 0.0, after: float = 7.5) -> Intervention:
    """Static transition point (generate_test_dataset_stp.py, README: 0 before timestep 500, 7.5 after)."""
    return transition_intervention(TransitionGuidance("static", float(before), float(after), int(transition_t)))


@MITIGATIONS.register("jain_stp_og", label="Jain et al. (opposite guidance, static transition)",
                      strength="transition_t", stronger="lower", strengths=(650,),
                      tag=lambda k: TransitionGuidance("static", **k).tag, **_JAIN)
def jain_stp_og(transition_t: Timestep = 650, before: float = -2.0, after: float = 7.5) -> Intervention:
    """Opposite guidance with a static transition point (README: -2 before timestep 650, 7.5 after)."""
    return transition_intervention(TransitionGuidance("static", float(before), float(after), int(transition_t)))


@MITIGATIONS.register("jain_dtp", label="Jain et al. (dynamic transition)",
                      tag=lambda k: TransitionGuidance("dynamic", **k).tag, **_JAIN)
def jain_dtp(before: float = 1.0, after: float = 7.5) -> Intervention:
    """Dynamic transition point (generate_test_dataset_dtp.py: 1 before the transition, 7.5 from it on); the
    official has no strength knob."""
    return transition_intervention(TransitionGuidance("dynamic", float(before), float(after)))


@MITIGATIONS.register("jain_dtp_og", label="Jain et al. (opposite guidance, dynamic transition)",
                      tag=lambda k: TransitionGuidance("opposite_dynamic", **k).tag, **_JAIN)
def jain_dtp_og(after: float = 7.5) -> Intervention:
    """Opposite guidance with a dynamic transition point (generate_test_dataset-opposite_guidance.py: a probe pass
    with -7.5, then -7.5 before its transition step and 7.5 from it on): one extra guided pass per image."""
    return transition_intervention(TransitionGuidance("opposite_dynamic", after=float(after)))
