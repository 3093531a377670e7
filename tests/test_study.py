"""study.py's summaries: spreads over seeds, evaluation ticks every seed reached, milestones, and the plots."""
from PIL import Image

import study


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
    group = study.summarise_group(runs, eval_minutes=1.0)
    assert group["seeds"] == [0, 1, 2]
    assert [point["fid"]["median"] for point in group["curve"]] == [900.0, 500.0], "minute 3: seed 1 never got there"
    assert group["curve"][1]["fid"]["min"] == 400.0 and group["curve"][1]["fid"]["max"] == 700.0
    assert group["milestones"]["2"]["fid"] == {"median": 480.0, "min": 390.0, "max": 650.0, "n": 3}
    assert group["cpu_share"]["median"] == 0.5
    runs[1]["record"]["milestones"] = {}
    assert study.summarise_group(runs, eval_minutes=1.0)["milestones"] == {}, "a milestone one seed lacks is left out"


def test_plots_have_an_ema_panel_only_where_a_run_kept_an_ema(tmp_path):
    summary = {"groups": {"default/sagan": study.summarise_group([_run(0, [900.0, 500.0]), _run(1, [800.0, 400.0])], 1.0)}}
    study.plot(summary, tmp_path)
    one_panel = Image.open(tmp_path / "fid_vs_minutes.png").size
    summary["groups"]["default/baseline"] = study.summarise_group([_run(0, [700.0, 300.0], ema=True)], 1.0)
    study.plot(summary, tmp_path)
    two_panels = Image.open(tmp_path / "fid_vs_minutes.png").size
    assert two_panels[0] == 2 * one_panel[0] and two_panels[1] == one_panel[1]
    assert (tmp_path / "fid_vs_images.png").is_file()
