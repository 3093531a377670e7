"""config.py: the recipes and their names, validation, resume rules, flags and notebook parameters."""
import dataclasses
import json
from pathlib import Path

import pytest

import config as config_module
import study
import train
from config import ConfigError, TrainConfig, check_resumable, complete_config
from models import build_models

# Small and quick: the 28x28 model at a quarter of its width on the synthetic set.
TINY = dict(dataset="synthetic", image_size=28, synthetic_size=64, conv_dim=16, batch_size=8, steps=6,
            sample_every=3, log_every=1, checkpoint_every=3, quiet=True, device="cpu")


def test_the_original_preset_is_the_original_projects_recipe():
    original = TrainConfig.from_recipe("original")
    # From the original project (../shared/docs/architecture.md): hinge loss, Adam G 1e-4 / D 4e-4, betas 0 and 0.9,
    # batch 64, z of 100, attention in G at 14x14 and in D at 3x3 (28x28), spectral norm, plain training.
    expected = dict(loss="hinge", g_lr=1e-4, d_lr=4e-4, beta1=0.0, beta2=0.9, batch_size=64, z_dim=100, conv_dim=64,
                    d_steps=1, spectral_norm=True, attn_variant="original", ema_decay=0.0, reuse_fakes=False,
                    augment="", r1_weight=0.0, init="default", sample_every=100)
    assert {name: getattr(original, name) for name in expected} == expected
    G, D = build_models(dataclasses.asdict(original))
    assert len(G.attention_gammas()) == len(D.attention_gammas()) == 1
    assert G.attn_sizes == (14,) and D.attn_sizes == (3,)
    overrides, extras = train.parse_args(["--preset", "original", "--g-lr", "3e-4"])
    config = train.config_from_args(overrides, extras)
    assert config.g_lr == 3e-4 and config.d_lr == 4e-4 and config.beta2 == 0.9
    # conditioning: the original project had no conditional model; 'original' keeps the per-class tables of old runs
    def changed(recipe: str) -> dict:
        config = TrainConfig.from_recipe(recipe)
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)
                if getattr(config, f.name) != getattr(original, f.name) and f.name != "conditioning"}

    # the default recipe is the original one with the recipe study's winner: equal rates 4e-4, G's update on
    # D's fakes, an EMA of G (which training never reads); 'stage-1' is the default before it, equal rates 2e-4 only
    assert changed("default") == dict(g_lr=4e-4, reuse_fakes=True, ema_decay=0.999, ema_rampup=0.05)
    assert TrainConfig().d_lr == original.d_lr == 4e-4  # G's rate rises to D's
    assert changed("stage-1") == dict(g_lr=2e-4, d_lr=2e-4)


def test_an_old_run_resumes_with_the_settings_it_trained_with(tmp_path):
    """A config.json written before the recipe fields existed (as the published runs' are)."""
    old = {k: v for k, v in dataclasses.asdict(TrainConfig.from_recipe("original", **TINY, out=str(tmp_path))).items()
           if k not in ("reuse_fakes", "ema_start", "augment", "r1_weight", "r1_every", "init", "g_attn_sizes",
                        "d_attn_sizes", "minutes", "eval_minutes", "checkpoint_minutes")}
    completed = complete_config(old)
    assert completed["augment"] == "" and completed["r1_weight"] == 0 and completed["reuse_fakes"] is False
    config = TrainConfig(**completed)
    check_resumable(old, config)
    assert build_models(dataclasses.asdict(config))[1].attn_sizes == (3,)


def test_attention_sizes_are_flags_and_survive_config_json(tmp_path):
    overrides, extras = train.parse_args(["--d-attn-sizes", "7", "--g-attn-sizes", "7", "14"])
    config = train.config_from_args(overrides, extras)
    assert config.d_attn_sizes == (7,) and config.g_attn_sizes == (7, 14)
    reread = TrainConfig(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert reread == config
    check_resumable(json.loads(json.dumps(dataclasses.asdict(config))), config)
    G, D = build_models(dataclasses.asdict(dataclasses.replace(config, image_size=28)))
    assert len(G.attention_gammas()) == 2 and D.attn_sizes == (7,)


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("steps", -5), ("g_lr", 0.0), ("d_lr", float("nan")), ("loss", "wasserstein"),
    ("dataset", "imagenet"), ("image_size", 32), ("ema_decay", 1.0), ("beta2", 1.5), ("d_steps", 0),
    ("attn_variant", "fancy"), ("precision", "fp8"), ("conv_dim", 12),
])
def test_nonsensical_config_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        TrainConfig(**{field: value})


def test_resume_reads_a_field_missing_from_an_older_run_as_the_run_trained(tmp_path):
    """reuse_fakes is on by default today; a run from before the field existed trained without it."""
    config = TrainConfig(**TINY, out=str(tmp_path / "run"))
    older_run = {k: v for k, v in dataclasses.asdict(config).items() if k != "reuse_fakes"}
    check_resumable(older_run, dataclasses.replace(config, reuse_fakes=False))
    with pytest.raises(ConfigError, match="reuse_fakes: run has False, asked for True"):
        check_resumable(older_run, config)


def test_recipe_names_combine_changes_and_refuse_unknown_or_misplaced_ones():
    config = TrainConfig.from_recipe("original+reuse-fakes+lr-2e-4")
    assert (config.reuse_fakes, config.g_lr, config.d_lr, config.beta2) == (True, 2e-4, 2e-4, 0.9)
    with pytest.raises(ConfigError, match="unknown recipe 'fast'"):
        TrainConfig.from_recipe("default+fast")
    with pytest.raises(ConfigError, match="'original' is a whole recipe"):
        TrainConfig.from_recipe("reuse-fakes+original")
    assert study.train_overrides(["--sample-every", "50", "--no-attn"]) == {"sample_every": 50, "attn": False}
    assert [config_module.canonical_recipe(name) for name in ("default", "default+conditional", "original+ema",
                                                                "conditional+per-class")] == \
        ["default", "conditional", "original+ema", "conditional+per-class"], "one spelling of each recipe"
    with pytest.raises(ConfigError, match="unknown recipe 'fast'"):
        config_module.canonical_recipe("default+fast")


def test_a_comparison_made_before_the_arms_were_named_resumes_in_its_old_folders(tmp_path):
    old = tmp_path / "old"
    (old / "with_attention").mkdir(parents=True)
    (old / "without_attention").mkdir()
    (old / "with_attention" / "config.json").write_text("{}")
    assert config_module.arm_folder(old, "sagan") == old / "with_attention"
    assert config_module.arm_folder(old, "baseline") == old / "without_attention"
    assert train.resumed_run(old) == old / "with_attention", "the arm whose settings --resume --compare reads"
    assert config_module.arm_folder(tmp_path / "new", "sagan") == tmp_path / "new" / "sagan"
    with pytest.raises(FileNotFoundError, match="holds no arm of a comparison"):
        train.resumed_run(tmp_path / "new")


def test_a_notebooks_parameters_become_a_config_and_an_unknown_name_is_refused_by_name():

    namespace = {"In": [], "Out": {}, "get_ipython": print, "json": json, "recipe": "original+reuse-fakes",
                 "steps": 30, "g_lr": None, "augment": "translation", "demo_dir": "demo", "_hidden": 1}
    config, settings = config_module.notebook_config(namespace, ("demo_dir", "eval_n"))
    assert (config.steps, config.g_lr, config.reuse_fakes, config.augment) == (30, 1e-4, True, "translation")
    assert settings == {"demo_dir": "demo"}
    with pytest.raises(ConfigError, match="unknown setting 'ema_decya' in the parameters cell"):
        config_module.notebook_config({**namespace, "ema_decya": 0.99}, ("demo_dir",))
    # run again after the notebook's later cells: the objects they left in globals are not settings
    later = {"config": config, "settings": settings, "demo": Path("demo"), "runs": {"sagan": Path("runs/sagan")},
             "results": {"SAGAN": {"classifier_fid": 1.0}}, "training_set": object()}
    again, _ = config_module.notebook_config({**namespace, **later, "steps": 60}, ("demo_dir", "eval_n"))
    assert again.steps == 60
