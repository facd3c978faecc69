"""The one training skeleton (``medssm train``), for every task:

    check the options and the data (nothing written yet) → claim the run folder → resume, or plan and
    fit the budget (timed on rank 0, followed by every rank) → seed → the model and the run files →
    optimiser, schedule, loss scaler, weight average → a resumed state → the epochs: train the steps,
    validate when due, refit the budget, record → the budget's final record.

What differs between tasks is a :class:`Task` plug-in (:mod:`.segmentation`, :mod:`.classification`):
its data, model, batches, validation and budget candidates, as MONAI's ``SupervisedTrainer`` takes
what differs injected and nnU-Net's trainer calls ``on_*`` hooks. Everything else is written here
once, so both tasks resume, keep budgets, average weights and record the same way.

Example:
    >>> run = fit(SegmentationTask(TrainConfig(data="Dataset001_LungXray", out="runs/lung")))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Iterator

import torch

from ..budget import BudgetPlan, Candidate, parse_duration, plan_budget, validation_due
from ..devices import available_memory, check_precision, cpu_threads
from ..files import read_json, write_json
from ..nets.cards import ModelCard, Recipe
from ..nets.checkpointing import set_checkpointing
from ..nets.registry import parse_model_kwargs
from ..runs import claim_run, has_checkpoint, load_run, load_training_state, write_description
from ..ssm import use_backend
from . import distributed
from .ema import WeightAverage
from .loop import EpochRecorder, grad_scaler, seed_everything, train_step
from .options import DEFAULT_MODELS, TrainOptions
from .schedules import make_optimizer, make_scheduler, restart, set_total_steps

__all__ = ["Task", "fit"]


class Task:
    """A task plug-in: what the trainer asks of a task, in the order it asks.

    Class attributes: ``name`` (the task of the models it trains), the validation column that picks
    ``checkpoints/best`` (``score``, higher is better unless :meth:`better` says otherwise) and
    ``default_val_every``. The trainer sets ``model_kwargs`` (``--model-kwargs``) before :meth:`open`,
    which sets ``card``; then the trainer sets ``recipe`` (the card's, or ``--recipe``, with the options).
    """

    name: str = ""
    score: str = ""
    default_val_every: int = 1
    held_out: int = 0  # cases (samples) one validation scores, set once the budget is followed
    card: ModelCard
    recipe: Recipe
    model_kwargs: dict

    def __init__(self, cfg: TrainOptions):
        self.cfg = cfg

    def default_model(self) -> str:
        """The model trained without ``--model`` (read cheaply: before resuming is decided, the options
        are not final)."""
        raise NotImplementedError

    def run_folder(self) -> Path:
        """``--out``, or ``runs/DATA_MODEL``."""
        model = (self.cfg.model or self.default_model()).replace(":", "_")
        return Path(self.cfg.out) if self.cfg.out else Path("runs") / f"{Path(str(self.cfg.data)).stem}_{model}"

    def open(self, run: Path) -> None:
        """Check the options and the data before anything is written into ``run``; set ``card`` and
        ``spatial_dims`` (the data's)."""
        raise NotImplementedError

    def prepare(self, run: Path, resuming: bool, progress: bool) -> None:
        """What training needs before the model (a plan, splits): read back from ``run`` when resuming."""

    def budget_request(self, device: torch.device, precision: str) -> dict:
        """The keyword arguments of :func:`~medssm.budget.plan_budget` beside the budget: ``candidates``,
        ``measure`` (times a candidate: call :func:`~.loop.time_step` for its step), ``held_out`` and,
        when an epoch is a pass over the data, ``samples_per_epoch``."""
        raise NotImplementedError

    def follow_budget(self, budget: BudgetPlan) -> None:
        """Train as ``budget`` says: its candidate (resolution, batch) and its share of the held-out set."""

    def build_model(self, candidate: Candidate | None = None) -> torch.nn.Module:
        """The network to train, or to time for a budget ``candidate``."""
        raise NotImplementedError

    def model(self, candidate: Candidate | None = None) -> torch.nn.Module:
        """:meth:`build_model`'s network, with activation checkpointing when ``--checkpointing`` asks."""
        model = self.build_model(candidate)
        if self.cfg.checkpointing:
            set_checkpointing(model)
        return model

    def description(self) -> dict:
        """What ``model.json`` records beside the model's name and arguments (what prediction needs)."""
        raise NotImplementedError

    def write_files(self, run: Path) -> None:
        """The task's own run files (rank 0, a new run only)."""

    def start(self, run: Path, device: torch.device, progress: bool) -> None:
        """The data pipeline and the loss (``self.loss_fn``, on ``device``), once the batch is settled."""
        raise NotImplementedError

    def summary(self) -> str:
        """One line on what is trained: the data and its size, the input."""
        raise NotImplementedError

    def pass_length(self) -> int | None:
        """Steps of one pass over the training data, when an epoch is (at most) one pass; else None."""
        return None

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's ``(inputs, targets)`` of epoch ``epoch``; the trainer takes as many as it needs."""
        raise NotImplementedError

    def validate(self, model: torch.nn.Module, device: torch.device, precision: str, progress: bool) -> dict:
        """Validation columns of the log (``self.score`` among them), every process scoring its share."""
        raise NotImplementedError

    def better(self, score: float, best: float) -> bool:
        return score > best

    def state_dict(self) -> dict:
        """What resuming needs beyond the model, optimiser and generators (samplers, augmentation)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def fit(task: Task) -> Path:
    """Train as ``task.cfg`` says; returns the run folder."""
    cfg = task.cfg
    with use_backend(cfg.scan_backend), cpu_threads(cfg.threads):
        env, device = distributed.setup(cfg.device)  # one process, or one of torchrun's / srun's
        check_precision(cfg.precision, device)
        cfg.check()
        run = task.run_folder()
        if cfg.resume and has_checkpoint(run):  # trained as it was configured: the run's options
            task.cfg = cfg = resumed_options(cfg, run)
        task.model_kwargs = parse_model_kwargs(cfg.model_kwargs)
        task.open(run)
        card = task.card
        if card.task != task.name:
            raise ValueError(f"{card.name} is a {card.task} model; {cfg.data} is a {task.name} dataset")
        if task.spatial_dims not in card.spatial_dims:
            raise ValueError(f"{card.name} takes {'/'.join(f'{d}D' for d in card.spatial_dims)} input; {cfg.data} is "
                             f"{task.spatial_dims}D (try {DEFAULT_MODELS[task.name, task.spatial_dims]})")
        task.recipe = cfg.resolve_recipe(task.card)
        with claim_run(run) if env.rank == 0 else contextlib.nullcontext():
            return _Training(task, env, device, run).run()


# Options that say how a run runs, not what it trains: a resumed run takes them as given now.
RUNTIME_OPTIONS = ("data", "out", "resume", "device", "threads", "scan_backend", "progress", "num_workers", "cache",
                   "precision", "checkpointing")


def resumed_options(cfg: TrainOptions, run: Path) -> TrainOptions:
    """The options a resumed run trains with: those of ``RUN/config.json``, where this command leaves
    an option at its default; the runtime options (:data:`RUNTIME_OPTIONS`) as given now; ``--epochs``
    to train longer or shorter. Another value of any other option is refused (one line naming them):
    the run goes on as it was configured, and its records stay what it was trained with."""
    stored = read_json(run / "config.json", "training options")

    def plain(value):
        return json.loads(json.dumps(value, default=str))

    merged, differ = {}, []
    for f in dataclasses.fields(cfg):
        given, default = getattr(cfg, f.name), f.default if f.default is not dataclasses.MISSING else None
        if f.name in RUNTIME_OPTIONS or f.name == "epochs" or f.name not in stored:
            continue
        if plain(given) == plain(default) or f.name == "over_budget":
            merged[f.name] = tuple(stored[f.name]) if isinstance(stored[f.name], list) else stored[f.name]
        elif plain(given) != plain(stored[f.name]):
            differ.append(f"--{f.name.replace('_', '-')} {plain(given)} (the run: {plain(stored[f.name])})")
    if differ:
        raise ValueError(f"{run}: --resume continues the run as it was configured; these options differ from its "
                         f"config.json: {'; '.join(differ)}. Leave them out, or train a new run (another --out)")
    if cfg.epochs is not None and stored.get("budget"):
        raise ValueError(f"{run}: a budgeted run's length is its budget's; --epochs cannot extend it")
    return dataclasses.replace(cfg, **merged, epochs=cfg.epochs if cfg.epochs is not None else stored.get("epochs"))


class _Training:
    """One run of the skeleton (see the module docstring)."""

    def __init__(self, task: Task, env: distributed.DistEnv, device: torch.device, run: Path):
        self.task, self.cfg, self.env, self.device, self.run_dir = task, task.cfg, env, device, run
        self.main = env.rank == 0
        self.progress = self.cfg.progress and self.main
        self.started = time.perf_counter()

    def run(self) -> Path:
        task, cfg, run, main = self.task, self.cfg, self.run_dir, self.main
        resuming = self.resuming()
        task.prepare(run, resuming, self.progress)
        budget = self.budget(resuming)
        if budget:
            task.follow_budget(budget)
        seed_everything(cfg.seed)
        try:
            model = task.model().to(self.device)
        except ValueError as e:  # an argument the model does not take, a width too large
            raise ValueError(f"--model-kwargs {cfg.model_kwargs}: {e}" if task.model_kwargs else str(e)) from None
        ema = WeightAverage(model, cfg.ema) if cfg.ema else None
        evaluated = ema.module if ema else model  # what is validated, kept and predicted with
        # A resumed run records what it was trained as; a new one what the task says.
        description = (read_json(run / "model.json", "run description") if resuming
                       else {**task.description(), "device": self.device.type})
        if main and not resuming:
            write_description(run, model, description)
            write_json(run / "config.json", dataclasses.asdict(cfg), default=str)
            task.write_files(run)
            if budget:
                write_json(run / "budget.json", budget.to_dict())
        task.start(run, self.device, self.progress)
        if main:
            print(f"{task.card.name}: {sum(p.numel() for p in model.parameters()):,} parameters on {self.device}"
                  + (f" x {self.env.world_size} processes" if self.env.distributed else "") + f"; {task.summary()}",
                  flush=True)

        most = task.pass_length()
        planned = cfg.iterations_per_epoch or task.recipe.iterations_per_epoch or most
        epochs = budget.epochs if budget else task.recipe.epochs
        val_every = budget.val_every if budget else cfg.val_every or task.default_val_every
        steps = budget.iterations_per_epoch if budget else min(planned, most or planned)
        optimizer = make_optimizer(model.parameters(), task.recipe)
        scheduler = make_scheduler(optimizer, task.recipe.schedule, total_steps=epochs * steps,
                                   warmup_steps=task.recipe.warmup_epochs * steps)
        scaler = grad_scaler(self.device, cfg.precision)
        start, best, best_epoch = 0, -math.inf, 0
        if resuming:
            last = load_run(run).load_weights(model, "last")
            state = load_training_state(last, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            extra = state["extra"]
            start = int(state["epoch"])
            best = float(extra.get("best", extra.get("best_auc", -math.inf)))  # best_auc: runs before 0.3
            best_epoch = int(extra.get("best_epoch", 0))
            task.load_state_dict(extra)
            if ema:
                if "ema" not in extra:
                    raise ValueError(f"{last}: this run was trained without --ema; resume it without")
                ema.load_state_dict(extra["ema"])
            if main:
                said = f" (best {task.score.replace('_', ' ')} {best:.4f} at epoch {best_epoch})" if best_epoch else ""
                print(f"resuming {run} after epoch {start}/{epochs}{said}", flush=True)
            if not budget:
                description = self.change_length(description, scheduler, start=start, epochs=epochs, steps=steps)
        recorder = EpochRecorder(run, description, resume_epoch=start if cfg.resume else None, main=main,
                                 score=task.score)
        ddp_model = distributed.wrap(model, self.device)  # `model` itself is what is validated and saved

        for epoch in range(start + 1, epochs + 1):
            t0 = time.perf_counter()
            model.train()
            epoch_steps = min(budget.iterations(epoch), most or math.inf) if budget else steps
            total, seen, nonfinite = 0.0, 0, 0
            with self.bar(epoch_steps, f"epoch {epoch}/{epochs}") as bar:
                for _, (x, y) in zip(range(epoch_steps), task.batches(epoch)):
                    loss = train_step(ddp_model, x, y, task.loss_fn, optimizer, scheduler, task.recipe.grad_clip,
                                      self.device, cfg.precision, scaler)
                    if ema:
                        ema.update(model)
                    bar.update()
                    if not math.isfinite(loss):
                        nonfinite += 1
                        continue
                    total, seen = total + loss * len(x), seen + len(x)
                    bar.set_postfix(loss=f"{total / seen:.4f}")
            train_s = time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": total / seen if seen else math.nan,
                   "lr": optimizer.param_groups[0]["lr"], "nonfinite_steps": nonfinite}
            improved = False
            if validation_due(epoch, epochs, val_every):
                row.update(task.validate(evaluated, self.device, cfg.precision, self.progress))
                score = row.get(task.score, math.nan)
                improved = math.isfinite(score) and task.better(score, best)
                if improved:
                    best, best_epoch = score, epoch
            row["time_s"] = round(time.perf_counter() - t0, 2)
            if budget and epoch < epochs:  # before `last` is written: it keeps the refitted schedule
                budget = self.refit(budget, scheduler, epoch=epoch, step_s=train_s / max(epoch_steps, 1), most=most,
                                    validation_s=row["time_s"] - train_s if task.score in row else None)
            recorder.end_epoch(row, epochs, improved, model, evaluated, optimizer=optimizer, scheduler=scheduler,
                               scaler=scaler, extra_state={"best": best, "best_epoch": best_epoch,
                                                           **task.state_dict(), **({"ema": ema.state_dict()} if ema else {})})
        if budget and main:
            write_json(run / "budget.json", budget.finished(self.elapsed()).to_dict())
        return recorder.finish(evaluated, epochs)

    def change_length(self, description: dict, scheduler, *, start: int, epochs: int, steps: int) -> dict:
        """A resumed run given another ``--epochs``: longer or shorter before its schedule ended (the
        schedule stretched or shortened to the new end), or extended after it ended (the schedule started
        again over the added epochs, a warm restart); said on stdout and recorded in config.json and
        model.json. Returns the run's description."""
        schedule = scheduler.lr_lambdas[0]
        planned = (schedule.offset + schedule.total_steps) // max(steps, 1)
        if planned == epochs:
            return description
        if epochs < start:
            raise ValueError(f"{self.run_dir}: has trained {start} epochs; --epochs {epochs} would leave it as it is")
        if scheduler.last_epoch >= schedule.offset + schedule.total_steps:  # the schedule had ended
            restart(scheduler, (epochs - start) * steps)
            how = (f"epochs {start + 1}-{epochs} follow the recipe's {schedule.name} schedule again from its base rate "
                   f"(a warm restart: the run's schedule had ended at epoch {start})")
        else:
            set_total_steps(scheduler, epochs * steps)
            how = f"its {schedule.name} schedule {'stretched' if epochs > planned else 'shortened'} to end with it"
        if self.main:
            print(f"{self.run_dir}: training to epoch {epochs} instead of {planned}: {how}", flush=True)
            description = {**description, "recipe": {**description.get("recipe", {}), "epochs": epochs}}
            write_json(self.run_dir / "model.json", description, default=str)
            write_json(self.run_dir / "config.json", dataclasses.asdict(self.cfg), default=str)
        return description

    def resuming(self) -> bool:
        """Whether this run continues ``checkpoints/last``; a finished run is not overwritten without --resume."""
        cfg, run = self.cfg, self.run_dir
        resuming = cfg.resume and has_checkpoint(run)
        if cfg.resume and not resuming and self.main:
            print(f"{run}: no complete checkpoint yet; starting from the beginning", flush=True)
        if not cfg.resume and has_checkpoint(run):
            raise FileExistsError(f"{run}: already holds a training run; pass --resume to continue it or choose "
                                  "another --out")
        return resuming

    def budget(self, resuming: bool) -> BudgetPlan | None:
        """The run's budget plan: read back when resuming (its time spent counts), else fitted on rank 0
        (every rank trains what it measured) and printed; None without ``--budget``."""
        path = self.run_dir / "budget.json"
        if resuming:
            if not path.is_file():
                return None
            budget = BudgetPlan.from_dict(read_json(path, "budget plan"), str(path))
            if budget.refit:
                self.started -= budget.refit.elapsed_s  # the time the interrupted run had spent counts
            return budget
        if self.cfg.budget is None:
            return None
        request = self.task.budget_request(self.device, self.cfg.precision)
        plan = None
        if self.main:  # said as it goes, also without progress bars: timing can take a while
            plan = plan_budget(parse_duration(self.cfg.budget), **request, over_budget=self.cfg.over_budget,
                               batch_multiple=self.env.world_size, keep_batch=bool(self.cfg.batch_size),
                               elapsed_s=self.elapsed(), free_memory=available_memory(),
                               say=lambda text: print(text, flush=True))
            print(plan, flush=True)
        return BudgetPlan.from_dict(distributed.broadcast(plan.to_dict() if self.main else None))

    def refit(self, budget: BudgetPlan, scheduler, *, epoch: int, **measured) -> BudgetPlan:
        """The budget refitted after ``epoch`` to what it took (decided on rank 0, followed by every
        rank), the schedule stretched or shortened to the new total, ``budget.json``, and a line when
        the steps of an epoch change."""
        before = budget.iterations(epoch + 1)
        refitted = budget.refitted(epoch=epoch, steps_done=scheduler.last_epoch, elapsed_s=self.elapsed(),
                                   held_out=self.task.held_out, **measured) if self.main else None
        budget = BudgetPlan.from_dict(distributed.broadcast(refitted.to_dict() if self.main else None))
        set_total_steps(scheduler, scheduler.last_epoch + (budget.epochs - epoch) * budget.refit.iterations_per_epoch)
        if self.main:
            write_json(self.run_dir / "budget.json", budget.to_dict())
            if budget.refit.iterations_per_epoch != before:
                print(f"budget: {budget.refit.reason}", flush=True)
        return budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def bar(self, steps: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=steps, desc=desc, unit="it", disable=not self.progress, leave=False)
