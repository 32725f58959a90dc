"""The sampler's settings, one frozen type for every consumer.

`SamplerSettings` (DDIM steps, τ, thermal classes, variant, and the `NoiseSchedule`
the denoisers were trained with) is written into every pipeline checkpoint
(``payload["sampler"]``, as `to_dict`) and read back with `from_mapping` by the
inference runner, the evaluation, MLflow logging and the importer. Its field defaults
are the project's only defaults for these values. MKF training builds it from its
config plus the schedule of the IKR/CKG checkpoints (`NoiseSchedule.of_denoiser`),
and refuses two denoisers trained on different schedules (`NoiseSchedule.common`).

Older pipeline files carry a plain dict without ``schedule`` (the tiny pipelines
before this type) or with the schedule keys at the top level (the importer's
``num_train_steps``/``beta_start``/``beta_end``); both read as the default schedule
or those values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from magicfuse.data.classes import THERMAL_CLASSES
from magicfuse.diffusion.schedule import BETA_END, BETA_START, NUM_TRAIN_STEPS, DDIMSchedule, make_ddim_schedule
from magicfuse.errors import ConfigError

VARIANTS: tuple[str, ...] = ("full", "model1", "model2", "model3", "model4")
SCHEDULE_KEYS: tuple[str, ...] = ("num_train_steps", "beta_start", "beta_end")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a denoiser: β linear from `beta_start` to `beta_end`
    over `num_train_steps` steps (`magicfuse.diffusion.schedule`)."""

    num_train_steps: int = NUM_TRAIN_STEPS
    beta_start: float = BETA_START
    beta_end: float = BETA_END

    def __post_init__(self) -> None:
        if isinstance(self.num_train_steps, bool) or not isinstance(self.num_train_steps, int) \
                or self.num_train_steps < 1:
            raise ConfigError(f"schedule.num_train_steps must be an integer >= 1, got {self.num_train_steps!r}")
        if not 0.0 < float(self.beta_start) <= float(self.beta_end) < 1.0:
            raise ConfigError(f"schedule: need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, *, where: str = "schedule") -> "NoiseSchedule":
        m = dict(m or {})
        unknown = sorted(set(m) - set(SCHEDULE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; expected some of {list(SCHEDULE_KEYS)}")
        try:
            return cls(num_train_steps=_int(m.get("num_train_steps", NUM_TRAIN_STEPS), f"{where}.num_train_steps"),
                       beta_start=float(m.get("beta_start", BETA_START)), beta_end=float(m.get("beta_end", BETA_END)))
        except (TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def of_denoiser(cls, train_config: Mapping[str, Any] | None) -> "NoiseSchedule":
        """The schedule a denoiser checkpoint was trained with (its ``train_config``; the
        default schedule when the file has none, e.g. an imported official checkpoint)."""
        tc = dict(train_config or {})
        return cls.from_mapping({k: tc[k] for k in SCHEDULE_KEYS if k in tc})

    @staticmethod
    def common(schedules: Mapping[str, "NoiseSchedule"]) -> "NoiseSchedule":
        """The one schedule shared by the named denoisers; ConfigError naming them if they differ."""
        distinct = set(schedules.values())
        if len(distinct) != 1:
            listing = ", ".join(f"{name}: {s.describe()}" for name, s in schedules.items())
            raise ConfigError(f"the denoisers were trained on different noise schedules ({listing}); "
                              "the joint sampler needs one schedule: retrain one of them")
        return next(iter(distinct))

    def describe(self) -> str:
        return f"{self.num_train_steps} steps, beta {self.beta_start:g}..{self.beta_end:g}"

    def ddim(self, steps: int, device: torch.device | str | None = None) -> DDIMSchedule:
        """The `steps`-step DDIM schedule over this training schedule."""
        return make_ddim_schedule(steps, self.num_train_steps, self.beta_start, self.beta_end, device=device)


@dataclass(frozen=True)
class SamplerSettings:
    """How a pipeline samples: `steps` DDIM steps, τ of eq. 11, the thermal class ids
    (MFNet ids; default car and person), the sampler `variant`, the noise schedule and
    `init_noise_scale`, the standard deviation of the starting latent z_T (1 = the paper's
    z_T ~ N(0, I); below 1, "reduced-temperature" sampling: z_T = init_noise_scale · N(0, I),
    fewer invented details, measured in docs/QUALITY.md)."""

    steps: int = 25
    tau: float = 0.4
    thermal_classes: tuple[int, ...] = THERMAL_CLASSES
    variant: str = "full"
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    init_noise_scale: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"sampler steps must be an integer >= 1, got {self.steps!r}")
        if self.steps > self.schedule.num_train_steps:
            raise ConfigError(f"sampler steps ({self.steps}) exceed the schedule's "
                              f"{self.schedule.num_train_steps} training steps")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"sampler tau must be a number in [0, 1], got {self.tau!r}")
        if not isinstance(self.thermal_classes, tuple) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in self.thermal_classes):
            raise ConfigError(f"sampler thermal_classes must be a tuple of class ids >= 0, got {self.thermal_classes!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"sampler variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        check_init_noise_scale(self.init_noise_scale, "sampler init_noise_scale")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None, *, where: str = "sampler") -> "SamplerSettings":
        """Settings from a checkpoint's or a config's dict (see the module docstring for the
        older layouts it accepts); unknown keys are a ConfigError naming `where`."""
        m = dict(m or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(m) - known - set(SCHEDULE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown sampler setting(s) {unknown}; expected some of {sorted(known)}")
        flat = {k: m.pop(k) for k in SCHEDULE_KEYS if k in m}
        nested = m.pop("schedule", None)
        if flat and nested is not None:
            raise ConfigError(f"{where}: give the schedule either as 'schedule' or as top-level keys, not both")
        if isinstance(nested, NoiseSchedule):
            schedule = nested
        elif nested is None or isinstance(nested, Mapping):
            schedule = NoiseSchedule.from_mapping(nested if nested is not None else flat, where=f"{where}.schedule")
        else:
            raise ConfigError(f"{where}.schedule must be a mapping, got {type(nested).__name__}")
        try:
            kw: dict[str, Any] = {}
            if "steps" in m:
                kw["steps"] = _int(m["steps"], f"{where}.steps")
            if "tau" in m:
                kw["tau"] = float(m["tau"])
            if "thermal_classes" in m:
                tc = m["thermal_classes"]
                tc = [tc] if isinstance(tc, int) else tc
                kw["thermal_classes"] = tuple(_int(c, f"{where}.thermal_classes") for c in tc)
            if "variant" in m:
                kw["variant"] = str(m["variant"])
            if "init_noise_scale" in m:  # absent in pipelines written before it existed: the paper's 1
                kw["init_noise_scale"] = check_init_noise_scale(m["init_noise_scale"], f"{where}.init_noise_scale")
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
        try:
            return cls(schedule=schedule, **kw)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (checkpoints load with ``weights_only=True``)."""
        return {"steps": self.steps, "tau": float(self.tau), "thermal_classes": list(self.thermal_classes),
                "variant": self.variant, "schedule": dataclasses.asdict(self.schedule),
                "init_noise_scale": float(self.init_noise_scale)}

    def replace(self, **changes: Any) -> "SamplerSettings":
        """A copy with some fields changed (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "thermal_classes" in changes:
            changes["thermal_classes"] = tuple(int(c) for c in changes["thermal_classes"])
        return dataclasses.replace(self, **changes)

    def ddim(self, device: torch.device | str | None = None, steps: int | None = None) -> DDIMSchedule:
        """The DDIM schedule these settings sample with (`steps` overrides the step count)."""
        return self.schedule.ddim(self.steps if steps is None else int(steps), device)


def check_init_noise_scale(value: Any, where: str) -> float:
    """`value` as the z_T scale in [0, 1]; ConfigError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{where} must be a number in [0, 1] (1 = the paper's z_T ~ N(0, I)), got {value!r}")
    return float(value)


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{where}: expected an integer, got {v!r}")
    return int(v)
