"""Typed configs. Dataclasses everywhere inside; command-line flags and YAML only at the edges.

Every field carries its help text in `metadata["help"]`, so a job's `--help` documents every flag and a tune
space can name any field. A field marked `flag=False` is no flag: the data decide it (a task resolves it from
the shards' manifest), and it travels in the config like every other setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cliptime.errors import CliptimeError

T = TypeVar("T")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies


def option(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with its help text (lists and tuples get a default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """What every task's training run shares: schedule, scale, checkpoints, tracking."""

    epochs: int = option(8, "training epochs")
    batch_size: int = option(64, "global batch of one optimizer step (split across workers and --grad-accum)")
    lr: float = option(1e-3, "peak learning rate (AdamW, cosine decay after a linear warm-up)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    warmup_fraction: float = option(0.05, "fraction of all steps spent in linear warm-up")
    grad_clip: float = option(1.0, "clip the global gradient norm to this value (0: off)")
    seed: int = option(0, "seed for model init, data order and augmentation")
    num_workers: int = option(1, "Ray Train workers (one process each; DDP when more than one)")
    use_gpu: bool = option(False, "one GPU per worker")
    amp: bool = option(True, "autocast (--amp-dtype) when training on GPUs (ignored on CPU)")
    amp_dtype: str = option("bfloat16", "autocast dtype: bfloat16, or float16 (with gradient scaling)")
    grad_accum: int = option(1, "micro-batches per optimizer step (--batch-size stays the global batch per step)")
    compile: bool = option(False, "torch.compile the model (slower first steps, faster after)")
    cpus_per_worker: int = option(2, "CPUs reserved per worker (its torch threads); the rest feed Ray Data")
    placement_strategy: str = option(
        "PACK", "where workers go: PACK (fewest nodes), SPREAD, or STRICT_SPREAD (each on its own node)"
    )
    max_failures: int = option(
        2,
        "when a worker or its node dies, restart from the last checkpoint up to this many times (-1: always)",
        negative=True,
    )
    init_from: str = option(
        "",
        "start from the model weights of a checkpoint folder (a run's checkpoint_*, local or s3://): fine-tuning, "
        "with the optimizer and the epochs started anew",
    )
    storage_path: str = option("~/ray_results", "where checkpoints and Ray results go (local dir, NFS or s3://)")
    name: str = option("", "run name under --storage-path (default: <task>-<timestamp>)")
    resume: str = option("", "resume the named run (or 'latest') from its last checkpoint", nargs="?", const="latest")
    experiment: str = option("cliptime", "MLflow experiment name")
    register: bool = option(True, "register the trained model in the MLflow model registry")

    def check(self) -> None:
        """Reject settings that Ray or the loop would only trip over after start-up, naming the flag."""
        check_not_negative(self)
        for name in ("epochs", "batch_size", "num_workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise CliptimeError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected 1 or more")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise CliptimeError(
                f"--placement-strategy {self.placement_strategy!r}: expected one of {', '.join(PLACEMENT_STRATEGIES)}"
            )
        if self.grad_accum < 1:
            raise CliptimeError(f"--grad-accum {self.grad_accum}: expected 1 or more micro-batches per step")
        if self.batch_size % (self.num_workers * self.grad_accum):
            raise CliptimeError(
                f"--batch-size {self.batch_size} is not divisible by --num-workers {self.num_workers} x --grad-accum "
                f"{self.grad_accum} (it is the global batch of one optimizer step)"
            )
        if self.amp_dtype not in ("bfloat16", "float16"):
            raise CliptimeError(f"--amp-dtype {self.amp_dtype!r}: expected bfloat16 or float16")


def check_not_negative(cfg: Any) -> None:
    """No number of a config is negative (sizes, counts, weights, rates, seeds), unless its field says
    `negative=True`; names the first flag that is."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not f.metadata.get("negative") and any(v < 0 for v in numbers):
            shown = " ".join(f"{v:g}" for v in values) if isinstance(value, tuple) else f"{value:g}"
            flags = "/".join([f"--{f.name.replace('_', '-')}", *f.metadata.get("aliases", ())])
            raise CliptimeError(f"{flags} {shown}: expected 0 or more")


def _field_type(cls, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints[f.name]


def add_dataclass_args(
    parser: argparse.ArgumentParser, cls: type, title: str, only: Collection[str] | None = None
) -> None:
    """Add one `--flag` per field of dataclass `cls` (or per field named in `only`), with its default and help,
    in its own group."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag") is False or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(cls, f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f.metadata.get("help", "").replace("%", "%%") + " (default: %(default)r)"
        flags = [flag, *f.metadata.get("aliases", ())]
        extra = {k: v for k, v in f.metadata.items() if k not in ("help", "aliases", "flag", "negative")}
        extra.update(dest=f.name, default=default, help=helptext)
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **extra)
        elif typing.get_origin(kind) in (tuple, list):
            group.add_argument(*flags, type=typing.get_args(kind)[0], nargs=len(default), **extra)
        else:
            group.add_argument(*flags, type=kind, **extra)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    return from_dict(cls, values)


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Build `cls` from a plain dict (e.g. a tune trial's config), rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CliptimeError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kind = _field_type(cls, f)
            v = values[f.name]
            kwargs[f.name] = tuple(v) if typing.get_origin(kind) is tuple else v
    return cls(**kwargs)


def setting_types(cls: type) -> dict[str, Any]:
    """{field name: its type} of dataclass `cls`."""
    return {f.name: _field_type(cls, f) for f in dataclasses.fields(cls)}


def fits(kind: Any, value: Any) -> bool:
    """Whether a YAML value can be a setting of type `kind` (an int counts as a float, a bool as neither; a
    tuple setting takes a list of fitting values, a dict setting a mapping)."""
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return isinstance(value, (list, tuple)) and all(fits(item, v) for v in value)
    if typing.get_origin(kind) is dict:
        keys, values = typing.get_args(kind)
        return isinstance(value, dict) and all(fits(keys, k) and fits(values, v) for k, v in value.items())
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def type_name(kind: Any) -> str:
    """How an error message names a setting's type."""
    if typing.get_origin(kind) is tuple:
        return f"list of {type_name(typing.get_args(kind)[0])}"
    if typing.get_origin(kind) is dict:
        return "mapping"
    return {bool: "true/false", int: "whole number", float: "number", str: "string"}.get(kind, str(kind))


def flat_params(prefix: str, cfg: Any) -> dict[str, Any]:
    """`{prefix.field: value}` for logging a config as MLflow params."""
    return {f"{prefix}.{k}": v for k, v in dataclasses.asdict(cfg).items()}


__all__ = [
    "TrainConfig",
    "add_dataclass_args",
    "check_not_negative",
    "from_dict",
    "from_namespace",
    "fits",
    "flat_params",
    "setting_types",
    "type_name",
    "option",
]
