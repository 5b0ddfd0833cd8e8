"""Train the bold-stroke LoRA of the built-in digits model and write ``calib/models/weights/digits_lora.safetensors``.

    python -m calib.models.train_digits_lora       # ~1 minute on one CPU core, seeded, reproduces the shipped file

The shipped ``builtin:digits`` weights stay frozen; peft adds a rank-4 LoRA (``digits_lora.LORA_CONFIG``) to the
transformer (``FluxTransformer2DModel.add_adapter``, as diffusers' LoRA training scripts do) and only the adapter is
trained, with the base model's objective (rectified flow, 10 % null class) on a bold copy of the same digits
(``digits_lora.bold``). The prompt encoder is not adapted. Only the adapter's weights are written, with the training
settings and loss history in the file's metadata.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from . import digits, digits_lora
from .builtin_pipeline import LossLog, optimizer_step


def train(steps: int = 400, batch: int = 128, lr: float = 2e-3, seed: int = 0, null_prob: float = 0.1,
          base_weights: Path | None = None, log=print):
    torch.manual_seed(seed)
    images, labels = digits.load_digits_dataset()
    x_all = digits.pack(digits_lora.bold(images))
    transformer, encoder = digits.build_transformer(), digits.DigitPromptEncoder()
    digits.load_weights(transformer, encoder, base_weights or digits.WEIGHTS_FILE)
    encoder.requires_grad_(False)
    transformer.requires_grad_(False)
    transformer.add_adapter(digits_lora.lora_config(), adapter_name=digits_lora.ADAPTER_NAME)  # only LoRA trains
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    txt_ids, img_ids = digits.position_ids()
    gen = torch.Generator().manual_seed(seed)
    losses = LossLog(log)
    transformer.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        x0 = x_all[idx]
        y = labels[idx].clone()
        y[torch.rand(batch, generator=gen) < null_prob] = digits.NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(batch, generator=gen)
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
        with torch.no_grad():
            seq, pooled = encoder(y)
        pred = transformer(hidden_states=xt, encoder_hidden_states=seq, pooled_projections=pooled, timestep=t,
                           img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        optimizer_step(loss, opt, sched, params)
        losses.update(step, loss)
    elapsed = time.perf_counter() - losses.start
    trained = sum(p.numel() for p in params)
    return transformer, {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "null_prob": null_prob,
                         "style": f"bold: clip(x + {digits_lora.BOLD_SPREAD} * grey_dilation(x, 4-neighbours))",
                         "adapter_parameters": trained, "seconds": round(elapsed, 1),
                         "loss_history": losses.history}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=digits_lora.LORA_WEIGHTS_FILE)
    args = parser.parse_args(argv)
    digits_lora.require_peft()
    transformer, info = train(args.steps, args.batch, args.lr, args.seed)
    digits_lora.save_adapter(args.out, transformer, {"training": info, "base": digits.WEIGHTS_FILE.name})
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB) after {info['seconds']} s")


if __name__ == "__main__":
    main()
