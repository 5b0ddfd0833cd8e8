"""Train the built-in Wan video model and write ``calib/models/weights/wan_digits.safetensors``.

    python -m calib.models.train_wan_digits            # ~5 minutes on 2 free CPU cores, seeded

Clips: a bundled 8x8 digit drifting one pixel per frame across a 12x12 canvas over 4 frames, direction (one of 8) and
start random per sample (:func:`calib.models.wan_digits.make_clips`). Rectified flow: x_t = (1 - t) x_0 + t * noise,
the transformer gets timestep 1000 t (the scale of the scheduler's timesteps) and predicts noise - x_0. Labels are
replaced by the null class 10 % of the time so classifier-free guidance works at sampling time. The smoothed loss is
printed every 100 steps and stored with the training settings in the safetensors metadata. Bit-identical weights
need the same torch build and thread count.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from . import wan_digits
from .builtin_pipeline import LossLog, optimizer_step, save_weights


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` x the peak."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return ramp * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def train(steps: int = 800, batch: int = 64, lr: float = 1e-3, seed: int = 0, null_prob: float = 0.1,
          warmup: int = 0, logit_normal: bool = False, log=print):
    torch.manual_seed(seed)
    images, labels = wan_digits.load_digits_dataset()
    transformer = wan_digits.build_transformer()
    encoder = wan_digits.WanDigitPromptEncoder()
    transformer.train()
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    losses = LossLog(log)
    cpu_start = time.process_time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x0 = wan_digits.make_clips(images[idx], gen)
        y = labels[idx].clone()
        y[torch.rand(batch, generator=gen) < null_prob] = wan_digits.NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        if logit_normal:  # SD3's timestep density: more samples at mid noise levels, fewer at the ends
            t = torch.sigmoid(torch.randn(batch, generator=gen))
        else:
            t = torch.rand(batch, generator=gen)
        tb = t.view(batch, 1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * noise
        pred = transformer(hidden_states=xt, timestep=t * 1000, encoder_hidden_states=encoder(y), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        optimizer_step(loss, opt, sched, params)
        losses.update(step, loss)
    elapsed, cpu = time.perf_counter() - losses.start, time.process_time() - cpu_start
    transformer.eval()
    encoder.eval()
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "null_prob": null_prob, "warmup": warmup,
            "t_sampling": "logit_normal(0, 1)" if logit_normal else "uniform",
            "threads": torch.get_num_threads(), "seconds": round(elapsed, 1), "cpu_seconds": round(cpu, 1),
            "loss_history": losses.history}
    return transformer, encoder, info


def save_preview(transformer, encoder, path: Path, seed: int = 0) -> Path:
    """One row per digit 0-9, its 4 frames left to right (30 steps, guidance 3): what a person looks at."""
    from PIL import Image

    pipe = wan_digits.WanDigitsPipeline(transformer=transformer, scheduler=wan_digits.build_scheduler(), prompt_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([f"a handwritten {d}" for d in range(10)], generator=torch.Generator().manual_seed(seed), output_type="np")
    Image.fromarray(wan_digits.video_grid(out.frames)).save(path)
    return Path(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=wan_digits.WEIGHTS_FILE)
    parser.add_argument("--preview", type=Path, default=None, help="also write a PNG of sampled clips (rows: 0-9)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformer, encoder, info = train(args.steps, args.batch, args.lr, args.seed)
    save_weights(args.out, transformer, encoder, {"training": info, "config": wan_digits.TRANSFORMER_CONFIG})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {info['seconds']} s "
          f"({info['cpu_seconds']} s of CPU time)")
    if args.preview:
        print(f"preview {save_preview(transformer, encoder, args.preview)}")


if __name__ == "__main__":
    main()
