"""Train SAGAN (Zhang et al. 2018, https://arxiv.org/abs/1805.08318) or its no-attention (DCGAN) baseline.

    python train.py --dataset mnist --steps 2000              # SAGAN on MNIST, run dir under runs/
    python train.py --dataset mnist --steps 2000 --no-attn    # the baseline
    python train.py --dataset mnist --recipe original         # the original project's recipe
    python train.py --dataset celeba --compare --out runs/cmp # both arms, same seed, data order and noise
    python train.py --resume runs/cmp/sagan --steps 4000
    torchrun --nproc_per_node=4 train.py --dataset celeba     # DDP: global batch = 4 x --batch-size

This file reads top to bottom: the losses, one step, the loop, the command line. What a run is (TrainConfig,
recipes, arms) lives in config.py, the state a step touches in state.py, the run directory's files in rundir.py.
Every TrainConfig field is a flag (`batch_size` -> `--batch-size`); notebooks call compare(config) or train(config).
"""
import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

import data
import distributed
import evaluate
import rundir
from checkpoint import CheckpointError, checkpoint_files, read_config
from config import (ARMS, LOSSES, RECIPES, WHOLE_RECIPES, ConfigError, TrainConfig, add_flags, arm_folder, arm_of,
                    field_overrides, resumed_config)
from distributed import any_process, mean_over_processes
from ema import update_ema
from state import TrainState, build_state
from utils import Stopwatch, closing, honour_ctrl_c, stop_at_step_boundary


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


# ---------------------------------------------------------------------------------------------- losses

def discriminator_loss(kind: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """D's loss on its logits for real and (detached) fake images, without any gradient penalty."""
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if kind == "nonsaturating":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if kind == "wgan-gp":
        return d_fake.mean() - d_real.mean()
    raise ConfigError(f"loss must be one of {LOSSES}, got {kind!r}")


def generator_loss(kind: str, d_fake: torch.Tensor) -> torch.Tensor:
    """G's loss on D's logits for fresh fakes."""
    if kind == "nonsaturating":
        return F.softplus(-d_fake).mean()
    return -d_fake.mean()  # hinge and WGAN share it


def gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, noise: torch.Generator,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP: mean of (||grad_x D(x)|| - 1)^2 at random interpolates of real and fake, computed in fp32."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=noise).to(real.device)
    mixed = torch.lerp(fake.float(), real.float(), alpha).requires_grad_(True)
    return (_input_gradient(D, mixed, labels).flatten(1).norm(dim=1) - 1).square().mean()


def r1_penalty(D: nn.Module, real: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): mean of ||grad_x D(x)||^2 at real images, computed in fp32."""
    return _input_gradient(D, real.detach().float().requires_grad_(True), labels).flatten(1).square().sum(dim=1).mean()


def _input_gradient(D: nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """d(sum of D's logits)/d(images), with its graph kept for the penalty's own backward."""
    # The fused attention kernels have no double backward; the math kernel is the same function.
    with torch.autocast(images.device.type, enabled=False), sdpa_kernel([SDPBackend.MATH]):
        logits = D(images) if labels is None else D(images, labels)  # any critic module works unconditionally
        (grad,) = torch.autograd.grad(logits.sum(), images, create_graph=True)
    return grad


# ---------------------------------------------------------------------------------------------- one step

Fakes = tuple[torch.Tensor, torch.Tensor | None]  # generated images and, in a conditional run, their labels


def discriminator_step(state: TrainState, fakes: Fakes | None = None) -> dict[str, torch.Tensor]:
    """One D update on a real batch and a batch of detached fakes (drawn here unless given)."""
    config, D = state.config, state.D
    real, real_labels = state.next_real()
    if fakes is None:
        with torch.no_grad(), state.autocast():  # no graph through G: D's loss never reaches it
            fake_labels = state.sample_labels(real.shape[0])
            fakes = state.G(state.sample_z(real.shape[0]), fake_labels), fake_labels
    fake, fake_labels = fakes[0].detach(), fakes[1]
    labels = None if real_labels is None else torch.cat([real_labels, fake_labels])
    with state.autocast():
        # D has no batch statistics, so one pass over real and fake equals two (and runs one power iteration).
        d_real, d_fake = state.D_synced(state.augment(torch.cat([real, fake])), labels).float().chunk(2)
        loss = discriminator_loss(config.loss, d_real, d_fake)
    if config.loss == "wgan-gp":
        loss = loss + config.gp_weight * gradient_penalty(D, real, fake, state.noise, real_labels)
    if config.r1_weight and state.step % config.r1_every == 0:
        loss = loss + config.r1_weight / 2 * config.r1_every * r1_penalty(D, state.augment(real), real_labels)
    state.opt_D.zero_grad(set_to_none=True)
    state.scaler_D.scale(loss).backward()
    state.scaler_D.step(state.opt_D)
    state.scaler_D.update()
    return {"d_loss": loss.detach(), "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}


def fakes_for_G(state: TrainState) -> Fakes:
    """A batch from fresh noise with G's graph kept, for G's update."""
    with state.autocast():
        labels = state.sample_labels(state.config.batch_size)
        return state.G_synced(state.sample_z(state.config.batch_size), labels), labels


def generator_step(state: TrainState, fakes: Fakes | None = None) -> dict[str, torch.Tensor]:
    """One G update through a frozen D: D's weights, grads and power-iteration vectors are left untouched.
    `fakes`, if given, come from fakes_for_G; otherwise G makes a batch from fresh noise here."""
    fake, labels = fakes if fakes is not None else fakes_for_G(state)
    D = state.D
    D.eval().requires_grad_(False)  # eval: spectral norm reuses its vectors; no grads: no wasted weight gradients
    try:
        with state.autocast():
            loss = generator_loss(state.config.loss, state.D(state.augment(fake), labels).float())
        state.opt_G.zero_grad(set_to_none=True)
        state.scaler_G.scale(loss).backward()
        state.scaler_G.step(state.opt_G)
        state.scaler_G.update()
    finally:
        D.train().requires_grad_(True)
    if state.G_ema is not None:
        update_ema(state.G_ema, state.G, ema_decay_at(state.config, state.step + 1))  # state.step: steps before this
        state.ema_stale = True
    return {"g_loss": loss.detach()}


def ema_decay_at(config: TrainConfig, step: int) -> float:
    """The EMA's decay in the update of step `step` (from 1): 0 before ema_start (the EMA copies G), then
    ema_decay, with its half-life capped at ema_rampup x the steps so far (stylegan2-ada's ramp in images seen)."""
    if step < config.ema_start:
        return 0.0
    if config.ema_rampup:
        return min(config.ema_decay, 0.5 ** (1 / (config.ema_rampup * step)))
    return config.ema_decay


def learning_rate_scale(state: TrainState) -> float:
    """1 until the last lr_decay of the budget, then falling linearly to 0 at its end. The budget is --steps, or
    --minutes of training by the run's clock when those run out first."""
    config = state.config
    done = state.step / config.steps
    if config.minutes:
        done = max(done, state.training_seconds() / (60 * config.minutes))
    return min(1.0, max(0.0, 1 - done) / config.lr_decay)


def train_step(state: TrainState) -> dict[str, torch.Tensor]:
    """d_steps discriminator updates, then one generator update; returns the step's metrics as tensors.

    With reuse_fakes, G runs once per step: the last D update trains on its batch (detached), and the G
    update back-propagates through the same batch and the updated D, as the PyTorch DCGAN example does.
    Without it, the G update draws fresh noise and runs G again, as the original project does."""
    if state.config.lr_decay:
        scale = learning_rate_scale(state)
        for optimizer, lr in ((state.opt_G, state.config.g_lr), (state.opt_D, state.config.d_lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
    with state.numerics():
        for _ in range(state.config.d_steps - 1):
            discriminator_step(state)
        fakes = fakes_for_G(state) if state.config.reuse_fakes else None
        metrics = discriminator_step(state, fakes)
        metrics |= generator_step(state, fakes)
    state.step += 1
    return metrics


# ---------------------------------------------------------------------------------------------- the loop

def due(step: int, every_steps: int, seconds_before: float, seconds_after: float, every_minutes: float) -> bool:
    """A periodic task is due at a multiple of `every_steps` (0: never), or when the step carried the training time
    over a multiple of `every_minutes` (0: never)."""
    by_steps = every_steps > 0 and step % every_steps == 0
    period = every_minutes * 60
    return by_steps or (period > 0 and seconds_after // period > seconds_before // period)


def out_of_time(state: TrainState) -> bool:
    """The run has used its time budget (config.minutes)."""
    return 0 < state.config.minutes * 60 <= state.training_seconds()


def check_finite(metrics: dict[str, torch.Tensor], step: int, run_dir: Path) -> None:
    """Stop at a NaN or infinite loss. A NaN in any process reaches every process's weights through the gradient
    all-reduce within the step, so all processes stop here together."""
    if all(torch.isfinite(value) for value in metrics.values()):
        return
    values = ", ".join(f"{k}={v.item():.4g}" for k, v in metrics.items())
    latest = run_dir / "checkpoints" / "latest.pt"
    kept = f"the last good checkpoint, {latest}, is intact" if latest.exists() else "no checkpoint was written yet"
    raise NonFiniteLossError(f"Non-finite loss at step {step} ({values}); {kept}. "
                             "Try lower learning rates, --precision fp32 or --loss hinge.")


def evaluation_row(state: TrainState, scorer) -> dict[str, float]:
    """The scorer's columns for G, and for the EMA generator (prefixed ema_) when the run keeps one."""
    row = scorer(state.G)
    if state.G_ema is not None:
        row |= {f"ema_{name}": value for name, value in scorer(state.sampler()).items()}
    return row


def log_columns(state: TrainState, scorer) -> list[str]:
    gammas = [f"gamma_{net}{i}" for net in "GD" for i in range(len(getattr(state, net).attention_gammas()))]
    evaluations = scorer.names + [f"ema_{name}" for name in scorer.names if state.G_ema is not None] if scorer else []
    return ["step", "d_loss", "g_loss", "d_real", "d_fake", *gammas, "img_per_s", "wall_time", "cpu_time", *evaluations]


def train(config: TrainConfig, *, dataset: Dataset | None = None, resume: bool = False,
          on_sample: Callable[[int, Path], None] | None = None, pause_minutes: float = 0.0, pause_step: int = 0) -> Path:
    """Train according to `config`; returns the run directory.

    dataset: use this dataset instead of loading config.dataset (items: (image in [-1, 1], label)).
    resume: continue the run in config.out from its latest checkpoint (train.py --resume does this).
    on_sample: called with (step, grid path) after each sample grid (the notebooks show it inline).
    pause_minutes, pause_step: stop (checkpointed, to be resumed) once this much training time or this step is
    reached, before the budget (config.steps, config.minutes) is spent; schedules over the budget (--lr-decay) are
    unchanged by a pause, as they would be by a change of the budget.
    Ctrl-C checkpoints at the next step boundary, then raises KeyboardInterrupt.
    Under torchrun every process calls this; only rank 0 writes the run directory.
    """
    config = dataclasses.replace(config)  # the caller's config stays as it was
    if config.threads:
        torch.set_num_threads(config.threads)
    job, device = distributed.join(config.device)
    if dataset is None:
        dataset, config.dataset = load_training_data(config)
    if config.conditional:
        config.num_classes = classes_of(dataset, config)
    run_dir = rundir.run_dir_for(config, job)
    config.out = str(run_dir)
    if not resume and checkpoint_files(run_dir):
        raise ConfigError(f"{run_dir} already holds a run: resume it (--resume {run_dir}) or choose another --out")
    state = build_state(config, dataset, device, job)
    grid_inputs = rundir.open_run(state, run_dir, resume)
    scorer = evaluate.training_scorer(config, device) if job.is_main else None
    log = rundir.RunLog(run_dir, log_columns(state, scorer), state.step) if job.is_main else None
    if job.is_main:
        rundir.record_session(state, run_dir)
    progress = progress_bar(config, state.step, state.precision, disable=config.quiet or not job.is_main)
    clock = Stopwatch(state.wall_time, state.cpu_time)
    logged_at, images_since = state.wall_time, 0
    def finished() -> bool:
        paused = (pause_step and state.step >= pause_step) or 0 < pause_minutes * 60 <= state.training_seconds()
        return state.step >= config.steps or out_of_time(state) or bool(paused)

    last = finished()
    with stop_at_step_boundary() as stop_requested, closing(log, progress):
        while not last:
            before = state.training_seconds()
            metrics = train_step(state)
            state.wall_time, state.cpu_time = clock.read()
            check_finite(metrics, state.step, run_dir)
            progress.update(1)
            images_since += config.batch_size * job.world_size
            last = any_process(job.is_main and finished(), job, device)
            evaluating = scorer is not None and (last or due(state.step, config.eval_every, before,
                                                             state.training_seconds(), config.eval_minutes))
            if state.step % config.log_every == 0 or last or evaluating:
                seconds = max(state.wall_time - logged_at, 1e-9)
                row = metrics_row(state, mean_over_processes(metrics, job), images_since / seconds)
                logged_at, images_since = state.wall_time, 0
                if evaluating:
                    with clock.paused():  # measuring is not training: the budget and img/s leave it out
                        row |= evaluation_row(state, scorer)
                if log:
                    log.metrics(row)
                progress.set_postfix(postfix(row), refresh=False)
            stopping = any_process(stop_requested.is_set(), job, device)
            if job.is_main and (state.step % config.sample_every == 0 or last):
                grid = log.grid(state.sampler().sample(*grid_inputs), state.step)
                if on_sample:
                    on_sample(state.step, grid)
            if job.is_main and (last or stopping or due(state.step, config.checkpoint_every, before,
                                                        state.training_seconds(), config.checkpoint_minutes)):
                state.save(run_dir)
            if stopping:  # checkpointed above; raising tells callers (compare, notebooks) to stop too
                raise KeyboardInterrupt(f"Stopped at step {state.step}; checkpoint saved. "
                                        f"Resume with: python train.py --resume {run_dir}")
    return run_dir


def metrics_row(state: TrainState, metrics: dict[str, torch.Tensor], images_per_second: float) -> dict[str, float]:
    """A metrics.csv row: the step's losses and mean logits, the attention gammas, throughput and times."""
    gammas = {f"gamma_{net}{i}": round(gamma, 5) for net in "GD"
              for i, gamma in enumerate(getattr(state, net).attention_gammas())}
    return {"step": state.step, **{name: round(value.item(), 5) for name, value in metrics.items()}, **gammas,
            "img_per_s": round(images_per_second, 2), "wall_time": round(state.wall_time, 2),
            "cpu_time": round(state.cpu_time, 2)}


def load_training_data(config: TrainConfig) -> tuple[Dataset, str]:
    """The whole training set of config.dataset (MNIST falls back to mnist-5k offline), and its name."""
    size = config.synthetic_size if config.dataset == "synthetic" else None
    return data.load_dataset_with_fallback(config.dataset, config.data_root, image_size=config.image_size,
                                           channels=config.channels, size=size, seed=config.seed)


def classes_of(dataset: Dataset, config: TrainConfig) -> int:
    """The number of classes a conditional run trains on: the dataset's, which config.num_classes must match."""
    classes = len(getattr(dataset, "classes", []))
    if classes < 2:
        raise ConfigError(f"conditional training needs labelled data, and {config.dataset} has no classes: use mnist, "
                          f"mnist-5k or a folder with one subfolder per class")
    if config.num_classes not in (0, classes):
        raise ConfigError(f"num_classes is {config.num_classes}, but {config.dataset} has {classes} classes")
    return classes


def progress_bar(config: TrainConfig, start: int, precision: str, disable: bool):
    from tqdm.auto import tqdm

    arm = ARMS[arm_of(config)].label
    return tqdm(total=config.steps, initial=start, disable=disable, desc=f"{arm} {config.dataset} {precision}",
                unit="step", dynamic_ncols=True)


def postfix(row: dict) -> dict[str, str]:
    """What the progress bar shows of a metrics row."""
    shown = {"D": f"{row['d_loss']:.3f}", "G": f"{row['g_loss']:.3f}", "img/s": f"{row['img_per_s']:.0f}"}
    gammas = [value for name, value in row.items() if name.startswith("gamma_")]
    if gammas:
        shown["gamma"] = " ".join(f"{gamma:+.3f}" for gamma in gammas)
    return shown


def compare(config: TrainConfig, arms: tuple[str, ...] = tuple(ARMS), **kwargs) -> dict[str, Path]:
    """Train each arm (default: the baseline, then SAGAN) with the same seed, data order and fixed noise.

    Run directories: <out>/baseline and <out>/sagan. An arm that already has a checkpoint is resumed, so calling
    compare again continues the runs (with a higher `steps`, trains them longer). kwargs go to train().
    """
    root = Path(config.out) if config.out else rundir.new_run_dir(config.dataset, "compare")
    runs = {}
    for arm in arms:
        out = arm_folder(root, arm)
        runs[arm] = train(dataclasses.replace(config, attn=ARMS[arm].attn, out=str(out)),
                          resume=bool(checkpoint_files(out)), **kwargs)
    return runs


# ---------------------------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    """Flags for every TrainConfig field (only those given are returned), plus --resume, --compare and --recipe."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run (with --compare: both arms) from its "
                                                            "latest checkpoint")
    parser.add_argument("--compare", action="store_true", help="train the baseline and SAGAN, same seed, data and noise")
    parser.add_argument("--recipe", "--preset", default="default", metavar="RECIPE",
                        help="start from this recipe; other flags override it: 'default', 'original' (the original "
                             f"project's) or changes joined by '+' ({', '.join(name for name in RECIPES if name not in WHOLE_RECIPES)})")
    args = parser.parse_args(argv)
    return field_overrides(args), argparse.Namespace(resume=args.resume, compare=args.compare, recipe=args.recipe)


def config_from_args(overrides: dict, extras: argparse.Namespace) -> TrainConfig:
    """A new run's config from the flags, or a resumed run's config.json with the flags that may change."""
    if not extras.resume:
        return TrainConfig.from_recipe(extras.recipe, **overrides)
    if extras.recipe != "default":
        raise ConfigError("--recipe sets up a new run; a resumed run keeps the settings in its config.json")
    saved = read_config(resumed_run(Path(extras.resume)) if extras.compare else extras.resume)
    return resumed_config(saved, **{**overrides, "out": extras.resume})


def resumed_run(root: Path) -> Path:
    """One arm's run folder under a comparison folder (its settings are both arms' but attn)."""
    for arm in ARMS:
        if (arm_folder(root, arm) / "config.json").is_file():
            return arm_folder(root, arm)
    raise FileNotFoundError(f"{root} holds no arm of a comparison ({', '.join(ARMS)}): is it a folder written by --compare?")


def main(argv: list[str] | None = None) -> int:
    overrides, extras = parse_args(argv)
    try:
        config = config_from_args(overrides, extras)
        if extras.compare:
            message = "\n".join(f"{arm}: {path}" for arm, path in compare(config).items())
        else:
            message = f"run directory: {train(config, resume=bool(extras.resume))}"
        if distributed.is_main_process():
            print(message)
    except (ConfigError, data.DataError, FileNotFoundError, NonFiniteLossError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(str(interrupt) or "Interrupted.", file=sys.stderr)
        return 130
    finally:
        distributed.leave()
    return 0


if __name__ == "__main__":
    honour_ctrl_c()
    sys.exit(main())
