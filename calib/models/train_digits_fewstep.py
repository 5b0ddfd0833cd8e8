"""Distil the built-in digits model into its 4- and 8-step students and write
``calib/models/weights/digits_4step.safetensors`` and ``digits_8step.safetensors``.

    python -m calib.models.train_digits_fewstep    # ~5 minutes on one CPU core, seeded, reproduces the shipped files

Guidance and step distillation onto the student's step grid (a rectified-flow reflow on pieces of the teacher's
trajectories, as piecewise rectified flow does, with the pieces the sampler's own steps):

1. The teacher, the shipped ``builtin:digits`` model, draws trajectories from fresh noise as it is served: Euler
   steps of about 1/30 in sigma with classifier-free guidance 3 for each digit (and, for 10 % of them, the null
   class without guidance), kept at the sigmas the pipeline visits at 4 and at 8 steps (its scheduler's grids).
2. Each student starts as a copy of the teacher (transformer and prompt encoder). At a grid point sigma_j of its own
   grid, on a teacher trajectory, it learns the straight velocity to where the teacher is at the next grid point,
   (x_j - x_{j+1}) / (sigma_j - sigma_{j+1}), with the trajectory's class: one Euler step of the student then does
   what ~30 / N steps of the guided teacher do, and it needs no CFG. Windows are drawn in proportion to their width
   (the pipeline's last step, sigma 0.001 -> 0, is all but never drawn: it moves the image by 0.1 % of a velocity).

The noise comes from seed ``10_000 + seed``, so it never repeats the seeds 0, 1, ... that the measurements in
docs/models.md generate with.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import digits, digits_fewstep
from .builtin_pipeline import LossLog, optimizer_step, save_weights

TEACHER_STEPS = 30  # the teacher's Euler steps are about 1/30 in sigma, as in its served 30-step run
TEACHER_GUIDANCE = 3.0
NOISE_SEED_OFFSET = 10_000


def sigma_grid(steps: int) -> list[float]:
    """The sigmas a ``steps``-step generation of the pipeline visits, 0 included (its scheduler's own grid)."""
    scheduler = digits.build_scheduler()
    scheduler.set_timesteps(steps)
    return [float(s) for s in scheduler.sigmas]


def teacher_velocity(teacher, x, labels, sigma: float):
    """The teacher's velocity as its pipeline computes it: [uncond; cond] in one call, guidance 3 for digits, the
    null class alone (no guidance) for null-class rows."""
    txt_ids, img_ids = digits.position_ids()
    null = torch.full_like(labels, digits.NULL_CLASS)
    seq, pooled = teacher.prompt_encoder(torch.cat([null, labels]))
    both = teacher.transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=seq, pooled_projections=pooled,
                               timestep=torch.full((2 * x.shape[0],), sigma), img_ids=img_ids, txt_ids=txt_ids,
                               return_dict=False)[0]
    uncond, cond = both.chunk(2)
    scale = torch.where(labels == digits.NULL_CLASS, 1.0, TEACHER_GUIDANCE)[:, None, None]
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def teacher_trajectories(teacher, pairs: int, seed: int, edges: list[float], null_share: float = 0.1,
                         chunk: int = 256, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, labels): ``pairs`` teacher trajectories from fresh noise, kept at the sigmas ``edges`` (1 first, 0
    last) -> states (pairs, len(edges), 16, 4). Between two edges the teacher takes Euler steps of about
    1 / TEACHER_STEPS (exactly the pipeline's when ``edges`` is its 30-step grid). Digits in turn; every
    ``round(1 / null_share)``-th trajectory is of the null class."""
    gen = torch.Generator().manual_seed(NOISE_SEED_OFFSET + seed)
    labels = torch.arange(pairs) % digits.NUM_CLASSES
    every = round(1 / null_share) if null_share > 0 else 0
    if every:
        labels[every - 1 :: every] = digits.NULL_CLASS
    noise = torch.randn((pairs, digits.TOKENS, digits.CHANNELS), generator=gen)
    fine = [edges[0]]
    for hi, lo in zip(edges, edges[1:]):
        cuts = max(1, round((hi - lo) * TEACHER_STEPS))
        fine += [hi - (hi - lo) * (i + 1) / cuts for i in range(cuts - 1)] + [lo]
    keep = [fine.index(e) for e in edges]
    states = torch.empty((pairs, len(edges), digits.TOKENS, digits.CHANNELS))
    start = time.perf_counter()
    for lo in range(0, pairs, chunk):
        x, y = noise[lo : lo + chunk].clone(), labels[lo : lo + chunk]
        states[lo : lo + chunk, 0] = x
        for k, (s, s_next) in enumerate(zip(fine, fine[1:]), start=1):
            x = x + (s_next - s) * teacher_velocity(teacher, x, y, s)  # Euler, as the scheduler steps
            if k in keep:
                states[lo : lo + chunk, keep.index(k)] = x
        log(f"teacher trajectories {min(lo + chunk, pairs):5d}/{pairs}  {time.perf_counter() - start:6.1f}s "
            f"({len(fine) - 1} Euler steps each)")
    return states, labels


def distil(teacher_modules, states, labels, union: list[float], student_steps: int, steps: int, batch: int,
           lr: float, seed: int, log=print):
    """One student for the ``student_steps`` grid, trained from a copy of the teacher on its windows' starts."""
    grid = sigma_grid(student_steps)
    columns = [union.index(s) for s in grid]
    states = states[:, columns]
    sigmas = torch.tensor(grid)
    transformer, encoder = digits.build_transformer(), digits.DigitPromptEncoder()
    transformer.load_state_dict(teacher_modules[0].state_dict())
    encoder.load_state_dict(teacher_modules[1].state_dict())
    transformer.train()
    encoder.train()
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    txt_ids, img_ids = digits.position_ids()
    widths = sigmas[:-1] - sigmas[1:]
    gen = torch.Generator().manual_seed(seed)
    losses = LossLog(log)
    for step in range(1, steps + 1):
        idx = torch.randint(0, states.shape[0], (batch,), generator=gen)
        window = torch.multinomial(widths, batch, replacement=True, generator=gen)
        x_start, x_end = states[idx, window], states[idx, window + 1]
        target = (x_start - x_end) / widths[window][:, None, None]  # the straight velocity across the window
        seq, pooled = encoder(labels[idx])
        pred = transformer(hidden_states=x_start, encoder_hidden_states=seq, pooled_projections=pooled,
                           timestep=sigmas[window], img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer_step(loss, opt, sched, params)
        losses.update(step, loss)
    info = {"student_steps": student_steps, "grid": [round(s, 4) for s in grid], "steps": steps, "batch": batch,
            "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - losses.start, 1),
            "loss_history": losses.history}
    return transformer, encoder, info


def train(steps: int = 600, batch: int = 128, lr: float = 1e-3, seed: int = 0, pairs: int = 1280,
          student_steps=digits_fewstep.STEP_COUNTS, teacher_weights: Path | None = None, log=print):
    """{step count: (transformer, prompt encoder, training info)}, one student per step count, all distilled from
    the same teacher trajectories."""
    torch.manual_seed(seed)
    teacher = digits.load_pipeline(weights=teacher_weights)
    union = sorted({s for n in student_steps for s in sigma_grid(n)}, reverse=True)
    start = time.perf_counter()
    states, labels = teacher_trajectories(teacher, pairs, seed, union, log=log)
    teacher_info = {"trajectories": pairs, "teacher_guidance": TEACHER_GUIDANCE, "null_share": 0.1,
                    "teacher_seconds": round(time.perf_counter() - start, 1)}
    students = {}
    for n in student_steps:
        log(f"student for {n} steps")
        transformer, encoder, info = distil((teacher.transformer, teacher.prompt_encoder), states, labels, union, n,
                                            steps, batch, lr, seed, log)
        students[n] = (transformer, encoder, {**info, **teacher_info})
    return students


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per student")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=1280, help="teacher trajectories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=digits.WEIGHTS_DIR)
    args = parser.parse_args(argv)
    students = train(args.steps, args.batch, args.lr, args.seed, args.pairs)
    for n, (transformer, encoder, info) in students.items():
        out = args.out_dir / digits_fewstep.weights_file(n).name
        save_weights(out, transformer, encoder, {"training": info, "config": digits.TRANSFORMER_CONFIG,
                                                 "teacher": digits.WEIGHTS_FILE.name})
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); teacher {info['teacher_seconds']} s, "
              f"student {info['seconds']} s")


if __name__ == "__main__":
    main()
