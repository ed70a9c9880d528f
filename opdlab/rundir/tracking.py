"""Mirror a run's metrics to the trackers researchers open: TensorBoard and trackio (``Runtime.report_to``,
as ``report_to`` in Hugging Face's ``TrainingArguments``).

The run directory's metrics.jsonl stays the source of truth; a tracker receives the same records, each numeric
value under ``<kind>/<name>`` (``train/loss``, ``eval/greedy_accuracy``) at the record's step. A resumed run
purges the events logged after its checkpoint (TensorBoard's ``purge_step``), as metrics.jsonl drops its lines.
Both trackers are optional packages: ``pip install 'opdlab[tracking]'`` (TensorBoard) or ``trackio``.
"""
from __future__ import annotations

import math
from pathlib import Path

from opdlab.config.runtime import check_reporters
from opdlab.errors import UserError
from opdlab.rundir import layout

__all__ = ["Tracker"]


class Tracker:
    """The trackers of one run (none: a no-op). ``log(record)`` sends a metrics record's numeric values;
    ``close()`` flushes. ``start`` is the step a resumed run continues from."""

    def __init__(self, run_dir: str | Path, report_to=(), name: str = "", config: dict | None = None,
                 start: int = 0):
        self.writers = []
        for reporter in check_reporters(report_to):
            if reporter == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as err:
                    raise UserError("report_to tensorboard needs the tensorboard package: "
                                    "pip install 'opdlab[tracking]'") from err
                writer = SummaryWriter(log_dir=str(Path(run_dir) / layout.TENSORBOARD),
                                       purge_step=start + 1 if start else None)
                self.writers.append(("tensorboard", writer))
            else:
                try:
                    import trackio
                except ImportError as err:
                    raise UserError("report_to trackio needs the trackio package: pip install trackio") from err
                trackio.init(project="opdlab", name=name or Path(run_dir).name, config=config or {},
                             resume="allow")
                self.writers.append(("trackio", trackio))

    def log(self, record: dict) -> None:
        step, kind = record["step"], record["kind"]
        values = {f"{kind}/{k}": float(v) for k, v in record.items()
                  if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        for reporter, writer in self.writers:
            if reporter == "tensorboard":
                for tag, value in values.items():
                    writer.add_scalar(tag, value, step)
            else:
                writer.log(values, step=step)

    def close(self) -> None:
        for reporter, writer in self.writers:
            if reporter == "tensorboard":
                writer.close()
            else:
                writer.finish()
        self.writers = []
