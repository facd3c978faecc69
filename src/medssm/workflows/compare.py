"""``medssm compare``: is a Mamba model worth it on my data, for the compute I have?

Every model is trained on the same split with the same time budget and the same data pipeline
(each with its own official recipe, or one shared recipe with ``--recipe``), its best checkpoint
predicts the held-out fold (and a test set when there is one) through the same prediction and
evaluation commands a user runs, and its cost is measured. Then one report:

    OUT/report.html     the page to open: the table, the charts with values on hover, and the same
                        held-out case of every model side by side (segmentation), or each model's
                        confusion matrix and ROC curves (classification)
    OUT/report.md       the table (Dice / HD95 or ACC / AUC, parameters, MACs with the scan's
                        FLOPs, step time, peak memory, wall time) and the figures
    OUT/compare.json    every number of the table, and each model's validation curve
    OUT/curves.png      validation score against wall-clock time, every model on one plot
    OUT/scores.png      the held-out (and test) scores side by side
    OUT/models/NAME/    each model's run, predictions and evaluation; result.json when complete

A model whose ``result.json`` holds a complete result of the same settings (data, budget, recipe, fold,
seed, test set) is not run again: an interrupted comparison is finished by running the same command
again. A result of other settings is refused (another ``-o``, or remove that model's folder); a model
that was not run (its budget too short) is run again.

Example:
    medssm compare -d $MEDSSM_DATA/Dataset001_LungXray --models lightm_unet_2d,lightm_unet_2d_nomamba,monai:SegResNet \\
        --budget 10m -o runs/compare_lung
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..budget import BudgetPlan, BudgetTooShort
from ..engine.options import DEFAULT_MODELS
from ..figures import pyplot, save_figure
from ..files import output_folder, read_json, write_json
from ..metrics.html_report import write_html_report
from ..nets.registry import get_model_card, list_models
from ..runs import Run, has_checkpoint, load_run

__all__ = ["CompareConfig", "compare", "default_models"]

# The CNNs a Mamba model is measured against, by task and dimensionality.
BASELINES = {("segmentation", 2): ("monai:SegResNet", "monai:UNet", "monai:DynUNet"),
             ("segmentation", 3): ("monai:SegResNet", "monai:DynUNet"),
             ("classification", 2): ("monai:resnet18",), ("classification", 3): ("monai:resnet18",)}


def default_models(task: str, spatial_dims: int) -> list[str]:
    """The comparison a user most likely wants: the model ``medssm train`` trains by default, its
    ablations (the cards that say they are one of it) and the CNN baselines."""
    model = DEFAULT_MODELS[task, spatial_dims]
    ablations = [n for n in list_models(task=task, spatial_dims=spatial_dims) if get_model_card(n).ablation_of == model]
    return [model, *ablations, *BASELINES[task, spatial_dims]]


@dataclass
class CompareConfig:
    """Train several models on the same data with the same time budget, evaluate them alike, report."""

    data: str = field(metadata={"flags": ("-d", "--data"), "help": (
        "an nnU-Net raw dataset (segmentation) or a classification dataset (.npz, folders, CSV)")})
    out: str = field(metadata={"flags": ("-o", "--out"), "help": "output folder (the report, and a run per model)"})
    models: str | None = field(default=None, metadata={"help": (
        "comma-separated model names (default: the Mamba model, its No-Mamba ablation and CNN baselines for "
        "the task)")})
    budget: str = field(default="10m", metadata={"help": "training time per model, e.g. 90s, 10m, 1h"})
    recipe: str | None = field(default=None, metadata={"help": (
        "one recipe for every model: short, or a registered model's name (default: each model's own)")})
    fold: int = field(default=0, metadata={"help": "held-out fold of the sorted 5-fold split (segmentation)"})
    test: tuple[str, ...] | None = field(default=None, metadata={"help": (
        "segmentation: a test set's IMAGES LABELS folders, predicted and scored too (classification: the "
        "data's own test split is used when it has one)")})
    over_budget: bool = field(default=False, metadata={"help": (
        "train a model's minimum even when it does not fit the budget (else that model is reported as not run)")})
    checkpointing: bool = field(default=False, metadata={"help": "activation checkpointing for every model (see medssm train)"})
    seed: int = 0
    device: str = "auto"
    scan_backend: str = "auto"
    progress: bool = True


def task_of(data: str) -> tuple[str, int]:
    """(task, spatial dimensions) of a dataset: a classification dataset's from its images, an nnU-Net
    dataset's from its first case."""
    from ..data.classification import classification_format, open_classification_data
    from ..data.segmentation.nnunet import NnUNetDataset, resolve_data

    if classification_format(data):
        return "classification", open_classification_data(data, "train").spatial_dims
    return "segmentation", NnUNetDataset(resolve_data(data)).spatial_dims


def compare(cfg: CompareConfig) -> Path:
    """Run every model not yet complete, then write the report; returns the output folder."""
    task, dims = task_of(cfg.data)
    names = [m.strip() for m in cfg.models.split(",") if m.strip()] if cfg.models is not None else default_models(task, dims)
    if not names:
        raise ValueError(f"--models {cfg.models!r}: no models given (names separated by commas)")
    for name in names:
        card = get_model_card(name)  # an unknown name fails here, before anything runs
        if card.task != task:
            raise ValueError(f"{name} is a {card.task} model; {cfg.data} is a {task} dataset")
    if cfg.test is not None and (task != "segmentation" or len(cfg.test) != 2):
        raise ValueError("--test takes the IMAGES and LABELS folders of a segmentation test set")
    out = output_folder(cfg.out, "the comparison's folder")
    settings = settings_of(cfg)
    found = {name: read_json(f, "comparison result") for name in names
             if (f := out / "models" / name.replace(":", "_") / "result.json").is_file()}
    other = {n: r for n, r in found.items() if r.get("settings") != settings}
    if other:
        name, r = next(iter(other.items()))
        raise ValueError(f"{out}: {len(other)} model(s) were compared with other settings, e.g. {name} with "
                         f"{r.get('settings', 'settings not recorded')}; this comparison asks for {settings}: choose "
                         "another -o, or remove their folders under models/")
    results = []
    for i, name in enumerate(names, start=1):
        folder = out / "models" / name.replace(":", "_")
        if found.get(name, {}).get("status") == "complete":
            print(f"[{i}/{len(names)}] {name}: complete, not run again ({folder / 'result.json'})")
        else:
            print(f"[{i}/{len(names)}] {name}: training for {cfg.budget} ...", flush=True)
            found[name] = {**run_one(cfg, task, name, folder), "settings": settings}
            write_json(folder / "result.json", found[name], default=str)
        results.append(found[name])
    write_report(out, cfg, task, results)
    print(f"report: {out / 'report.md'}")
    print(f"report: {write_html_report(out)}")
    return out


def settings_of(cfg: CompareConfig) -> dict:
    """What a result depends on: the settings under which a model's result can be reused."""
    return {"data": str(cfg.data), "budget": cfg.budget, "recipe": cfg.recipe, "fold": cfg.fold, "seed": cfg.seed,
            "test": list(cfg.test) if cfg.test else None}


def run_one(cfg: CompareConfig, task: str, name: str, folder: Path) -> dict:
    """Train ``name`` to the budget, evaluate its best checkpoint, measure its cost: its result row."""
    start = time.perf_counter()
    common = dict(data=cfg.data, out=str(folder / "run"), model=name, budget=cfg.budget, recipe=cfg.recipe,
                  over_budget=cfg.over_budget, seed=cfg.seed, device=cfg.device, scan_backend=cfg.scan_backend,
                  checkpointing=cfg.checkpointing,
                  progress=cfg.progress, resume=has_checkpoint(folder / "run"))
    try:
        if task == "segmentation":
            from ..engine.segmentation import TrainConfig, train

            run_dir = train(TrainConfig(fold=cfg.fold, **common))
        else:
            from ..engine.classification import ClassifierTrainConfig, train_classifier

            run_dir = train_classifier(ClassifierTrainConfig(**common))
    except BudgetTooShort as e:
        return {"model": name, "status": "not run", "reason": str(e)}
    train_s = time.perf_counter() - start
    run = load_run(run_dir)
    scores = (evaluate_segmentation_run(cfg, run, folder) if task == "segmentation"
              else evaluate_classification_run(cfg, run, folder))
    budget = run.budget
    card = get_model_card(name)
    return {"model": name, "status": "complete", "ablation_of": card.ablation_of, "recipe": run.description["recipe"],
            "scores": scores, "cost": measure_cost(run, budget), "train_s": round(train_s, 1),
            "budget": budget.to_dict(), "curve": validation_curve(run.log, task)}


def validation_curve(log: list[dict], task: str) -> list[tuple[float, float]]:
    """(minutes of training so far, validation score) at every validated epoch."""
    key = "val_dice" if task == "segmentation" else "val_auc"
    curve, minutes = [], 0.0
    for row in log:
        minutes += row.get("time_s", 0.0) / 60
        if isinstance(row.get(key), float) and math.isfinite(row[key]):
            curve.append((round(minutes, 3), row[key]))
    return curve


def evaluate_segmentation_run(cfg: CompareConfig, run, folder: Path) -> dict:
    """Dice, IoU, HD95 of the best checkpoint on the held-out fold (and the test set), at the images'
    own resolution, through ``medssm predict`` and ``medssm evaluate``."""
    from ..data.segmentation.nnunet import resolve_data
    from ..inference.segmentation import PredictConfig, predict
    from ..metrics.evaluate_segmentation import EvaluateConfig, evaluate

    data = resolve_data(cfg.data)
    held_out = run.splits[cfg.fold]["val"]
    sets = {"held_out": (data / "imagesTr", data / "labelsTr", tuple(held_out))}
    if cfg.test:
        sets["test"] = (Path(cfg.test[0]), Path(cfg.test[1]), None)
    scores = {}
    for which, (images, labels, cases) in sets.items():
        pred = folder / f"predictions_{which}"
        predict(PredictConfig(input=str(images), output=str(pred), model=str(run.path), cases=cases,
                              skip_existing=True, device=cfg.device, scan_backend=cfg.scan_backend,
                              progress=cfg.progress))
        evaluation = folder / f"evaluation_{which}"
        evaluate(EvaluateConfig(pred=str(pred), ref=str(labels), out=str(evaluation), images=str(images), cases=cases,
                                overwrite=True, max_overlays=8, progress=cfg.progress))
        summary = read_json(evaluation / "summary.json", "evaluation summary")
        scores[which] = {**{k: summary["mean"][k] for k in ("dice", "iou", "hd95")}, "cases": summary["n_cases"],
                         "per_structure": {name: {k: m[k] for k in ("dice", "iou", "hd95")}
                                           for name, m in summary["per_class"].items()}}
    return scores


def evaluate_classification_run(cfg: CompareConfig, run, folder: Path) -> dict:
    """ACC and AUC of the best checkpoint on the validation split (and the test split when there is one)."""
    from ..inference.classification import ClassifierPredictConfig, predict_classifier
    from ..metrics.evaluate_classification import ClassifierEvaluateConfig, evaluate_classifier

    scores = {}
    for which, split in (("held_out", "val"), ("test", "test")):
        csv = folder / f"predictions_{which}.csv"
        try:
            predict_classifier(ClassifierPredictConfig(model=str(run.path), input=cfg.data, split=split, output=str(csv),
                                                       skip_existing=True, device=cfg.device,
                                                       scan_backend=cfg.scan_backend, progress=cfg.progress))
        except ValueError:
            if which == "test":  # no test split in this dataset
                continue
            raise
        m = evaluate_classifier(ClassifierEvaluateConfig(predictions=str(csv), out=str(folder / f"evaluation_{which}"),
                                                         overwrite=True, progress=cfg.progress))
        scores[which] = {"acc": m["acc"], "auc": m["auc"], "f1": m["f1"], "cases": m["n"]}
    return scores


def measure_cost(run: Run, budget: BudgetPlan) -> dict:
    """Parameters, MACs and scan FLOPs of one forward at the training input (batch 1), the peak
    activation memory of that forward, and the training step time (as the last refitted epoch took it)."""
    from ..nets.info import model_info

    model = run.load_model("best")
    patch = budget.candidate.patch_size
    size = tuple(patch) if patch else (run.description["input_size"],) * run.description.get("spatial_dims", 2)
    info = model_info(model, size)
    return {"parameters": info.parameters, "gmacs": info.macs / 1e9, "scan_gflops": info.scan_flops / 1e9,
            "gflops": info.flops / 1e9, "peak_forward_mib": info.peak_activation_bytes / 2**20,
            "input": list(info.input_size),
            "step_s": budget.step_s, "batch_size": budget.candidate.batch_size}


# ----------------------------------------------------------------------------------------------
# The report.


def write_report(out: Path, cfg: CompareConfig, task: str, results: list[dict]) -> None:
    """compare.json, report.md and the two figures, from every model's result."""
    write_json(out / "compare.json", {"config": dataclasses.asdict(cfg), "task": task, "results": results},
               default=str)
    done = [r for r in results if r["status"] == "complete"]
    metric = ("dice", "hd95") if task == "segmentation" else ("acc", "auc")
    sets = [s for s in ("held_out", "test") if any(s in r["scores"] for r in done)]
    if done:
        plot_curves(out / "curves.png", done, task)
        plot_scores(out / "scores.png", done, metric[0] if task == "segmentation" else "auc", sets)

    def cell(r, s, m):
        return cell_of(r["scores"].get(s, {}).get(m))

    header = ["model"] + [f"{s.replace('_', '-')} {m.upper()}" for s in sets for m in metric] + [
        "parameters", "GMACs", "scan GFLOPs", "step (s)", "batch", "peak fwd (MiB)", "train (min)", "samples"]
    lines = [f"# medssm compare: {cfg.data}", "",
             f"Task {task}; budget {cfg.budget} per model; recipe: {cfg.recipe or 'each model its own'}"
             + (f"; fold {cfg.fold}" if task == "segmentation" else "") + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in done:
        c = r["cost"]
        lines.append("| " + " | ".join(
            [r["model"] + (f" (ablation of {r['ablation_of']})" if r.get("ablation_of") else "")]
            + [cell(r, s, m) for s in sets for m in metric]
            + [f"{c['parameters']:,}", f"{c['gmacs']:.2f}", f"{c['scan_gflops']:.2f}", f"{c['step_s']:.3f}",
               str(c["batch_size"]), f"{c['peak_forward_mib']:.0f}", f"{r['train_s'] / 60:.1f}",
               str(BudgetPlan.from_dict(r["budget"]).samples)]) + " |")
    for r in results:
        if r["status"] != "complete":
            lines.append(f"| {r['model']} | not run: {r['reason']} |")
    lines += ["", "![validation against time](curves.png)", "", "![scores](scores.png)", "",
              "How to read it: every model had the same data, split, pipeline and wall-clock budget on this "
              "machine; `samples` is how many training samples that bought it. MACs count convolutions and "
              "matrix products of one forward at the training input (batch 1), scan GFLOPs the selective scans "
              "(analytic); peak fwd is the activation memory of that forward; a step is what one took late in "
              "training (sampling and augmentation included). Held-out scores are at the images' "
              "own resolution, through `medssm predict` and `medssm evaluate`. Each model's run, predictions "
              "and evaluation (with overlays) are under `models/`.", ""]
    for r in done:
        lines += [f"- **{r['model']}**: {epochs_text(BudgetPlan.from_dict(r['budget']))}; {r['recipe'].get('source', '')}"]
    if task == "segmentation" and done:
        lines += ["", "Each class or region of the held-out set (Dice / HD95):", ""]
        names = list(done[0]["scores"]["held_out"]["per_structure"])
        lines += ["| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for r in done:
            per = r["scores"]["held_out"]["per_structure"]
            lines.append(f"| {r['model']} | " + " | ".join(
                f"{cell_of(per[n]['dice'])} / {cell_of(per[n]['hd95'], 2)}" for n in names) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def cell_of(value, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def epochs_text(budget: BudgetPlan) -> str:
    """``10 epochs x 40 steps``, or ``10 epochs, 372 steps (planned 10 x 40)`` when refitted on the way."""
    epochs, planned = budget.epochs, budget.iterations_per_epoch
    if budget.steps != epochs * planned:
        return f"{epochs} epochs, {budget.steps} steps (planned {epochs} x {planned})"
    return f"{epochs} epochs x {planned} steps"


def plot_curves(path: Path, results: list[dict], task: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), marker="o", label=r["model"])
    ax.set_xlabel("training time (min, this machine)")
    ax.set_ylabel("validation Dice" if task == "segmentation" else "validation AUC")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_scores(path: Path, results: list[dict], metric: str, sets: list[str]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(results)), 4))
    width = 0.8 / max(len(sets), 1)
    for j, s in enumerate(sets):
        values = [r["scores"].get(s, {}).get(metric, float("nan")) for r in results]
        ax.bar([i + j * width for i in range(len(results))], values, width, label=s.replace("_", "-"))
    ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(results))])
    ax.set_xticklabels([r["model"] for r in results], rotation=20, ha="right")
    ax.set_ylabel(metric.upper())
    finite = [v for r in results for s in sets for v in [r["scores"].get(s, {}).get(metric)] if v is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.02) if metric != "hd95" else None)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
