"""Layer 0 (base): Load options (imports retry and errors): the one definition of every load knob, its default and the
values it accepts.

Everything else is built from :class:`LoadOptions` (the model: vLLM hands one ``LoadConfig`` to every loader):
- the keyword defaults of :func:`~raydist_loader.api.load_across_cluster` and ``load_shard`` read :data:`DEFAULTS`;
- the YAML ``load:`` section (:class:`~raydist_loader.config.LoadSection`) is a subclass, so its keys, defaults and
  checks are these;
- ``raydist-loader load`` makes one flag per field (``max_restarts`` -> ``--max-restarts``) with its choices, bounds
  and help taken from here.
A test checks that each knob round-trips through YAML and the CLI and that no entry point has its own default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .retry import RetryPolicy
from .validation import format_validation_error

__all__ = ["VERSION_PATTERN", "MAX_TP", "MAX_CONCURRENCY", "Device", "Placement", "Verify", "DEVICES", "PLACEMENTS",
           "RetriesOptions",
           "LoadOptions", "DEFAULTS", "check_range", "MAX_PART_BYTES",
           "load_options"]

Device = Literal["auto", "cpu", "cuda"]
Placement = Literal["pack", "spread", "strict_pack", "strict_spread"]
Verify = Union[bool, Literal["full"]]  # noqa: UP007 - a runtime alias (Python 3.10's | cannot take a Literal here)

DEVICES: tuple[str, ...] = get_args(Device)
#: placement name -> Ray's placement-group strategy
PLACEMENTS: dict[str, str] = {name: name.upper() for name in get_args(Placement)}

_RETRY = RetryPolicy()  # the defaults of retries.* are RetryPolicy's own

# Upper bounds of the numeric knobs (a value past them is a typo or an attack, never a setting: 10**30 requests in
# flight would never finish; 1000 pinned staging buffers exhaust a GPU host's memory before the first read).
MAX_TP = 1024  #: tensor-parallel size (a manifest's max_tp is bounded the same)
MAX_CONCURRENCY = 1024  #: requests in flight per actor
MAX_REPLICAS = 1024  #: data-parallel copies
MAX_CPUS = 1024.0  #: CPUs one actor reserves
MAX_RESTARTS = 100  #: restarts of one rank
MAX_ATTEMPTS = 100  #: tries of one request batch
MAX_DELAY_S = 3600.0  #: one backoff
MAX_WAIT_S = 7 * 86400.0  #: any timeout or deadline (a week)
#: a version id: ``vYYYYmmddHHMMSSmmm-<8 hex>`` (UTC publish time, milliseconds): ids sort in publish order
VERSION_PATTERN = r"^v\d{17}-[0-9a-f]{8}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RetriesOptions(_Model):
    """``retries``: how transient backend errors (resets, timeouts, Redis LOADING/BUSY, S3 5xx/SlowDown) are
    retried: exponential backoff with full jitter, at most ``attempts`` tries and ``deadline_s`` seconds per request
    batch. Permanent errors (auth, missing key, bad manifest) are never retried."""

    attempts: int = Field(default=_RETRY.attempts, strict=True, ge=1, le=MAX_ATTEMPTS,
                          description="tries per request batch")
    base_delay_s: float = Field(default=_RETRY.base_delay_s, ge=0, le=MAX_DELAY_S,
                                description="first backoff (doubles per retry)")
    max_delay_s: float = Field(default=_RETRY.max_delay_s, ge=0, le=MAX_DELAY_S, description="longest backoff")
    deadline_s: float = Field(default=_RETRY.deadline_s, gt=0, le=MAX_WAIT_S,
                              description="no retry starts after this long")

    def policy(self) -> RetryPolicy:
        return RetryPolicy(**self.model_dump())


class LoadOptions(_Model):
    """How every rank of a load runs: where, how many requests in flight, what is verified, and the time and
    retry bounds. Field descriptions are the CLI's help."""

    device: Device = Field(default="auto", description="where tensors land; auto: GPU bundles when the cluster "
                           "has tp GPUs, cuda inside an actor that sees one")
    placement: Placement = Field(default="pack", description="placement-group strategy for the tp bundles")
    replicas: int = Field(default=1, strict=True, ge=1, le=MAX_REPLICAS,
                          description="data-parallel copies of the TP group, one "
                          "placement group each; the store is read once and the copies share the bytes through "
                          "Ray's object store, every copy verified")
    concurrency: int | None = Field(default=None, strict=True, ge=1, le=MAX_CONCURRENCY,
                                    description="requests in flight per actor")
    verify: Verify = Field(default=True, description='true: hash chunks as they land; "full": also re-hash the '
                           "final device tensors; false: no check")
    num_cpus_per_actor: float = Field(default=0.25, ge=0, le=MAX_CPUS,
                                      description="CPUs each actor reserves (keep small on "
                                      "small machines: a default actor reserves 1)")
    timeout_s: float = Field(default=600.0, gt=0, le=MAX_WAIT_S,
                             description="seconds the pull may take once actors are up")
    placement_timeout_s: float = Field(default=60.0, gt=0, le=MAX_WAIT_S,
                                       description="seconds to wait for the placement group")
    actor_start_timeout_s: float = Field(default=120.0, gt=0, le=MAX_WAIT_S,
                                         description="seconds for every actor to start "
                                         "(a cold node importing torch and initialising CUDA can take a minute)")
    max_restarts: int = Field(default=1, strict=True, ge=0, le=MAX_RESTARTS,
                              description="times a rank whose actor died mid-load is restarted in its bundle")
    model_version: str | None = Field(default=None, pattern=VERSION_PATTERN,
                                      description="load this version of the model (`raydist-loader versions` "
                                      "lists them), current or not; unset: the current version")
    retries: RetriesOptions = Field(default_factory=RetriesOptions,
                                    description="transient backend errors: attempts, base_delay_s, max_delay_s, "
                                    "deadline_s")

    @field_validator("verify", mode="before")
    @classmethod
    def _verify(cls, value: Any) -> Any:
        if isinstance(value, bool) or value == "full":
            return value
        raise ValueError('expected true, false or "full"')

    @field_validator("retries", mode="before")
    @classmethod
    def _retries(cls, value: Any) -> Any:
        if value is None:
            return {}
        return asdict(value) if isinstance(value, RetryPolicy) else value


MAX_PART_BYTES = 1 << 40  #: a publish's part size, a recorded file's size cap


def check_range(where: str, value: Any, low: int, high: int) -> int:
    """An integer argument outside the load options (publish's ``max_tp``, ``part_bytes``, ``concurrency``,
    verify's ``concurrency``) checked as they are: one error naming it, the value and its range."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        raise ConfigError(f"{where}: got {shown}; expected an integer in [{low}, {high}]")
    return value


#: The defaults, for keyword defaults elsewhere (``device: str = DEFAULTS.device``).
DEFAULTS = LoadOptions()


def load_options(values: Mapping[str, Any], where: str = "load options") -> LoadOptions:
    """Validated options from keyword arguments; a bad value is one :class:`ConfigError` naming the key."""
    try:
        return LoadOptions.model_validate(dict(values))
    except ValidationError as e:
        raise ConfigError(format_validation_error(where, e, LoadOptions)) from None
