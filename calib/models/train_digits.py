"""Train the built-in digits model and write ``calib/models/weights/digits_flux.safetensors``.

    python -m calib.models.train_digits            # ~3 minutes on 2 CPU cores, seeded, reproduces the shipped file

Rectified flow (as FLUX): x_t = (1 - t) x_0 + t * noise, the transformer predicts noise - x_0 at timestep t.
Labels are replaced by the null class 10 % of the time so classifier-free guidance works at sampling time.
The loss curve is printed every 100 steps and its summary stored in the safetensors metadata.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import digits
from .builtin_pipeline import LossLog, optimizer_step, rectified_flow_batch, save_weights


def train(steps: int = 1500, batch: int = 128, lr: float = 1e-3, seed: int = 0, null_prob: float = 0.1, log=print):
    torch.manual_seed(seed)
    images, labels = digits.load_digits_dataset()
    x_all = digits.pack(images)
    transformer = digits.build_transformer()
    encoder = digits.DigitPromptEncoder()
    params = list(transformer.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    txt_ids, img_ids = digits.position_ids()
    gen = torch.Generator().manual_seed(seed)
    losses = LossLog(log)
    for step in range(1, steps + 1):
        x0, y, noise, t, xt = rectified_flow_batch(x_all, labels, batch, digits.NULL_CLASS, null_prob, gen)
        seq, pooled = encoder(y)
        pred = transformer(
            hidden_states=xt,
            encoder_hidden_states=seq,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        optimizer_step(loss, opt, sched, params)
        losses.update(step, loss)
    elapsed = time.perf_counter() - losses.start
    return transformer, encoder, {"steps": steps, "batch": batch, "lr": lr, "seed": seed,
                                  "seconds": round(elapsed, 1), "loss_history": losses.history}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=digits.WEIGHTS_FILE)
    args = parser.parse_args(argv)
    transformer, encoder, info = train(args.steps, args.batch, args.lr, args.seed)
    save_weights(args.out, transformer, encoder, {"training": info, "config": digits.TRANSFORMER_CONFIG})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {info['seconds']} s")


if __name__ == "__main__":
    main()
