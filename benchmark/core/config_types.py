"""The value types of config settings (pydantic ``Annotated`` constraints), shared by the job schema
(:mod:`benchmark.jobs.config`) and the dataclasses and registered functions whose fields are settings (a DDPM's or the
testbed's recipe, an extra pass's knobs, a prompt loader's arguments), so each setting's range is written once,
where the setting is defined."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

PositiveInt = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]  # torch.Generator.manual_seed's range, less the negative half
Fraction = Annotated[float, Field(ge=0, le=1)]
OpenFraction = Annotated[float, Field(gt=0, le=1)]  # a share that must leave something (a patch side, a ratio)
Rate = Annotated[float, Field(ge=0, lt=1)]  # a target false-positive rate
NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(min_length=1, pattern=r"\S")]  # a name, path or id: not empty, not only blanks
MaybeName = Annotated[str, Field(pattern=r"^(|.*\S.*)$")]  # a name, path or id, or "" for none: not only blanks
Timestep = Annotated[int, Field(ge=0, lt=1000)]  # a training timestep of the 1000-step schedules every model here has
Channels = Annotated[tuple[PositiveInt, ...], Field(min_length=1)]  # a UNet's block_out_channels
Kind = Literal["global", "local", "memorized", "none"]  # a prompt's kind of memorization (benchmark.data.prompts)
