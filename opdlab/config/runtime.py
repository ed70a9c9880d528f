"""``Runtime``: where and how a run is computed, never what. It is not hashed into a run's name and may change
when a run resumes (the same cache or another one, another thread count, the compiled decoder): a resumed run
then equals an uninterrupted one, to float rounding where the change alters summation order.

What a run computes is ``opdlab.config.spec.RunSpec``. Each run directory records the runtime it last ran with in
``run.json``, so a result says which sampler and scorer produced it.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from opdlab.config.checks import is_int
from opdlab.errors import UserError

__all__ = ["Runtime", "SAMPLERS", "SCORERS", "REPORTERS", "check_reporters"]

SAMPLERS = ("fast", "transformers")
"""``"fast"``: ``lm.decoder.KVDecoder`` (the model's own blocks over a static KV cache) wherever it supports the
model, else the ``transformers`` forward; ``"transformers"``: always the ``transformers`` forward with its
``DynamicCache`` (the same tokens from the same generator; a benchmark's plain arm)."""
SCORERS = ("packed", "padded")
"""``"packed"``: ``lm.packed`` (real tokens only, each distinct prompt once) wherever it supports the model;
``"padded"``: the ``transformers`` forward over the padded batch (same logits to float rounding)."""

REPORTERS = ("tensorboard", "trackio")


def check_reporters(report_to) -> tuple[str, ...]:
    """``report_to`` as a tuple of known tracker names; a ``UserError`` names an unknown one."""
    names = (report_to,) if isinstance(report_to, str) else tuple(report_to)
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise UserError(f"report_to = {report_to!r} names {unknown}; allowed: {', '.join(REPORTERS)} (metrics.jsonl "
                        "is always written)")
    return names


@dataclass(frozen=True)
class Runtime:
    """How a run is computed (see the module doc)."""

    cache: str | None = None
    """Cache directory of trained teachers and warm-up students; None: $OPDLAB_CACHE or ~/.cache/opdlab."""
    device: str = "auto"
    """``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; bf16 autocast on CUDA."""
    threads: int | None = None
    """torch's intra-op threads for this process; None leaves torch's setting as it is."""
    compile_decode: bool = False
    """Sample through a ``torch.compile``d decode step (``lm.decoder``): the same tokens to float rounding,
    compiled once per process and model size."""
    sampler: str = "fast"
    """Which sampler runs, one of ``SAMPLERS``."""
    scorer: str = "packed"
    """Which scorer runs, one of ``SCORERS``."""
    checkpoint_every: int = 10
    """Save model, optimizer, RNG state and step every this many steps (and at the end)."""
    progress: bool = True
    """Progress bars in this process."""
    report_to: tuple = ()
    """Trackers that mirror the metrics besides metrics.jsonl: ``"tensorboard"``, ``"trackio"``
    (``opdlab.rundir.tracking``)."""

    def __post_init__(self):
        if not (self.cache is None or (isinstance(self.cache, str) and self.cache.strip())):
            raise UserError(f"cache = {self.cache!r} is invalid: expected None or a directory path")
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise UserError(f"device = {self.device!r} is invalid: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not (self.threads is None or (is_int(self.threads) and self.threads >= 1)):
            raise UserError(f"threads = {self.threads!r} is invalid: expected None or an int >= 1")
        for name in ("compile_decode", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} = {getattr(self, name)!r} is invalid: expected True or False")
        if self.sampler not in SAMPLERS:
            raise UserError(f"sampler = {self.sampler!r} is invalid: expected one of {SAMPLERS}")
        if self.scorer not in SCORERS:
            raise UserError(f"scorer = {self.scorer!r} is invalid: expected one of {SCORERS}")
        object.__setattr__(self, "report_to", check_reporters(self.report_to))
        if not (is_int(self.checkpoint_every) and self.checkpoint_every >= 1):
            raise UserError(f"checkpoint_every = {self.checkpoint_every!r} is invalid: expected an int >= 1")

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(Runtime))

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "Runtime":
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise UserError(f"unknown runtime field(s) {unknown}; known: {', '.join(self.field_names())}")
        return replace(self, **changes)
