"""study.py: recipes and plans, spreads over seeds, evaluation ticks every seed reached, milestones, and the plots."""
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from matplotlib.colors import to_hex
from PIL import Image

import pictures
import study
from checkpoint import checkpoint_files
from config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _run(seed: int, fids: list[float], ema: bool = False, milestone_fid: float | None = None) -> dict:
    """A study run as read_run returns it: one evaluation a minute, steps of 64 images."""
    evaluations = [{"minutes": minute + 1.0, "images": 6400 * (minute + 1), "step": 100 * (minute + 1), "fid": fid,
                    "ema_fid": fid + 1 if ema else None} for minute, fid in enumerate(fids)]
    milestones = {"2": {"fid": milestone_fid, "ema_fid": None, "accuracy": None, "ema_accuracy": None, "step": 200}}
    return {"config": {"seed": seed, "threads": 1, "clock": "cpu"}, "evaluations": evaluations,
            "record": {"legs": {"2": {"wall_s": 200.0, "cpu_s": 100.0}},
                       "milestones": milestones if milestone_fid is not None else {}}}


def test_spread_is_median_min_max_of_the_values_that_exist():
    assert study.spread([3.0, None, 1.0, 10.0]) == {"median": 3.0, "min": 1.0, "max": 10.0, "n": 3}
    assert study.spread([None]) == {}


def test_a_group_keeps_only_ticks_every_seed_reached_and_milestones_every_seed_has():
    runs = [_run(0, [900.0, 500.0, 300.0], milestone_fid=480.0), _run(1, [800.0, 700.0], milestone_fid=650.0),
            _run(2, [1000.0, 400.0, 200.0], milestone_fid=390.0)]
    group = study.summarise_group(runs, period=1.0)
    assert group["seeds"] == [0, 1, 2]
    assert [point["fid"]["median"] for point in group["curve"]] == [900.0, 500.0], "minute 3: seed 1 never got there"
    assert group["curve"][1]["fid"]["min"] == 400.0 and group["curve"][1]["fid"]["max"] == 700.0
    assert group["milestones"]["2"]["fid"] == {"median": 480.0, "min": 390.0, "max": 650.0, "n": 3}
    assert group["cpu_share"]["median"] == 0.5
    runs[1]["record"]["milestones"] = {}
    assert study.summarise_group(runs, period=1.0)["milestones"] == {}, "a milestone one seed lacks is left out"


def test_plots_have_an_ema_panel_only_where_a_run_kept_an_ema(tmp_path):
    summary = {"groups": {"default/sagan": study.summarise_group([_run(0, [900.0, 500.0]), _run(1, [800.0, 400.0])], 1.0)}}
    one_panel = pictures.plot_fid(summary, "minutes", tmp_path / "one.png")
    assert [axis.get_title() for axis in one_panel.axes] == ["trained G"]
    summary["groups"]["default/baseline"] = study.summarise_group([_run(0, [700.0, 300.0], ema=True)], 1.0)
    figure = pictures.plot_fid(summary, "images", tmp_path / "two.png")
    assert [axis.get_title() for axis in figure.axes] == ["trained G", "EMA of G"]
    assert Image.open(tmp_path / "two.png").size[0] > Image.open(tmp_path / "one.png").size[0]
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["SAGAN (2 seeds)", "baseline (no attention) (1 seed)"]
    lines = {line.get_label(): line.get_color() for line in figure.axes[0].get_lines()}
    assert lines == {"SAGAN (2 seeds)": pictures.ARM_COLOURS["sagan"], "baseline (no attention) (1 seed)":
                     pictures.ARM_COLOURS["baseline"]}, "one recipe: each arm in its own colour, under its own name"
    summary["groups"] = {"betas-0.5/sagan": study.summarise_group([_run(0, [600.0, 200.0])], 1.0), **summary["groups"],
                         "reuse-fakes/sagan": study.summarise_group([_run(0, [600.0, 200.0])], 1.0)}
    lines = {line.get_label(): line for line in pictures.plot_fid(summary, "minutes").axes[0].get_lines()}
    assert lines["SAGAN, default (2 seeds)"].get_color() == pictures.ARM_COLOURS["sagan"], \
        "several recipes: each named; the default, listed or not first, keeps the arm colours"
    assert to_hex(lines["SAGAN, betas-0.5 (1 seed)"].get_color()) != to_hex(pictures.ARM_COLOURS["sagan"])
    del summary["groups"]["betas-0.5/sagan"]
    summary["groups"]["paper/sagan"] = study.summarise_group([_run(0, [650.0, 250.0])], 1.0)
    lines = {line.get_label(): line for line in pictures.plot_fid(summary, "minutes").axes[0].get_lines()}
    others = [lines["SAGAN, reuse-fakes (1 seed)"], lines["SAGAN, paper (1 seed)"]]
    hues = [to_hex(line.get_color()) for line in others]
    assert len(set(hues)) == 2 and not set(hues) & {to_hex(c) for c in pictures.ARM_COLOURS.values()}, \
        "every other recipe in a colour of its own, never an arm's"
    assert all(line.get_linestyle() == "-" for line in others)
    named = pictures.plot_fid(summary, "minutes", labels={"paper/sagan": "SAGAN, paper's attention"})
    assert "SAGAN, paper's attention (1 seed)" in [line.get_label() for line in named.axes[0].get_lines()]


def test_a_group_names_the_machines_threads_and_precisions_its_runs_trained_with_from_their_sessions():
    session = {"device": "cpu", "cpu": "AMD EPYC", "amx": False, "avx512_bf16": True, "precision": "bf16", "threads": 1}
    resumed = [session, session | {"step": 3000, "threads": 2}]
    moved = [session, session | {"step": 3000, "cpu": "Intel Xeon", "avx512_bf16": False, "precision": "fp32"}]
    group = study.summarise_group([_run(0, [50.0]) | {"sessions": resumed}, _run(1, [40.0]) | {"sessions": moved}], 1.0)
    assert group["threads"] == [1, 2] and group["precision"] == ["bf16", "fp32"]
    assert group["trained_on"] == ["AMD EPYC (AMX or AVX512-BF16)", "Intel Xeon (AVX2 only, no native bf16)"]
    assert study.training_machine(session | {"device": "cuda"}) == "cuda (host CPU AMD EPYC)"
    old = study.summarise_group([_run(0, [50.0])], 1.0)  # a run from before sessions.jsonl: its config's threads
    assert old["threads"] == [1] and old["trained_on"] == ["an unrecorded machine"]


def test_a_group_of_a_step_budget_ticks_by_steps():
    runs = [_run(0, [900.0, 500.0, 300.0]), _run(1, [800.0, 700.0, 600.0])]
    group = study.summarise_group(runs, period=100, unit="steps")  # evaluations at steps 100, 200, 300
    assert [point["step"]["median"] for point in group["curve"]] == [100, 200, 300]
    assert [point["fid"]["median"] for point in group["curve"]] == [850.0, 600.0, 450.0]


def test_a_plan_builds_each_runs_config_from_its_recipe_and_arm_and_resumes_with_the_legs_budget(tmp_path):
    plan = study.Plan(dataset="mnist-5k", unit="minutes", budget=30, milestones=(10,), eval_period=1.0, eval_n=500,
                      threads=1, overrides={"sample_every": 50})
    assert plan.legs() == [10, 30] and plan.pause(10) == {"pause_minutes": 10}
    run = study.Run("stage-1+betas-0.5", "baseline", 2, tmp_path)
    config = plan.config(run)
    assert (config.batch_size, config.reuse_fakes, config.beta1, config.beta2, config.attn, config.seed) == (
        64, False, 0.5, 0.999, False, 2)
    # every leg has the whole budget (a leg pauses before it), so a schedule over the budget is the same in legs
    assert (config.minutes, config.clock, config.eval_minutes, config.sample_every) == (30, "cpu", 1.0, 50)
    assert config.out == str(tmp_path / "stage-1+betas-0.5" / "baseline-seed2")
    # once the run has a checkpoint, a later leg resumes its config.json with the new budget only
    run.folder.mkdir(parents=True)
    (run.folder / "checkpoints").mkdir()
    (run.folder / "checkpoints" / "latest.pt").write_bytes(b"")
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    (run.folder / "config.json").write_text(json.dumps(saved | {"sample_every": 7}))
    later = plan.config(run)
    assert later.minutes == 30 and later.sample_every == 7 and (later.batch_size, later.reuse_fakes) == (64, False)
    by_steps = study.Plan(unit="steps", budget=5000, milestones=(1000,), eval_period=500)
    assert by_steps.pause(1000) == {"pause_step": 1000}
    taking_turns = study.Plan(unit="steps", budget=2200, milestones=(1000,), pause_every=500)
    assert taking_turns.legs() == [500, 1000, 1500, 2000, 2200]
    assert by_steps.run_settings()["steps"] == 5000 and by_steps.run_settings()["eval_every"] == 500


def test_a_folder_that_trained_as_another_recipe_is_refused_by_name_before_any_work(tmp_path):
    """A run of the old default (today's stage-1) in default/ must not continue, or be published, as the default."""
    plan = study.Plan(unit="minutes", budget=10, eval_period=1.0, threads=1)
    trained = dataclasses.asdict(plan.config(study.Run("stage-1", "sagan", 0, tmp_path)))
    misplaced = study.Run("default", "sagan", 0, tmp_path)
    (misplaced.folder / "checkpoints").mkdir(parents=True)
    (misplaced.folder / "checkpoints" / "latest.pt").write_bytes(b"")
    (misplaced.folder / "config.json").write_text(json.dumps(trained))
    with pytest.raises(ConfigError, match=r"default/sagan-seed0 did not train as recipe 'default'(.|\n)*'stage-1'"
                                          r"(.|\n)*g_lr: run has 0.0002, asked for 0.0004"):
        study.run_all([misplaced], plan, jobs=1)
    assert study.read_record(misplaced.record_path) == {"legs": {}, "milestones": {}}, "nothing ran"
    assert plan.config(study.Run("stage-1", "sagan", 0, tmp_path)).g_lr == 2e-4  # a new run of the right name
    # a conditional run wrote down its dataset's class count (the recipe's 0 means 'as many as the dataset has')
    conditional = study.Run("default+conditional", "sagan", 0, tmp_path)
    assert conditional.folder == tmp_path / "conditional" / "sagan-seed0", "one spelling, one folder"
    started = dataclasses.asdict(plan.config(conditional)) | {"num_classes": 10}
    (conditional.folder / "checkpoints").mkdir(parents=True)
    (conditional.folder / "checkpoints" / "latest.pt").write_bytes(b"")
    (conditional.folder / "config.json").write_text(json.dumps(started))
    assert plan.config(conditional).num_classes == 10


def test_fid_at_equal_steps_takes_each_runs_last_evaluation_at_or_before_the_step():
    group = study.summarise_group([_run(0, [900.0, 500.0, 300.0]), _run(1, [800.0, 700.0])], period=1.0)
    assert study.at_step(group, 250) == {"median": 600.0, "min": 500.0, "max": 700.0, "n": 2}  # steps 200 and 200
    assert study.at_step(group, 50) == {}, "a seed with no evaluation that early"
    starting = study.summarise_group([_run(0, [900.0]), _run(1, [])], period=1.0)  # a seed not evaluated yet
    assert study.equal_step([group, starting]) == 100 and study.equal_step([group]) == 200
    assert study.equal_step([study.summarise_group([_run(0, [])], period=1.0)]) == 0


def _conditional_run(seed: int, accuracies: list[float], ema: bool) -> dict:
    """A class-conditional run: FID 100, 90, 80, ... and the given share read back (the EMA's 0.05 higher)."""
    run = _run(seed, [100.0 - 10 * k for k in range(len(accuracies))], ema=ema)
    for evaluation, accuracy in zip(run["evaluations"], accuracies):
        evaluation |= {"accuracy": accuracy, "ema_accuracy": accuracy + 0.05 if ema else None}
    return run


def test_the_accuracy_table_compares_conditional_groups_at_equal_steps_on_the_g_a_file_publishes():
    shared = study.summarise_group([_conditional_run(0, [0.1, 0.5, 0.6, 0.7, 0.8, 0.9], ema=True),
                                    _conditional_run(1, [0.2, 0.4, 0.5, 0.6, 0.7, 0.8], ema=True)], period=1.0)
    per_class = study.summarise_group([_conditional_run(0, [0.1, 0.1, 0.2, 0.2, 0.3], ema=False)], period=1.0)
    unconditional = study.summarise_group([_run(0, [50.0, 40.0, 30.0])], period=1.0)  # no accuracy: not in the table
    summary = {"machine": {"cpu": "cpu", "cores": 2, "torch": "2", "date": "today", "commit": "abc"},
               "groups": {"default/sagan": unconditional, "conditional/sagan": shared,
                          "conditional+per-class/sagan": per_class}}
    sentence, blank, *lines = study.accuracy_table(summary, {"conditional/sagan": "SAGAN, class-conditional"})
    assert sentence.startswith("Class-conditional runs at equal steps") and blank == ""
    # steps 250, 500 and the last step every run of each group reached (per-class 500, shared 600), blank past it
    assert lines[0] == "| model | score | step 250 | step 500 | step 600 |"
    assert lines[2] == ("| SAGAN, class-conditional | EMA's class read back | 50.0% (45.0%-55.0%) | 80.0% (75.0%-85.0%) "
                        "| 90.0% (85.0%-95.0%) |")
    assert lines[3] == "| | EMA's FID | 91.0 (91.0-91.0) | 61.0 (61.0-61.0) | 51.0 (51.0-51.0) |"  # FIDs 90, 60, 50, +1
    assert lines[4] == ("| conditional+per-class/sagan | class read back | 10.0% (10.0%-10.0%) | 30.0% (30.0%-30.0%) "
                        "|  |")
    assert lines[5] == "| | FID | 90.0 (90.0-90.0) | 60.0 (60.0-60.0) |  |"
    assert len(lines) == 6
    assert "\n".join(study.accuracy_table(summary)) in study.markdown(summary)  # the study's summary.md has it
    assert study.accuracy_table({"groups": {"default/sagan": unconditional}}) == []


def test_legs_a_runs_record_has_done_start_no_process_and_a_milestone_not_scored_is_not_done(tmp_path, monkeypatch):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # run_all sets them for its workers
        monkeypatch.setenv(variable, "2")
    plan = study.Plan(unit="minutes", budget=0.1, milestones=(0.1,), pause_every=0.05)
    run = study.Run("default", "sagan", 0, tmp_path)
    run.folder.parent.mkdir(parents=True)
    assert not plan.finished(study.read_record(run.record_path), 0.05), "no record: nothing done"
    trained = {"legs": {"0.05": {}, "0.1": {}}, "milestones": {}}
    assert plan.finished(trained, 0.05) and not plan.finished(trained, 0.1)  # trained, but its milestone unscored
    assert not plan.finished({"legs": {}, "milestones": {"0.1": {}}}, 0.1), "scored but not trained"
    run.record_path.write_text(json.dumps(trained | {"milestones": {"0.1": {}}}))
    study.run_all([run], plan, jobs=1)  # a resumed study or results.py call whose runs are all done
    assert not run.log_path.exists(), "a process was started for legs the record has done"


def test_a_run_that_logged_nothing_yet_or_was_cut_short_mid_row_reads_as_what_it_logged(tmp_path):
    """A study summarised while its runs start (metrics.csv has only its header) or after a crash mid-row."""
    folder = tmp_path / "default" / "sagan-seed0"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"dataset": "mnist", "clock": "cpu", "batch_size": 64, "seed": 0,
                                                    "threads": 1, "attn": True}))
    header = "step,d_loss,cpu_time,classifier_fid\n"
    (folder / "metrics.csv").write_text(header)
    assert study.read_run(folder)["evaluations"] == []
    summary = study.summarise(tmp_path)
    assert summary["groups"]["default/sagan"]["curve"] == [] and not (tmp_path / "fid_vs_minutes.png").exists()
    with pytest.raises(ValueError, match="no classifier FID was logged by these runs yet"):
        pictures.plot_fid(summary, "minutes")
    (folder / "metrics.csv").write_text(header + "10,1.5,60.0,400.0\n20,1.4,120.0,300.0\n3")  # the last row cut short
    evaluations = study.read_run(folder)["evaluations"]
    assert [(e["step"], e["minutes"], e["fid"]) for e in evaluations] == [(10, 1.0, 400.0), (20, 2.0, 300.0)]
    (folder / "metrics.csv").write_text(header + "10,1.5,60.0,400.0\n20,1.4,12")  # cut inside a number
    assert [e["step"] for e in study.read_run(folder)["evaluations"]] == [10]


def test_recipe_names_on_the_command_line_have_one_spelling_and_a_study_runs_each_once():
    assert study.recipe_name("default+ema") == "ema"
    runs = {study.Run(recipe, "sagan", 0, Path("out")) for recipe in ("ema", "default+ema")}
    assert len(runs) == 1 and next(iter(runs)).folder == Path("out") / "ema" / "sagan-seed0"


def _logged_run(folder: Path, fids: list[float], precision: str) -> None:
    """A run folder as train.py leaves it: its config and one evaluation every 10 steps."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"dataset": "mnist", "clock": "cpu", "batch_size": 64, "seed": 0,
                                                    "threads": 1, "attn": True, "precision": precision}))
    rows = "".join(f"{10 * (k + 1)},1.5,{60.0 * (k + 1)},{fid}\n" for k, fid in enumerate(fids))
    (folder / "metrics.csv").write_text("step,d_loss,cpu_time,classifier_fid\n" + rows)


def test_studies_trained_apart_are_summarised_side_by_side_each_group_named_after_its_folder(tmp_path, capsys):
    _logged_run(tmp_path / "fp32" / "default" / "sagan-seed0", [300.0, 200.0], "fp32")
    _logged_run(tmp_path / "bf16-sim" / "default" / "sagan-seed0", [310.0, 150.0], "bf16-sim")
    out = tmp_path / "both"
    assert study.main(["--summarise", str(tmp_path / "fp32"), str(tmp_path / "bf16-sim"), "--steps", "20",
                       "--eval-every", "10", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unit"] == "steps"
    curves = {name: [point["fid"]["median"] for point in group["curve"]] for name, group in summary["groups"].items()}
    assert curves == {"fp32: default/sagan": [300.0, 200.0], "bf16-sim: default/sagan": [310.0, 150.0]}
    assert "| bf16-sim: default/sagan |" in capsys.readouterr().out and (out / "fid_vs_images.png").exists()
    assert not (tmp_path / "fp32" / "summary.json").exists(), "a joint summary goes to --out, not into a study"
    with pytest.raises(SystemExit):  # several folders and nowhere to put their summary
        study.main(["--summarise", str(tmp_path / "fp32"), str(tmp_path / "bf16-sim")])
    assert "needs --out" in capsys.readouterr().err
    _logged_run(tmp_path / "other" / "fp32" / "default" / "sagan-seed0", [1.0], "fp32")
    with pytest.raises(ValueError, match="need different names"):
        study.summarise(out, folders=[tmp_path / "fp32", tmp_path / "other" / "fp32"])


@pytest.mark.slow
@pytest.mark.parametrize("started_ignoring_sigint", [False, True], ids=["terminal", "background-job"])
def test_ctrl_c_stops_the_running_run_at_a_checkpoint_and_starts_none_of_the_waiting_ones(tmp_path, started_ignoring_sigint):
    # two runs, one job: the second waits for the first; Ctrl-C to the process group, as a terminal sends it, or
    # kill -INT to a study a shell script started in the background (which starts it with SIGINT ignored)
    command = [sys.executable, str(ROOT / "study.py"), "--dataset", "synthetic", "--arms", "baseline", "sagan",
               "--seeds", "0", "--steps", "100000", "--eval-every", "0", "--jobs", "1", "--out", str(tmp_path),
               "--train-args", "--conv-dim", "16", "--batch-size", "8", "--synthetic-size", "64", "--log-every", "1"]
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if started_ignoring_sigint else None
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True, preexec_fn=ignore)
    try:
        metrics, deadline = tmp_path / "default" / "baseline-seed0" / "metrics.csv", time.time() + 120
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
            if time.time() > deadline or process.poll() is not None:
                pytest.fail(f"the first run logged no steps in 2 minutes (study exit code {process.poll()})")
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("the study was still training 2 minutes after Ctrl-C (a waiting run started?)")
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the study still runs, workers included
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, stderr
    assert "the same command resumes the study" in stderr and "Traceback" not in stderr, stderr
    assert checkpoint_files(metrics.parent), "the running run stopped without a checkpoint"
    assert "checkpoint saved" in (tmp_path / "default" / "baseline-seed0.log").read_text(), "it did not stop at a step"
    assert not (tmp_path / "default" / "sagan-seed0.log").exists(), "a run waiting for a job started after Ctrl-C"


@pytest.mark.slow
def test_a_run_that_fails_stops_the_study_naming_the_run_and_its_error(tmp_path, monkeypatch):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # run_all sets them for its processes
        monkeypatch.setenv(variable, "2")
    plan = study.Plan(dataset="celeba", data_root=str(tmp_path / "no-data"), unit="steps", budget=2, eval_period=0)
    run = study.Run("default", "sagan", 0, tmp_path / "study")
    with pytest.raises(RuntimeError, match=r"sagan-seed0 failed \(.*DataError: .*\); see .*sagan-seed0\.log"):
        study.run_all([run], plan, jobs=1)
