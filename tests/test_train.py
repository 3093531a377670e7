"""Training engine: losses, one step, exact resume, atomic checkpoints, NaN guard, config checks, CLI."""
import csv
import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

import train
import utils
from checkpoint import atomic_save, load_checkpoint, load_generator, read_config
from config import ConfigError, TrainConfig, resumed_config
from ema import standing_statistics
from models import build_models
from rundir import last_logged_step, read_sessions
from state import build_state
from train import NonFiniteLossError
from utils import Stopwatch

ROOT = Path(__file__).resolve().parent.parent

# Small and quick: the 28x28 model at a quarter of its width on the synthetic set.
# ema_rampup 0: the default ramp (0.05 of the images seen) would make a few steps' EMA a copy of G
TINY = dict(dataset="synthetic", image_size=28, synthetic_size=64, conv_dim=16, batch_size=8, steps=6,
            sample_every=3, log_every=1, checkpoint_every=3, quiet=True, device="cpu", ema_rampup=0.0)


def tiny(tmp_path: Path, name: str = "run", **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / name), **overrides})


def test_losses_on_hand_computed_values():
    d_real, d_fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # hinge: mean(relu(1 - real)) = (0 + 0.5 + 2) / 3; mean(relu(1 + fake)) = (0 + 1 + 2.5) / 3
    assert train.discriminator_loss("hinge", d_real, d_fake).item() == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert train.generator_loss("hinge", d_fake).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    softplus = lambda x: torch.log1p(torch.exp(torch.tensor(x))).item()  # noqa: E731
    expected = (softplus(-2.0) + softplus(-0.5) + softplus(1.0)) / 3 + (softplus(-2.0) + softplus(0.0) + softplus(1.5)) / 3
    assert train.discriminator_loss("nonsaturating", d_real, d_fake).item() == pytest.approx(expected)
    assert train.generator_loss("nonsaturating", d_fake).item() == pytest.approx((softplus(2.0) + softplus(0.0) + softplus(-1.5)) / 3)
    assert train.discriminator_loss("wgan-gp", d_real, d_fake).item() == pytest.approx(-0.5 / 3 - 1.5 / 3)
    assert train.generator_loss("wgan-gp", d_fake).item() == pytest.approx(0.5 / 3)


def test_gradient_penalty_of_a_linear_critic():
    """D(x) = <w, x> has gradient w everywhere: the penalty is (||w|| - 1)^2 exactly."""
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        critic[1].weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0]]))
    real, fake = torch.randn(5, 1, 2, 2), torch.randn(5, 1, 2, 2)
    penalty = train.gradient_penalty(critic, real, fake, torch.Generator().manual_seed(0))
    assert penalty.item() == pytest.approx((5.0 - 1.0) ** 2)


def _state(tmp_path, **overrides):
    config = tiny(tmp_path, **overrides)
    dataset = train.data.load_dataset("synthetic", image_size=28, channels=1, size=64)
    return build_state(config, dataset, torch.device("cpu"))


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_one_step_changes_G_and_D_and_the_G_update_leaves_D_unchanged(tmp_path):
    state = _state(tmp_path, ema_decay=0.5)
    G0, D0, ema0 = _snapshot(state.G), _snapshot(state.D), _snapshot(state.G_ema)
    train.discriminator_step(state)
    D1, D1_grads = _snapshot(state.D), [p.grad.clone() for p in state.D.parameters()]
    assert any(not torch.equal(D0[k], D1[k]) for k in D0)
    train.generator_step(state)
    assert all(torch.equal(D1[k], v) for k, v in state.D.state_dict().items()), "the G update moved D (weights or SN vectors)"
    assert all(torch.equal(g, p.grad) for g, p in zip(D1_grads, state.D.parameters())), "the G update added to D's gradients"
    G2 = _snapshot(state.G)
    assert any(not torch.equal(G0[k], G2[k]) for k in G0 if "weight" in k)
    assert any(not torch.equal(ema0[k], v) for k, v in state.G_ema.state_dict().items() if "weight" in k)


def test_discriminator_step_does_not_touch_G_weights(tmp_path):
    state = _state(tmp_path)
    weights = {k: v.clone() for k, v in state.G.named_parameters()}
    train.discriminator_step(state)
    assert all(torch.equal(weights[k], v) for k, v in state.G.named_parameters())
    assert all(p.grad is None for p in state.G.parameters())


def test_compile_covers_every_pass_of_G_and_D(tmp_path):
    state = _state(tmp_path, compile=True)  # compiled in place, lazily: nothing is compiled here
    assert state.G._compiled_call_impl is not None and state.D._compiled_call_impl is not None
    assert state.G_synced is state.G and state.D_synced is state.D  # every pass calls the compiled networks
    assert "net.0.bias" in state.G.state_dict(), "state dict keys are the uncompiled ones"


def test_channels_last_is_the_cpu_default_and_trains_as_contiguous_does(tmp_path):
    # fp32: on a CPU with native bf16, 'auto' trains in bf16, whose rounding differs between the layouts' kernels
    by_default, contiguous = _state(tmp_path, precision="fp32"), _state(tmp_path, channels_last=False, precision="fp32")
    assert by_default.memory_format == torch.channels_last and contiguous.memory_format == torch.contiguous_format
    conv_weights = [w for w in by_default.D.state_dict().values() if w.dim() == 4 and w.shape[1] > 1 and w.shape[2] > 1]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in conv_weights)
    assert by_default.next_real()[0].is_contiguous(memory_format=torch.channels_last)
    contiguous.next_real()  # the same data order for both
    for _ in range(2):
        metrics = {name: train.train_step(state) for name, state in (("nhwc", by_default), ("nchw", contiguous))}
        for key, value in metrics["nchw"].items():
            assert metrics["nhwc"][key].item() == pytest.approx(value.item(), rel=1e-3, abs=1e-5), key
    assert train.parse_args([])[0].get("channels_last") is None
    assert train.parse_args(["--no-channels-last"])[0]["channels_last"] is False


def test_reuse_fakes_trains_G_on_the_D_updates_fakes_through_the_updated_D(tmp_path):
    # fp32: the step by hand below runs without autocast, which 'auto' turns on where the CPU has native bf16
    state, by_hand = _state(tmp_path, reuse_fakes=True, precision="fp32"), _state(tmp_path, reuse_fakes=True, precision="fp32")
    train.train_step(state)
    fake = by_hand.G(by_hand.sample_z(TINY["batch_size"]))  # the only noise drawn in the step
    d_real, d_fake = by_hand.D(torch.cat([by_hand.next_real()[0], fake.detach()])).chunk(2)
    by_hand.opt_D.zero_grad()
    train.discriminator_loss("hinge", d_real, d_fake).backward()
    by_hand.opt_D.step()
    by_hand.D.eval().requires_grad_(False)
    by_hand.opt_G.zero_grad()
    train.generator_loss("hinge", by_hand.D(fake)).backward()
    by_hand.opt_G.step()
    for ours, expected in ((state.G, by_hand.G), (state.D, by_hand.D)):
        expected_state = expected.state_dict()
        assert all(torch.allclose(v, expected_state[k], rtol=0, atol=1e-7) for k, v in ours.state_dict().items())
    assert torch.equal(state.noise.get_state(), by_hand.noise.get_state())


def test_reuse_fakes_with_several_d_steps_and_a_gradient_penalty(tmp_path):
    state = _state(tmp_path, reuse_fakes=True, d_steps=2, loss="wgan-gp")
    G0 = _snapshot(state.G)
    metrics = train.train_step(state)
    assert all(torch.isfinite(value) for value in metrics.values())
    assert any(not torch.equal(G0[k], v) for k, v in state.G.state_dict().items() if "weight" in k)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [dict(ema_decay=0.9), dict(reuse_fakes=False, ema_decay=0.0)],
                         ids=["default", "stage-1: fresh fakes, no EMA"])
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, recipe):
    overrides = dict(**recipe, steps=6)
    straight = load_checkpoint(train.train(tiny(tmp_path, "straight", **overrides)))
    first_half = train.train(tiny(tmp_path, "resumed", **{**overrides, "steps": 3}))
    resumed = load_checkpoint(train.train(tiny(tmp_path, "resumed", **overrides), resume=True))
    assert resumed["step"] == straight["step"] == 6
    assert (resumed["G_ema"] is None) == (recipe["ema_decay"] == 0)
    for key in ("G", "D", "G_ema") if recipe["ema_decay"] else ("G", "D"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), f"{key}.{name} differs after resume"
    for key in ("opt_G", "opt_D"):
        for index, values in straight[key]["state"].items():
            for name, tensor in values.items():
                assert torch.equal(tensor, resumed[key]["state"][index][name]), f"{key} state {index}.{name} differs"
    assert resumed["loader"] == straight["loader"]
    rows = list(csv.DictReader(open(first_half / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # wall_time counts on from the checkpoint rather than restarting with the resumed process
    wall = [float(r["wall_time"]) for r in rows]
    assert wall[2] == round(load_checkpoint(first_half / "checkpoints" / "step_000003.pt")["wall_time"], 2)
    assert wall == sorted(wall) and wall[3] > wall[2]
    assert wall[5] == round(resumed["wall_time"], 2)
    assert (first_half / "samples" / "step_000006.png").exists()


@pytest.mark.slow
def test_a_run_resumed_with_an_ema_it_did_not_keep_starts_one_there_and_trains_on_bitwise_as_without(tmp_path):
    """The CelebA pair's case: trained without an EMA, resumed with one from its step. G and D must not notice."""
    plain = dict(reuse_fakes=False, ema_decay=0.0, steps=6, checkpoint_every=1)
    straight = train.train(tiny(tmp_path, "straight", **plain))
    train.train(tiny(tmp_path, "resumed", **{**plain, "steps": 3}))
    resumed = load_checkpoint(train.train(tiny(tmp_path, "resumed", **{**plain, "ema_decay": 0.9, "ema_start": 3}),
                                          resume=True))
    for key in ("G", "D"):
        assert all(torch.equal(tensor, resumed[key][name]) for name, tensor in load_checkpoint(straight)[key].items())
    # the EMA began as G at step 3 and averaged steps 4 to 6 at decay 0.9
    parameters = [name for name, _ in build_models(dataclasses.asdict(tiny(tmp_path)))[0].named_parameters()]
    G_at = {step: load_checkpoint(straight / "checkpoints" / f"step_{step:06d}.pt")["G"] for step in (3, 4, 5, 6)}
    for name in parameters:
        expected = G_at[3][name]
        for step in (4, 5, 6):
            expected = 0.9 * expected + 0.1 * G_at[step][name]
        torch.testing.assert_close(resumed["G_ema"][name], expected, rtol=0, atol=1e-6)
    assert (resumed["config"]["ema_decay"], resumed["config"]["ema_start"]) == (0.9, 3)
    assert json.loads((tmp_path / "resumed" / "config.json").read_text())["ema_decay"] == 0.9


def test_resume_refuses_a_different_run_and_fresh_runs_refuse_to_overwrite(tmp_path):
    run_dir = train.train(tiny(tmp_path, steps=1))
    with pytest.raises(ConfigError, match=r"batch_size: run has 8, asked for 16"):
        train.train(tiny(tmp_path, steps=2, batch_size=16), resume=True)
    with pytest.raises(ConfigError, match="already holds a run"):
        train.train(tiny(tmp_path, steps=1))
    assert load_checkpoint(run_dir)["step"] == 1


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny(tmp_path, steps=6, checkpoint_every=2)
    # The loader's epoch 0 visits randperm(64) seeded with the run's seed: poison what the 4th step reads.
    order = torch.randperm(64, generator=torch.Generator().manual_seed(config.seed))
    images = torch.rand(64, 1, 28, 28) * 2 - 1
    images[order[3 * config.batch_size:]] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss at step 4 .*checkpoints/latest.pt, is intact"):
        train.train(config, dataset=TensorDataset(images, torch.zeros(64)))
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["G"].values() if t.is_floating_point())


def test_a_checkpoint_write_killed_halfway_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "latest.pt"
    atomic_save({"step": 1, "weights": torch.ones(1000)}, path)
    # A child process starts overwriting it with a large payload and is killed mid-write.
    script = f"""
import os, signal, torch, sys
sys.path.insert(0, {str(ROOT)!r})
from checkpoint import atomic_save
class KillMidWrite:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
atomic_save({{"step": 2, "weights": torch.zeros(1_000_000), "tail": KillMidWrite()}}, {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(1000))


@pytest.mark.slow
def test_wgan_gp_trains_through_attention_with_double_backward(tmp_path):
    run_dir = train.train(tiny(tmp_path, loss="wgan-gp", d_steps=2, steps=2, image_size=64, synthetic_size=32))
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert len(rows) == 2 and all(float(r["d_loss"]) == float(r["d_loss"]) for r in rows)


@pytest.mark.slow
def test_compare_gives_both_arms_the_same_fixed_noise_and_data_order(tmp_path):
    runs = train.compare(tiny(tmp_path, "cmp", steps=2))
    with_attn, without = runs["sagan"], runs["baseline"]
    assert torch.equal(torch.load(with_attn / "fixed_z.pt"), torch.load(without / "fixed_z.pt"))
    assert load_checkpoint(with_attn)["loader"] == load_checkpoint(without)["loader"]
    assert json.loads((with_attn / "config.json").read_text())["attn"] is True
    assert json.loads((without / "config.json").read_text())["attn"] is False
    G, info = load_generator(with_attn)
    assert info["step"] == 2 and len(G.attention_gammas()) == 1
    assert "gamma_G0" in open(with_attn / "metrics.csv").readline()
    assert "gamma_G0" not in open(without / "metrics.csv").readline()


def _cli(*args, cwd=ROOT, **kwargs):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=cwd, **kwargs)


@pytest.mark.slow
def test_cli_writes_the_whole_run_directory(tmp_path):
    out = tmp_path / "cli"
    result = _cli("--dataset", "synthetic", "--image-size", "28", "--steps", "4", "--batch-size", "8",
                  "--conv-dim", "16", "--sample-every", "2", "--checkpoint-every", "2", "--log-every", "1",
                  "--ema-decay", "0.9", "--ema-rampup", "0", "--d-lr", "3e-4", "--no-attn", "--quiet", "--out", str(out))
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["d_lr"] == 3e-4 and config["attn"] is False and config["steps"] == 4
    for name in ("fixed_z.pt", "metrics.csv", "samples/step_000002.png", "samples/step_000004.png",
                 "checkpoints/latest.pt", "checkpoints/step_000002.pt", "checkpoints/step_000004.pt"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    header = open(out / "metrics.csv").readline().strip().split(",")
    assert header[:5] == ["step", "d_loss", "g_loss", "d_real", "d_fake"] and {"img_per_s", "wall_time"} <= set(header)
    from PIL import Image
    assert Image.open(out / "samples/step_000004.png").size == (8 * 30 + 2, 8 * 30 + 2)
    checkpoint = load_checkpoint(out)
    assert {"G", "D", "G_ema", "opt_G", "opt_D", "scaler", "step", "config", "rng", "loader"} <= set(checkpoint)

    resumed = _cli("--resume", str(out), "--steps", "6", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out)["step"] == 6


def test_cli_refuses_bad_values_with_a_clear_message(tmp_path, capsys):
    # train.main as the script runs it, in this process: an exception escaping it would fail the test
    assert train.main(["--batch-size", "0", "--out", str(tmp_path / "x")]) == 2
    assert "batch_size must be a positive integer, got 0" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_a_step_boundary_and_the_run_resumes(tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *sum(([f"--{k.replace('_', '-')}", str(v)]
                               for k, v in TINY.items() if k != "quiet"), []), "--steps", "100000", "--quiet",
                               "--checkpoint-every", "100000", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while not (out / "metrics.csv").exists() or len(open(out / "metrics.csv").readlines()) < 3:
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    step = load_checkpoint(out)["step"]
    assert 2 <= step < 100000
    assert f"Stopped at step {step}; checkpoint saved. Resume with" in stderr
    resumed = _cli("--resume", str(out), "--steps", str(step + 1), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(out)["step"] == step + 1


def test_training_uses_the_whole_dataset(data_root):
    dataset, name = train.load_training_data(TrainConfig(dataset="mnist", data_root=str(data_root), synthetic_size=64))
    assert name == "mnist" and len(dataset) == 60_000
    dataset, _ = train.load_training_data(TrainConfig(dataset="celeba", data_root=str(data_root), synthetic_size=64))
    assert len(dataset) == 10_000
    dataset, _ = train.load_training_data(TrainConfig(dataset="synthetic", synthetic_size=64))
    assert len(dataset) == 64


def test_r1_penalty_of_a_linear_critic_is_its_squared_weight_norm():
    critic = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        critic[1].weight.copy_(torch.tensor([[3.0, 0.0, 4.0, 0.0]]))
    assert train.r1_penalty(critic, torch.randn(5, 1, 2, 2)).item() == pytest.approx(25.0)


def test_r1_is_added_to_D_loss_every_r1_every_steps_scaled_by_it(tmp_path):
    plain, penalised = _state(tmp_path), _state(tmp_path, r1_weight=2.0, r1_every=2)
    losses = [(train.discriminator_step(plain)["d_loss"].item(), train.discriminator_step(penalised)["d_loss"].item())]
    plain.step = penalised.step = 1
    losses.append((train.discriminator_step(plain)["d_loss"].item(), train.discriminator_step(penalised)["d_loss"].item()))
    assert losses[0][1] > losses[0][0] + 1e-6, "step 0: R1 applies"
    assert losses[1][1] == pytest.approx(losses[1][0], abs=0.05), "step 1: no R1 (only the weights differ, slightly)"


def test_diffaugment_reaches_D_in_both_updates(tmp_path):
    plain, augmented = _state(tmp_path), _state(tmp_path, augment="translation,cutout")
    seen = {"plain": [], "augmented": []}
    for name, state in (("plain", plain), ("augmented", augmented)):
        state.D.register_forward_pre_hook(lambda module, inputs, name=name: seen[name].append(inputs[0].detach().clone()))
        train.train_step(state)
    (d_plain, g_plain), (d_augmented, g_augmented) = seen["plain"], seen["augmented"]
    assert d_plain.shape == d_augmented.shape and not torch.equal(d_plain, d_augmented)
    assert (d_augmented == 0).float().mean() > (d_plain == 0).float().mean() + 0.1, "cutout's zeros reach D's update"
    assert (g_augmented == 0).float().mean() > (g_plain == 0).float().mean() + 0.1, "and G's update"


def test_ema_copies_G_until_ema_start_then_averages(tmp_path):
    state = _state(tmp_path, ema_decay=0.5, ema_start=3)
    for _ in range(2):
        train.train_step(state)
        assert all(torch.equal(e, p) for e, p in zip(state.G_ema.parameters(), state.G.parameters()))
    train.train_step(state)
    assert any(not torch.equal(e, p) for e, p in zip(state.G_ema.parameters(), state.G.parameters()))


def test_the_ema_sampler_gets_batchnorm_statistics_of_its_own_weights(tmp_path):
    state = _state(tmp_path, ema_decay=0.5)
    for _ in range(3):
        train.train_step(state)
    assert state.ema_stale
    sampler = state.sampler()
    assert sampler is state.G_ema and not state.ema_stale
    G_mean = [m.running_mean for m in state.G.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    ema_mean = [m.running_mean for m in state.G_ema.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(not torch.equal(a, b) for a, b in zip(G_mean, ema_mean)), "not the live G's statistics"
    expected = {k: v.clone() for k, v in state.G_ema.state_dict().items()}
    standing_statistics(state.G_ema, state.generator_inputs)
    assert all(torch.equal(v, state.G_ema.state_dict()[k]) for k, v in expected.items())


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_a_time_budget_stops_the_run_and_evaluates_at_each_multiple_of_eval_minutes(tmp_path, data_root, clock):
    budget = dict(dataset="mnist-5k", data_root=str(data_root), steps=100_000, minutes=0.1, eval_minutes=0.03,
                  eval_n=200, ema_decay=0.9, log_every=1, sample_every=1000, checkpoint_every=1000, clock=clock)
    run_dir = train.train(tiny(tmp_path, **budget))
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    wall = [float(row[f"{clock}_time"]) for row in rows]
    # the first step past the budget is the last; metrics.csv rounds times to 0.01 s, so 5.996 s reads 6.0
    assert wall[-1] >= 0.1 * 60 - 0.005 and wall[-2] < 0.1 * 60 + 0.005, "the first step past the budget is the last"
    period = 0.03 * 60
    crossing = {i for i in range(len(rows)) if wall[i] // period > (wall[i - 1] if i else 0) // period}
    evaluated = {i for i, row in enumerate(rows) if row["classifier_fid"]}
    # metrics.csv rounds wall_time to 0.01 s: a row that close to a multiple may have crossed it or not
    unsure = {i for i in range(len(rows)) for j in (i, i - 1) if j >= 0 and abs(wall[j] / period - round(wall[j] / period)) * period < 0.006}
    assert evaluated - unsure == (crossing | {len(rows) - 1}) - unsure, "each step that crosses a multiple, and the last"
    assert len(evaluated) >= 2, "at least one multiple crossed before the last step"  # more when steps are fast
    assert all(rows[i]["ema_classifier_fid"] for i in evaluated)
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint["step"] == int(rows[-1]["step"]) and checkpoint[f"{clock}_time"] == pytest.approx(wall[-1], abs=0.01)
    resumed = train.train(tiny(tmp_path, **budget), resume=True)
    assert load_checkpoint(resumed)["step"] == checkpoint["step"], "a spent budget trains no further"


def test_the_training_clock_leaves_out_what_runs_while_paused():
    clock = Stopwatch(100.0, 50.0)
    with clock.paused():
        time.sleep(0.3)
        sum(i * i for i in range(2_000_000))  # CPU work
    wall, cpu = clock.read()
    assert 100.0 <= wall < 100.1 and 50.0 <= cpu < 50.05


@pytest.mark.parametrize("every_steps, before, after, minutes, expected", [
    (10, 0.0, 1.0, 0.0, False), (0, 59.0, 61.0, 1.0, True), (0, 61.0, 62.0, 1.0, False), (0, 119.9, 120.0, 1.0, True),
    (0, 10.0, 500.0, 0.0, False),
])
def test_due_by_time(every_steps, before, after, minutes, expected):
    assert train.due(7, every_steps, before, after, minutes) is expected


@pytest.mark.parametrize("step, every_steps, expected", [(20, 10, True), (21, 10, False), (20, 0, False), (3, 1, True)])
def test_due_by_steps_whatever_the_time(step, every_steps, expected):
    assert train.due(step, every_steps, 10.0, 11.0, 0.0) is expected
    assert train.due(step, every_steps, 59.0, 61.0, 1.0) is True, "a crossed time period is due at any step"


@pytest.mark.slow
def test_latest_is_written_by_time_as_well_as_by_steps(tmp_path):
    seen = []
    config = tiny(tmp_path, steps=30, checkpoint_every=1000, checkpoint_minutes=0.002, sample_every=1,
                  ema_decay=0.0)  # no EMA: its standing statistics at every grid would dominate the time
    run_dir = Path(config.out)

    def record(step, grid):  # called each step, before that step's checkpoint
        latest = run_dir / "checkpoints" / "latest.pt"
        seen.append(load_checkpoint(latest)["step"] if latest.exists() else 0)

    train.train(config, on_sample=record)
    middle = sorted(set(seen) - {0})
    assert len(middle) >= 2, "checkpoints between the start and the end, by time alone (none is due by steps)"
    assert not list((run_dir / "checkpoints").glob("step_*.pt")), "step copies stay step-based"


@pytest.mark.slow
def test_a_run_killed_at_random_moments_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    """SIGKILL four times at random moments past steps the run has logged (so the count does not depend on the
    machine's speed), one of them while latest.pt is being written; each time the run resumes."""
    flags = ["--dataset", "synthetic", "--image-size", "28", "--synthetic-size", "64", "--conv-dim", "16",
             "--batch-size", "8", "--steps", "120", "--log-every", "1", "--sample-every", "25", "--checkpoint-every",
             "1000", "--checkpoint-minutes", "0.03", "--ema-decay", "0.9", "--ema-rampup", "0", "--threads", "1", "--quiet"]
    straight = _cli(*flags, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    out, rng = tmp_path / "killed", random.Random(0)
    checkpoints, killed_mid_write = out / "checkpoints", False
    for kill, past_step in enumerate((20, 45, 70, 95)):
        resume = ["--resume", str(out), "--steps", "120", "--threads", "1", "--quiet"]
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *(resume if out.exists() else [*flags, "--out", str(out)])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        while last_logged_step(out) < past_step:
            assert process.poll() is None, f"the run ended before step {past_step}"
            time.sleep(0.01)
        if kill == 1:  # wait for a write: the temporary file exists and has not been renamed yet
            while not list(checkpoints.glob(".latest.pt.*.tmp")):
                assert process.poll() is None, "the run ended without another checkpoint"
                time.sleep(0.001)
        else:
            time.sleep(rng.random() * 0.2)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_mid_write |= bool(list(checkpoints.glob(".latest.pt.*.tmp")))
    assert killed_mid_write, "one kill landed while latest.pt was being written"
    finished = _cli("--resume", str(out), "--steps", "120", "--threads", "1", "--quiet")
    assert finished.returncode == 0, finished.stderr

    expected, got = load_checkpoint(tmp_path / "straight"), load_checkpoint(out)
    assert got["step"] == expected["step"] == 120
    for key in ("G", "D", "G_ema"):
        assert all(torch.equal(tensor, got[key][name]) for name, tensor in expected[key].items()), key
    for key in ("opt_G", "opt_D"):
        for index, values in expected[key]["state"].items():
            assert all(torch.equal(tensor, got[key]["state"][index][name]) for name, tensor in values.items()), key
    steps = [int(row["step"]) for row in csv.DictReader(open(out / "metrics.csv"))]
    assert steps == list(range(1, 121)), "each step logged exactly once"
    assert not list(checkpoints.glob(".*.tmp")), "the killed write's temporary file was cleaned up"


@pytest.mark.slow
def test_a_conditional_run_resumes_bitwise_and_lays_its_grid_out_one_row_per_class(tmp_path):
    conditional = dict(dataset="mnist-5k", conditional=True, ema_decay=0.9, reuse_fakes=True, augment="translation",
                       r1_weight=1.0, r1_every=2)
    straight = load_checkpoint(train.train(tiny(tmp_path, "straight", **conditional)))
    train.train(tiny(tmp_path, "resumed", **{**conditional, "steps": 3}))
    resumed = load_checkpoint(train.train(tiny(tmp_path, "resumed", **conditional), resume=True))
    for key in ("G", "D", "G_ema"):
        assert all(torch.equal(t, resumed[key][name]) for name, t in straight[key].items()), key
    assert resumed["config"]["num_classes"] == 10
    from PIL import Image
    assert Image.open(tmp_path / "resumed" / "samples" / "step_000006.png").size == (8 * 30 + 2, 10 * 30 + 2)
    G, info = load_generator(tmp_path / "resumed")
    assert G.num_classes == 10 and info["model_kwargs"]["num_classes"] == 10
    assert G.sample(torch.randn(4, 100), torch.tensor([0, 3, 5, 9])).shape == (4, 1, 28, 28)


def test_the_conditional_step_feeds_D_the_real_labels_and_G_the_drawn_ones(tmp_path):
    # without reuse_fakes, the G update draws fakes (and labels) of its own; with it, G's labels are D's fakes' labels
    state = build_state(tiny(tmp_path, dataset="mnist-5k", conditional=True, num_classes=10, reuse_fakes=False),
                        train.data.load_dataset("mnist-5k", image_size=28, channels=1), torch.device("cpu"))
    seen = []
    state.D.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    expected_real = train.data.EndlessLoader(state.loader.dataset, 8, seed=0, labels=True)
    train.train_step(state)
    d_labels, g_labels = seen
    assert torch.equal(d_labels[:8], next(expected_real)[1]), "D sees the real batch's own labels"
    assert len(g_labels) == 8 and 0 <= min(d_labels.min(), g_labels.min()) and max(d_labels.max(), g_labels.max()) < 10
    assert not torch.equal(d_labels[8:], g_labels), "fresh labels for G's fresh fakes"


def test_conditional_training_needs_labelled_data(tmp_path):
    with pytest.raises(ConfigError, match="synthetic has no classes"):
        train.train(tiny(tmp_path, conditional=True))
    with pytest.raises(ConfigError, match="num_classes must be 0 without --conditional"):
        TrainConfig(num_classes=10)


@pytest.mark.parametrize("precision", ["bf16", "bf16-sim"])
def test_a_bf16_step_trains_G_and_D_with_finite_losses(tmp_path, precision):
    state = _state(tmp_path, precision=precision, batch_size=4)
    assert state.amp_dtype == torch.bfloat16 and state.precision == precision
    G0, D0 = _snapshot(state.G), _snapshot(state.D)
    metrics = train.train_step(state)
    assert all(torch.isfinite(value) for value in metrics.values())
    assert any(not torch.equal(G0[k], v) for k, v in state.G.state_dict().items() if "weight" in k)
    assert any(not torch.equal(D0[k], v) for k, v in state.D.state_dict().items() if "weight" in k)
    assert all(p.dtype == torch.float32 for p in [*state.G.parameters(), *state.D.parameters()]), "weights stay fp32"


def test_each_start_of_a_run_records_the_precision_it_trained_in(tmp_path):
    run_dir = train.train(tiny(tmp_path, steps=2, precision="bf16-sim"))
    train.train(resumed_config(read_config(run_dir), steps=3, precision="fp32"), resume=True)
    assert [(s["step"], s["precision"]) for s in read_sessions(run_dir)] == [(0, "bf16-sim"), (2, "fp32")]


def test_bf16_sim_refuses_a_device_other_than_the_cpu_and_compile(tmp_path):
    with pytest.raises(ConfigError, match="'bf16-sim' simulates bf16 on a CPU; on meta use 'bf16'"):
        build_state(tiny(tmp_path, precision="bf16-sim"), None, torch.device("meta"))
    with pytest.raises(ConfigError, match="'bf16-sim' runs eagerly .* drop --compile"):
        build_state(tiny(tmp_path, precision="bf16-sim", compile=True), None, torch.device("cpu"))


def test_a_bf16_sim_step_runs_its_convolutions_and_products_through_the_simulation(tmp_path, monkeypatch):
    simulated = set()
    dispatch = utils.SimulatedBf16.__torch_dispatch__

    def recording(self, func, types, args=(), kwargs=None):
        if func in self.OPS and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in args):
            simulated.add(func)
        return dispatch(self, func, types, args, kwargs)

    monkeypatch.setattr(utils.SimulatedBf16, "__torch_dispatch__", recording)
    train.train_step(_state(tmp_path, precision="bf16-sim", batch_size=4))
    aten = torch.ops.aten
    assert {aten.convolution.default, aten.convolution_backward.default, aten.addmm.default} <= simulated


@pytest.mark.parametrize("step, expected", [(1, 0.0), (4, 0.0), (5, 0.5 ** (1 / 0.5)), (40, 0.5 ** (1 / 4)), (10_000, 0.99)])
def test_the_ema_ramp_caps_the_half_life_at_a_fraction_of_the_steps_so_far(step, expected):
    config = TrainConfig(**{**TINY, "ema_decay": 0.99, "ema_start": 5, "ema_rampup": 0.1})
    assert train.ema_decay_at(config, step) == pytest.approx(expected)
    # the half-life of the decay, in steps, is 0.1 x step while the ramp caps it
    if 5 <= step <= 40:
        assert 0.5 ** (1 / (0.1 * step)) == pytest.approx(train.ema_decay_at(config, step))


def test_learning_rates_decay_linearly_to_zero_over_the_last_part_of_the_budget(tmp_path):
    state = _state(tmp_path, steps=10, lr_decay=0.4, g_lr=1e-3, d_lr=2e-3)
    seen = []
    for _ in range(10):
        train.train_step(state)
        seen.append((state.opt_G.param_groups[0]["lr"], state.opt_D.param_groups[0]["lr"]))
    # the lr a step used was set from the steps done before it: 0..9 of 10; decay starts at 6 (the last 40%)
    expected_scale = [1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25]
    assert [g for g, _ in seen] == pytest.approx([1e-3 * s for s in expected_scale])
    assert [d for _, d in seen] == pytest.approx([2e-3 * s for s in expected_scale])


def test_a_time_budget_decays_the_learning_rates_by_training_time(tmp_path):
    state = _state(tmp_path, steps=1000, minutes=10, lr_decay=0.5)
    state.cpu_time = state.wall_time = 7.5 * 60  # three quarters of the 10 minutes, under 1% of the steps
    assert train.learning_rate_scale(state) == pytest.approx(0.5)


def test_a_run_paused_and_resumed_decays_its_learning_rates_as_one_that_ran_through(tmp_path):
    """A pause (as study.py's milestones make) keeps the budget, so --lr-decay's schedule runs as in one go."""
    settings = dict(steps=6, lr_decay=0.5, checkpoint_every=1000)
    straight = train.train(tiny(tmp_path, "straight", **settings))
    paused = train.train(tiny(tmp_path, "paused", **settings), pause_step=3)
    assert load_checkpoint(paused)["step"] == 3
    train.train(tiny(tmp_path, "paused", **settings), resume=True)
    a, b = load_checkpoint(straight), load_checkpoint(paused)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(v, b["G"][k]) for k, v in a["G"].items())
    lr = TrainConfig().g_lr * 2 / 6  # two of the six steps left, the last half decaying
    assert a["opt_G"]["param_groups"][0]["lr"] == b["opt_G"]["param_groups"][0]["lr"] == pytest.approx(lr)


def test_a_run_with_lr_decay_refuses_a_new_budget_on_resume(tmp_path):
    train.train(tiny(tmp_path, steps=2, lr_decay=0.5))
    with pytest.raises(ConfigError, match="lr_decay"):
        train.train(tiny(tmp_path, steps=4, lr_decay=0.5), resume=True)
