"""Training to a time budget (``medssm train --budget 20m``): measure a step on this machine, then fit
the training length, the validation and (for segmentation) the resolution to the budget.

The plan, nnU-Net style but for time instead of memory:

- the step time is measured at each candidate resolution (the dataset's own spacing, then
  coarser ones), as are the validation cost per case and the fixed costs (preprocessing);
- validation takes at most ``VALIDATION_SHARE`` (15 %) of the budget: as many validations of the
  whole held-out set as fit (up to ``MAX_VALIDATIONS``), else one of as many cases as fit;
- the training steps are what is left; the finest resolution at which at least ``GOOD_SAMPLES``
  training samples fit is chosen (the coarsest otherwise);
- a short run learns per optimiser step more than per sample: when fewer than ``GOOD_STEPS`` steps
  of the planned batch fit, the batch is made smaller (down to ``MIN_BATCH``, a multiple of
  ``batch_multiple``; unless the batch was given), timed again, and kept if more steps fit;
- the plan never trains less than ``MIN_SAMPLES`` samples: when the machine is too slow for that,
  it says how long a budget the minimum needs, and stops (or, with ``--over-budget``, trains the
  minimum and reports the real time);
- after every epoch the plan is refitted to what that epoch really took (a real step carries
  sampling, augmentation and logging the timed one does not, a first epoch warms up, a machine gets
  busier): the later epochs get as many steps as the rest of the budget holds. A segmentation run's
  first epoch takes at most ``FIRST_EPOCH_SHARE`` of the steps, so a slow first epoch is followed
  before it has spent much;
- the timing itself counts inside the budget and is kept small: candidates are timed from the
  cheapest on, and one whose step (extrapolated from the cheaper one's) is too slow for the minimum,
  or too large for the free memory, is not timed at all; each is said as it is timed.

Everything measured comes in through ``measure(candidate)`` (the trainer times a real training
step, in the run's precision, on the run's device), so the planning itself is plain arithmetic (and
is tested with a fake clock). The result is one typed :class:`BudgetPlan`, from the plan to the
report: the trainer refits it, a run keeps it in ``budget.json`` (``load_run(RUN).budget``), and
``medssm compare`` reports it.

Example:
    >>> plan = plan_budget(600, [Candidate(1.0, 8), Candidate(2.0, 8)], measure)  # doctest: +SKIP
    >>> plan.epochs, plan.iterations_per_epoch, plan.val_every, plan.val_cases
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["parse_duration", "format_duration", "validation_due", "Candidate", "Timing", "Refit", "BudgetPlan",
           "BudgetTooShort", "plan_budget", "VALIDATION_SHARE", "MIN_SAMPLES", "GOOD_SAMPLES", "GOOD_STEPS",
           "MIN_BATCH"]

VALIDATION_SHARE = 0.15  # of the budget, at most
MAX_VALIDATIONS = 5
MIN_SAMPLES = 200  # training samples below which a run is not worth its report
GOOD_SAMPLES = 2000  # enough samples to prefer a finer resolution over more steps
GOOD_STEPS = 400  # optimiser steps below which a smaller batch is worth more than a large one
MIN_BATCH = 2
MARGIN = 0.05  # of the budget, kept for what is not measured (logging, checkpoints, the last epoch's spill)
FIRST_EPOCH_SHARE = 0.1  # of the steps, at most, in the first epoch (segmentation): the first refit comes early


def parse_duration(text: str | float | int) -> float:
    """Seconds in ``"90s"``, ``"20m"``, ``"2h"``, ``"1h30m"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*",
                             str(text))
        if not parts or not any(parts.groups()):
            raise ValueError(f"--budget: expected a duration such as 90s, 20m, 2h or 1h30m, got {text!r}")
        h, m, s = (float(g) if g else 0.0 for g in parts.groups())
        seconds = 3600 * h + 60 * m + s
    if not seconds > 0:
        raise ValueError(f"--budget must be positive, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"12.5 min"``, ``"2.1 h"``: a duration as people read it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def validation_due(epoch: int, epochs: int, every: int) -> bool:
    """Validate after epoch ``epoch`` (1-based) of ``epochs``: every ``every`` epochs and after the last."""
    return epoch == epochs or (every > 0 and epoch % every == 0)


@dataclass(frozen=True)
class Candidate:
    """One resolution to train at: ``scale`` 1 is the dataset's own spacing, 2 half the resolution."""

    scale: float
    batch_size: int
    patch_size: tuple[int, ...] = ()


@dataclass(frozen=True)
class Timing:
    """What was measured for a candidate, in seconds."""

    step: float  # one training step (one batch), forward, backward and update
    validation_case: float  # one held-out case (sliding window)
    fixed: float = 0.0  # once per run: preprocessing, set-up
    memory: float = 0.0  # bytes the step took beyond what the process held before it (0: not measured)


class BudgetTooShort(ValueError):
    """The minimum training does not fit the budget on this machine (the message says what would)."""


@dataclass(frozen=True)
class Refit:
    """The plan as refitted after epoch ``after_epoch`` to the step as that epoch took it."""

    after_epoch: int
    iterations_per_epoch: int  # of every later epoch
    step_s: float  # one step, as the epoch took it
    validation_s: float  # one validation, as last measured (or the plan's estimate)
    elapsed_s: float  # since the run started (planning, calibration and preprocessing included)
    reason: str


@dataclass(frozen=True)
class BudgetPlan:
    """How a run fits its budget, and why: made by :func:`plan_budget`, refitted after every epoch
    (:meth:`refitted`), closed with the time it really took (:meth:`finished`); ``budget.json`` of a
    run holds :meth:`to_dict` (read back with :meth:`from_dict`, or ``load_run(RUN).budget``)."""

    budget_s: float
    candidate: Candidate
    timing: Timing
    epochs: int
    iterations_per_epoch: int  # as planned; a refit changes the later epochs'
    val_every: int
    val_cases: int  # 0: all
    validations: int
    samples: int
    expected_s: float
    over_budget: bool = False
    reasons: tuple[str, ...] = ()
    calibration_s: float = 0.0  # spent timing the candidates, inside the budget
    first_iterations: int | None = None  # a shorter first epoch, refitted after (None: as planned)
    refit: Refit | None = None
    actual_s: float | None = None  # the whole run, once finished

    def iterations(self, epoch: int) -> int:
        """Steps of epoch ``epoch`` (1-based) when it is about to run: the plan's, or the last
        refit's (which follows the epoch before)."""
        if self.refit and epoch > self.refit.after_epoch:
            return self.refit.iterations_per_epoch
        return self.first_iterations if epoch == 1 and self.first_iterations else self.iterations_per_epoch

    @property
    def step_s(self) -> float:
        """One training step: as the last refitted epoch took it, else as timed."""
        return self.refit.step_s if self.refit else self.timing.step

    @property
    def steps(self) -> int:
        """Optimiser steps in all (as planned or refitted)."""
        return self.samples // self.candidate.batch_size

    def validations_after(self, epoch: int) -> int:
        """Validations still due after epoch ``epoch``: every ``val_every`` epochs and after the last."""
        return sum(validation_due(e, self.epochs, self.val_every) for e in range(epoch + 1, self.epochs + 1))

    def refitted(self, *, epoch: int, steps_done: int, step_s: float, elapsed_s: float,
                 validation_s: float | None = None, held_out: int = 0, most: int | None = None) -> "BudgetPlan":
        """This plan refitted after epoch ``epoch``: every later epoch gets as many steps as the rest
        of the budget holds at ``step_s``, the step as that epoch took it.

        Args:
            steps_done: optimiser steps taken so far.
            elapsed_s: seconds since the run started (planning and preprocessing included).
            validation_s: one validation as measured in this epoch, or None: the last one measured,
                else an estimate from the plan's timing and ``held_out`` (the cases one validation scores).
            most: at most this many steps an epoch (a classification epoch is one pass over the data).

        Never fewer than ``MIN_SAMPLES`` training samples in all (within ``most``), nor more than
        twice the planned steps an epoch.
        """
        planned, batch, left = self.iterations_per_epoch, self.candidate.batch_size, self.epochs - epoch
        if validation_s is None:  # the last one measured, else the plan's estimate
            validation_s = (self.refit.validation_s if self.refit else 0.0) or (
                (self.val_cases or held_out) * self.timing.validation_case)
        validations_left = self.validations_after(epoch)
        left_s = self.budget_s * (1 - MARGIN) - elapsed_s - validations_left * validation_s
        fit = int(max(left_s, 0.0) // (max(step_s, 1e-9) * left))
        least = max(1, math.ceil((math.ceil(MIN_SAMPLES / batch) - steps_done) / left))
        iterations = min(max(least, min(fit, 2 * planned)), most or 2 * planned)
        reason = (f"after epoch {epoch} ({elapsed_s:.0f} s since the start): a step took {step_s:.3f} s against "
                  f"{self.timing.step:.3f} s timed; epochs {epoch + 1}-{self.epochs} take {iterations} steps each "
                  f"(planned {planned})" + (f", the minimum of {MIN_SAMPLES} samples" if fit < least else ""))
        return dataclasses.replace(
            self, samples=(steps_done + left * iterations) * batch,
            expected_s=elapsed_s + left * iterations * step_s + validations_left * validation_s,
            refit=Refit(epoch, iterations, step_s, validation_s, elapsed_s, reason))

    def finished(self, actual_s: float) -> "BudgetPlan":
        """The plan with the time the whole run took."""
        return dataclasses.replace(self, actual_s=round(actual_s, 1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "budget") -> "BudgetPlan":
        """The plan of :meth:`to_dict` (``budget.json``); a malformed one is a one-line error naming ``source``."""
        try:
            refit = d.get("refit")
            return cls(**{**d, "candidate": Candidate(**{**d["candidate"],
                                                         "patch_size": tuple(d["candidate"].get("patch_size") or ())}),
                          "timing": Timing(**d["timing"]), "reasons": tuple(d.get("reasons", ())),
                          "refit": Refit(**refit) if refit else None})
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: not a medssm budget plan ({type(e).__name__}: {e})") from None

    def __str__(self) -> str:
        c = self.candidate
        head = (f"budget {format_duration(self.budget_s)}: {self.epochs} epochs x {self.iterations_per_epoch} steps of "
                f"batch {c.batch_size}" + (f", patch {list(c.patch_size)}" if c.patch_size else "")
                + (f" at 1/{c.scale:g} resolution" if c.scale != 1 else "")
                + f"; {self.validations} validation(s) of {self.val_cases or 'all'} held-out cases; "
                f"expected {format_duration(self.expected_s)}")
        return "\n".join([head, *(f"  - {r}" for r in self.reasons)])


def plan_budget(budget_s: float, candidates: Sequence[Candidate], measure: Callable[[Candidate], Timing],
                held_out: int, samples_per_epoch: int | None = None, over_budget: bool = False,
                batch_multiple: int = 1, keep_batch: bool = False, elapsed_s: float = 0.0,
                free_memory: float | None = None, say: Callable[[str], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> BudgetPlan:
    """Fit training to ``budget_s`` seconds (see the module docstring).

    Args:
        candidates: what to train at (resolution, patch, batch), most preferred first (one for
            classification); timed from the last (the cheapest) on.
        measure: the timing of a candidate on this machine.
        held_out: held-out cases (or samples) one full validation scores.
        samples_per_epoch: the training set's size when an epoch is one pass over it
            (classification); None for segmentation, whose epochs are a number of steps.
        over_budget: when even the minimum does not fit, plan the minimum anyway instead of raising.
        batch_multiple: a smaller batch stays a multiple of this (the number of processes).
        keep_batch: never change the batch (the user chose it).
        elapsed_s: seconds of the budget spent before planning (planning data, loading).
        free_memory: bytes this process may still take; a candidate whose step would need more than
            half of it (extrapolated from a cheaper one's) is not timed.
        say: told what is being timed and what was found, as it happens.

    The time spent timing counts inside the budget. A candidate whose step, extrapolated from the
    cheaper one timed before it (by its voxels times its batch), is too slow for ``MIN_SAMPLES``
    samples in the budget, or too large for the memory, is not timed at all.
    """
    if not candidates:
        raise ValueError("plan_budget needs at least one candidate")
    say = say or (lambda text: None)
    started = clock()

    def spent() -> float:
        return elapsed_s + clock() - started

    def steps_that_fit(t: Timing, validation_s: float) -> int:
        return int(max(budget_s * (1 - MARGIN) - spent() - t.fixed - validation_s, 0) // t.step)

    def size(c: Candidate) -> float:
        return c.batch_size * math.prod(c.patch_size or (1,))

    reasons: list[str] = []
    options = {}
    cheaper = None
    for cand in reversed(candidates):
        if cheaper is not None:
            ratio = size(cand) / size(cheaper[0])
            step, memory = cheaper[1].step * ratio, cheaper[1].memory * ratio
            if step * math.ceil(MIN_SAMPLES / cand.batch_size) > budget_s:
                reasons.append(f"{describe(cand)} not timed: a step would take about {step:.1f} s (from "
                               f"{describe(cheaper[0])}'s), too slow for {MIN_SAMPLES} samples in the budget")
                say(f"budget: {reasons[-1]}")
                continue
            if free_memory and memory > free_memory / 2:
                reasons.append(f"{describe(cand)} not timed: a step would take about {memory / 2**30:.1f} GiB, more "
                               f"than half of the {free_memory / 2**30:.1f} GiB free")
                say(f"budget: {reasons[-1]}")
                continue
        say(f"budget: timing a step at {describe(cand)} ...")
        t = measure(cand)
        cheaper = (cand, t)
        one_validation = max(held_out, 1) * t.validation_case
        validations = max(1, min(MAX_VALIDATIONS, int(VALIDATION_SHARE * budget_s // max(one_validation, 1e-9))))
        if validations * one_validation <= VALIDATION_SHARE * budget_s:
            val_cases, validation_s = 0, validations * one_validation
        else:  # not even one full validation fits its share: score as many cases as fit, once
            val_cases = max(1, int(VALIDATION_SHARE * budget_s // max(t.validation_case, 1e-9)))
            val_cases = min(val_cases, held_out) if held_out else val_cases
            validations, validation_s = 1, val_cases * t.validation_case
        options[cand] = (cand, t, validations, val_cases, validation_s)
        say(f"budget: {describe(cand)}: a step takes {t.step:.3f} s, a held-out case {t.validation_case:.3f} s")
    calibration = clock() - started
    timed = [(*o[:2], steps_that_fit(o[1], o[4]), *o[2:]) for c in candidates if (o := options.get(c))]
    for cand, t, steps, *_ in timed:
        reasons.append(f"{describe(cand)}: a step takes {t.step:.3f} s and a held-out case {t.validation_case:.3f} s: "
                       f"{steps} steps ({steps * cand.batch_size} samples) fit")
    good = [o for o in timed if o[2] * o[0].batch_size >= GOOD_SAMPLES]
    cand, t, steps, validations, val_cases, validation_s = good[0] if good else timed[-1]
    if len(candidates) > 1:
        reasons.append(f"chose {describe(cand)}: " + (
            f"the first in order of preference at which {GOOD_SAMPLES} samples fit" if good else
            f"the cheapest; fewer than {GOOD_SAMPLES} samples fit at any"))
    smaller = None if keep_batch else smaller_batch(cand.batch_size, steps, batch_multiple)
    if smaller:
        small = dataclasses.replace(cand, batch_size=smaller)
        say(f"budget: timing a step at {describe(small)} ...")
        t_small = measure(small)
        calibration = clock() - started
        steps_small = steps_that_fit(t_small, validation_s)
        if steps_small > steps:
            reasons.append(f"batch {smaller} instead of {cand.batch_size}: a step takes {t_small.step:.3f} s, "
                           f"{steps_small} steps fit instead of {steps} (fewer than {GOOD_STEPS} learn too little)")
            cand, t, steps = small, t_small, steps_small
    min_steps = math.ceil(MIN_SAMPLES / cand.batch_size)
    planned_over = False
    if steps < min_steps:
        needed = (spent() + t.fixed + validation_s + min_steps * t.step) / (1 - MARGIN)
        message = (f"a budget of {format_duration(budget_s)} is too short on this machine: {steps} steps fit, the "
                   f"minimum is {min_steps} ({MIN_SAMPLES} samples); ask for at least {math.ceil(needed / 60)} min")
        if not over_budget:
            raise BudgetTooShort(message + ", or pass --over-budget to train the minimum anyway")
        reasons.append(message + "; training the minimum anyway (--over-budget)")
        steps, planned_over = min_steps, True
    if samples_per_epoch:  # classification: an epoch is a pass over the data, possibly cut short
        per_epoch = max(1, math.ceil(samples_per_epoch / cand.batch_size))
        epochs = max(1, steps // per_epoch)
        iterations = min(per_epoch, steps)
        validations = min(validations, epochs)
        first = None
    else:  # a short first epoch: the plan is refitted to the real step before most of the budget is spent
        epochs = 2 * validations
        iterations = max(1, steps // epochs)
        first = min(iterations, max(1, math.ceil(FIRST_EPOCH_SHARE * epochs * iterations)))
    per_validation = validation_s / validations
    val_every = math.ceil(epochs / validations)
    validations = math.ceil(epochs / val_every)  # every val_every epochs and after the last: no more than planned
    validation_s = validations * per_validation
    reasons.append(f"validation: {validations} x {val_cases or 'all'} cases, {validation_s:.0f} s "
                   f"(at most {VALIDATION_SHARE:.0%} of the budget)")
    reasons.append(f"timing took {calibration:.0f} s of the budget")
    total = (first or iterations) + (epochs - 1) * iterations
    expected = spent() + t.fixed + validation_s + total * t.step
    return BudgetPlan(budget_s, cand, t, epochs, iterations, val_every, val_cases, validations,
                      total * cand.batch_size, expected, planned_over, tuple(reasons), round(calibration, 1), first)


def describe(c: Candidate) -> str:
    """``1/2 resolution, patch [128, 128], batch 8``: a candidate as the plan's reasons name it."""
    return (f"{'full' if c.scale == 1 else f'1/{c.scale:g}'} resolution"
            + (f", patch {list(c.patch_size)}" if c.patch_size else "") + f", batch {c.batch_size}")


def smaller_batch(batch: int, steps: int, multiple: int = 1) -> int | None:
    """The batch that would fit about ``GOOD_STEPS`` steps where ``steps`` of ``batch`` fit (step time
    taken as proportional to the batch), or None when the batch is not worth shrinking."""
    if steps >= GOOD_STEPS:
        return None
    floor = max(MIN_BATCH, multiple)
    smaller = max(floor, math.ceil(batch * max(steps, 1) / GOOD_STEPS / multiple) * multiple)
    return smaller if smaller < batch else None
