"""Training to a time budget: the planning on a fake clock (deterministic), then a real budgeted run."""

import json

import numpy as np
import pytest
import torch

from medssm.budget import (GOOD_SAMPLES, GOOD_STEPS, MIN_BATCH, MIN_SAMPLES, VALIDATION_SHARE, BudgetPlan,
                           BudgetTooShort, Candidate, Timing, format_duration, parse_duration, plan_budget,
                           validation_due)
from medssm.engine.schedules import make_scheduler, set_total_steps
from medssm.runs import load_run


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("20m") == 1200 and parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400 and parse_duration(45) == 45 and parse_duration("15") == 15
    for bad in ("", "soon", "-5m", "0s"):
        with pytest.raises(ValueError, match="budget"):
            parse_duration(bad)


def clock(step: dict, case: float = 0.1, fixed: float = 0.0):
    """A fake measurement: ``step[scale]`` seconds a step, ``case`` a held-out case."""
    return lambda cand: Timing(step[cand.scale], case, fixed)


def test_fits_the_budget_and_keeps_validation_within_its_share():
    plan = plan_budget(600, [Candidate(1.0, 4)], clock({1.0: 0.25}, case=0.5, fixed=20), held_out=40)
    assert plan.expected_s <= 600
    validation = plan.validations * 40 * 0.5
    assert validation <= VALIDATION_SHARE * 600 and plan.val_cases == 0  # whole held-out set, 4 times
    assert plan.validations == 4 and plan.epochs % plan.val_every == 0 and plan.epochs // plan.val_every == 4
    assert plan.samples * 0.25 / 4 + validation + 20 >= 0.85 * 600  # the budget is used
    assert plan.iterations(1) == plan.first_iterations <= -(-plan.epochs * plan.iterations_per_epoch // 10)  # short


def test_validation_of_a_subset_when_a_whole_one_does_not_fit():
    plan = plan_budget(100, [Candidate(1.0, 2)], clock({1.0: 0.05}, case=2.0), held_out=50)
    assert plan.validations == 1 and plan.val_cases == int(VALIDATION_SHARE * 100 // 2.0)


def test_picks_the_finest_resolution_where_enough_samples_fit():
    fast_enough = plan_budget(200, [Candidate(1.0, 8), Candidate(2.0, 8)], clock({1.0: 1.0, 2.0: 0.25}), held_out=10)
    assert fast_enough.candidate.scale == 2.0 and fast_enough.samples >= GOOD_SAMPLES
    roomy = plan_budget(3000, [Candidate(1.0, 8), Candidate(2.0, 8)], clock({1.0: 1.0, 2.0: 0.25}), held_out=10)
    assert roomy.candidate.scale == 1.0 and roomy.samples >= GOOD_SAMPLES


def test_too_slow_says_what_budget_would_do_or_trains_the_minimum():
    with pytest.raises(BudgetTooShort, match=r"ask for at least \d+ min"):
        plan_budget(60, [Candidate(1.0, 2)], clock({1.0: 5.0}), held_out=10)
    plan = plan_budget(60, [Candidate(1.0, 2)], clock({1.0: 5.0}), held_out=10, over_budget=True)
    assert plan.over_budget and plan.samples >= MIN_SAMPLES and plan.expected_s > 60
    assert any("--over-budget" in r for r in plan.reasons)


def per_sample_clock(overhead: float, per_sample: float):
    """A fake measurement whose step time grows with the batch."""
    return lambda cand: Timing(overhead + per_sample * cand.batch_size, 0.1)


def test_a_smaller_batch_when_too_few_steps_fit():
    big = plan_budget(600, [Candidate(1.0, 32)], per_sample_clock(0.05, 0.05), held_out=10)
    assert MIN_BATCH <= big.candidate.batch_size < 32
    assert big.epochs * big.iterations_per_epoch >= 0.9 * GOOD_STEPS and big.expected_s <= 600
    assert any("instead of 32" in r for r in big.reasons)
    kept = plan_budget(600, [Candidate(1.0, 32)], per_sample_clock(0.05, 0.05), held_out=10, keep_batch=True)
    assert kept.candidate.batch_size == 32 and kept.epochs * kept.iterations_per_epoch < GOOD_STEPS
    ranks = plan_budget(600, [Candidate(1.0, 32)], per_sample_clock(0.05, 0.05), held_out=10, batch_multiple=4)
    assert ranks.candidate.batch_size % 4 == 0 and ranks.candidate.batch_size < 32
    roomy = plan_budget(600, [Candidate(1.0, 8)], per_sample_clock(0.01, 0.01), held_out=10)
    assert roomy.candidate.batch_size == 8  # enough steps already


def test_classification_epochs_are_passes_over_the_data():
    plan = plan_budget(600, [Candidate(1.0, 32)], clock({1.0: 0.5}, case=0.01), held_out=500, samples_per_epoch=3200)
    steps_fit = int((600 * 0.95 - plan.validations * 500 * 0.01) // 0.5)  # the budget's steps at 0.5 s each
    assert plan.iterations_per_epoch == 100 and plan.epochs == steps_fit // 100 and plan.samples == plan.epochs * 3200
    for length in (3200, 640, 2000):  # the validations planned are the epochs that validate
        p = plan_budget(600, [Candidate(1.0, 32)], clock({1.0: 0.5}, case=0.01), held_out=500, samples_per_epoch=length)
        assert p.validations == sum(validation_due(e, p.epochs, p.val_every) for e in range(1, p.epochs + 1)) <= 5
    short = plan_budget(120, [Candidate(1.0, 32)], clock({1.0: 0.5}, case=0.01), held_out=500, samples_per_epoch=32000)
    assert short.epochs == 1 and short.iterations_per_epoch < 1000  # one epoch, cut short to fit


def test_the_plan_is_refitted_to_what_an_epoch_took():
    plan = plan_budget(600, [Candidate(1.0, 4)], clock({1.0: 0.5}, case=0.1), held_out=10)
    epochs, planned, validations = plan.epochs, plan.iterations_per_epoch, plan.validations
    assert epochs > 2 and plan.val_every == 2  # epoch 1 is not validated, epoch 2 is
    assert plan.validations_after(1) == validations and plan.validations_after(2) == validations - 1

    def after_first(step, **kw):
        return plan.refitted(epoch=1, steps_done=planned, step_s=step, elapsed_s=planned * step, held_out=10, **kw)

    def spent(budget, step):  # the whole run at the real step
        return planned * step + (epochs - 1) * budget.refit.iterations_per_epoch * step + validations * 10 * 0.1

    slower = after_first(0.65)  # the real step is 1.3x the timed one
    later = slower.refit.iterations_per_epoch
    assert later < planned and 0.9 * 600 <= spent(slower, 0.65) <= 600
    assert slower.iterations(1) == planned and slower.iterations(epochs) == later
    assert slower.samples == (planned + (epochs - 1) * later) * 4 and slower.steps == planned + (epochs - 1) * later
    assert slower.step_s == 0.65 and plan.step_s == 0.5
    assert "0.650 s against 0.500 s" in slower.refit.reason
    faster = after_first(0.4)
    assert planned < faster.refit.iterations_per_epoch <= 2 * planned and spent(faster, 0.4) <= 600
    assert after_first(0.4, most=planned).refit.iterations_per_epoch == planned  # one pass at most
    crawling = after_first(60.0)
    assert crawling.samples >= MIN_SAMPLES and "the minimum" in crawling.refit.reason
    assert after_first(0.65, validation_s=30.0).refit.iterations_per_epoch < later  # validation costs more

    # Refitted again after epoch 2 of the slow run, which went at the timed speed after all: the rest
    # of the budget is shared out again, the later epochs get more than the first refit gave them.
    again = slower.refitted(epoch=2, steps_done=planned + later, step_s=0.5, elapsed_s=planned * 0.65 + later * 0.5,
                            held_out=10)
    assert later < again.refit.iterations_per_epoch == again.iterations(3)
    assert again.refit.validation_s == slower.refit.validation_s  # the estimate, kept


def test_a_plan_survives_its_json_and_says_what_is_wrong_with_a_damaged_one():
    plan = plan_budget(600, [Candidate(2.0, 4, (32, 32))], clock({2.0: 0.5}, case=0.1), held_out=10)
    plan = plan.refitted(epoch=1, steps_done=plan.iterations_per_epoch, step_s=0.6, elapsed_s=70, held_out=10)
    done = plan.finished(612.34)
    assert BudgetPlan.from_dict(json.loads(json.dumps(done.to_dict()))) == done
    assert done.actual_s == 612.3 and done.candidate.patch_size == (32, 32)
    with pytest.raises(ValueError, match=r"budget.json: not a medssm budget plan"):
        BudgetPlan.from_dict({"epochs": 3}, "budget.json")


def test_durations_read_as_people_say_them():
    assert format_duration(1) == "1 s" and format_duration(600) == "10.0 min" and format_duration(9000) == "2.5 h"
    with pytest.raises(BudgetTooShort, match="a budget of 1 s is too short"):
        plan_budget(1, [Candidate(1.0, 2)], clock({1.0: 5.0}), held_out=10)


def test_a_refitted_schedule_resumes_with_its_new_length():
    def scheduler():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, make_scheduler(opt, "cosine", total_steps=100)

    opt, sched = scheduler()
    for _ in range(10):
        opt.step()
        sched.step()
    set_total_steps(sched, 40)
    opt2, resumed = scheduler()
    resumed.load_state_dict(sched.state_dict())
    for o, s in ((opt, sched), (opt2, resumed)):
        for _ in range(30):
            o.step()
            s.step()
    assert sched.get_last_lr() == resumed.get_last_lr() == [0.0]  # both ended at step 40, not 100


def test_a_budgeted_run_writes_its_plan_and_keeps_to_it(data_root, tmp_path):
    from medssm.engine.segmentation import TrainConfig, train

    from .subsets import lung_subset

    lung = lung_subset(data_root, tmp_path / "Dataset001_LungXray", n=6, size=64)
    run = train(TrainConfig(data=str(lung), out=str(tmp_path / "run"), model="lightm_unet_2d_tiny", budget="15s",
                            patch_size=(64, 64), batch_size=2, over_budget=True, progress=False))
    budget = json.loads((run / "budget.json").read_text())
    log = json.loads((run / "log.json").read_text())
    assert len(log) == budget["epochs"] and budget["reasons"] and budget["actual_s"] > 0
    assert sum("val_dice" in r for r in log) == budget["validations"]
    assert budget["refit"]["after_epoch"] == budget["epochs"] - 1  # refitted after every epoch but the last
    state = torch.load(run / "checkpoints" / "last" / "training_state.pt", weights_only=True)
    steps = state["scheduler"]["last_epoch"]  # every optimiser step of the run
    assert budget["samples"] == steps * 2 and state["scheduler"]["lr_lambdas"][0]["total_steps"] == steps
    assert load_run(run).budget == BudgetPlan.from_dict(budget)
    with pytest.raises(ValueError, match="leave out --epochs"):
        train(TrainConfig(data=str(lung), out=str(tmp_path / "x"), budget="1m", epochs=3))
    for empty in ("", " "):  # --budget= is not "no budget"
        with pytest.raises(ValueError, match="--budget: expected a duration"):
            train(TrainConfig(data=str(lung), out=str(tmp_path / "x"), budget=empty))
    assert not (tmp_path / "x").exists()


def test_timing_counts_inside_the_budget_and_skips_what_cannot_fit():
    """Candidates are timed from the cheapest on; one whose step (extrapolated by voxels x batch) is too
    slow for the minimum, or too large for the memory, is never timed; the timing's own time is spent."""
    now, timed, said = [0.0], [], []

    def measure(c):
        timed.append(c.patch_size)
        now[0] += 5.0  # timing a candidate takes 5 s of the budget
        step = 0.1 * (c.patch_size[0] / 32) ** 2
        return Timing(step, 0.01, memory=0.2 * 2**30 * (c.patch_size[0] / 32) ** 2)

    candidates = [Candidate(1.0, 2, (128, 128)), Candidate(1.0, 2, (64, 64)), Candidate(1.0, 2, (32, 32))]
    plan = plan_budget(60, candidates, measure, held_out=4, clock=lambda: now[0], say=said.append, keep_batch=True)
    assert timed == [(32, 32), (64, 64)]  # 128²: 1.6 s a step x 100 steps cannot fit 60 s
    assert any("patch [128, 128], batch 2 not timed: a step would take about 1.6 s" in r for r in plan.reasons)
    assert plan.calibration_s == 10.0 and said[0] == "budget: timing a step at full resolution, patch [32, 32], batch 2 ..."
    spent = plan.calibration_s + plan.epochs * plan.iterations_per_epoch * plan.timing.step
    assert spent <= 60 and plan.expected_s <= 60  # the timing's 10 s are inside the budget
    timed.clear()
    plan_budget(600, candidates, measure, held_out=4, clock=lambda: now[0], free_memory=1.0 * 2**30, keep_batch=True)
    assert timed == [(32, 32)]  # 64²'s step would take 0.8 GiB: more than half of the 1 GiB free


def test_thin_structures_are_trained_at_their_own_resolution(data_root, tmp_path):
    from medssm.data.segmentation import plan_dataset, verify_dataset
    from medssm.data.segmentation.plan import MIN_THICKNESS, budget_plans, structure_thickness

    line = np.zeros((40, 40), np.int16)
    line[10:12, 5:35] = 1  # 2 voxels wide
    assert structure_thickness(line, [1]) == pytest.approx(2.0)
    from .synthetic import vessels_like
    from .subsets import lung_subset

    vessels = verify_dataset(vessels_like(tmp_path / "Dataset010_Vessels", cases=5, shape=(146, 141)))
    plans = budget_plans(vessels, plan_dataset(vessels), 16)
    assert plans[0].thickness / 2 < MIN_THICKNESS and [p.target_spacing for p in plans] == [[1.0, 1.0]] * 3
    assert plans[1].patch_size == [round(p / 2 / 16) * 16 for p in plans[0].patch_size]  # crops, not whole images
    assert [p.batch_size for p in plans] == [plans[0].batch_size] * 3  # at the plan's batch
    lung = verify_dataset(lung_subset(data_root, tmp_path / "Dataset001_LungXray", n=6, size=128))
    plans = budget_plans(lung, plan_dataset(lung), 8)
    assert [p.target_spacing for p in plans] == [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]  # thick: whole images, coarser


def test_a_budgeted_run_says_what_it_times_before_it_trains(tmp_path, capsys):
    from medssm.engine.segmentation import TrainConfig, train

    from .synthetic import vessels_like

    data = vessels_like(tmp_path / "Dataset010_Vessels", cases=5, shape=(146, 141))
    run = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), model="lightm_unet_2d_tiny", budget="20s",
                            over_budget=True, progress=False))
    out = capsys.readouterr().out
    assert out.index("budget: timing a step at full resolution") < out.index("epoch 1/")
    budget = load_run(run).budget
    assert budget.candidate.scale == 1 and budget.calibration_s > 0  # thin vessels: their own resolution
