"""Fine-tune gen-shapes from its shipped weights on one GPU, in calls of up to 10 minutes: the VAE against the corner
blot (encoder and decoder, background latents flattened; see finetune_vae), then the DiT on augmented captions
(synonyms, paraphrased sentence forms, more two-object scenes; world.AUGMENT_*) on the new latents. Needs no diffusers
and no gguf there: our DiT (gen/models/qwen_image.py), the training VAE (training/shapes/vae.py), the encoder pack
(training/shapes/encoder_pack.py).

The pack is in three parts (~9 MiB each) because the repository and one part are what one call can carry: two short
calls stash parts 0 and 1 on the machine, the next (on the still-warm machine, within its 30 s) carries part 2 and
trains. Here, once:

    python -m training.shapes.encoder_pack .shapes/pack
There (device calls, in this order, each right after the one before; `carry` names the part):

    python -m training.shapes.finetune stash .shapes/pack/part-0                       # carry .shapes/pack/part-0
    python -m training.shapes.finetune stash .shapes/pack/part-1                       # carry .shapes/pack/part-1
    python -m training.shapes.finetune train --pack .shapes/pack/part-2 --out $OUT/run1 --budget-s 570 --vae-s 120; \
        cp -r $OUT/run1 /tmp/ft1                                                       # carry .shapes/pack/part-2
    python -m training.shapes.finetune train --pack .shapes/pack/part-2 --out $OUT/run2 --resume /tmp/ft1 \
        --vae-s 0 --budget-s 570 --seed 12                                             # carry .shapes/pack/part-2
Here again: `python -m training.shapes.export RUN_DIR` (writes assets/gen-shapes and its prompt guide). A later call
of `train` after the export continues from the exported weights.

Writes under --out: dit-{0,1,2}.safetensors (EMA weights, fp32), vae.safetensors, vae_stats.json, run.json and
meta.tar (log.json, samples.png): 7 files under 16 MiB each.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from training.shapes import configs
from training.shapes.train import (SAMPLE_PROMPTS, encode_texts, grid_png, log, make_data, pack2x2, save_dit,
                                   to_pixels, unpack2x2)
from training.shapes.train import load_dit as run_dit_state  # a run folder's DiT weights (this file's load_dit: a model)

ROOT = Path(__file__).resolve().parents[2]
STASH = Path("/tmp/shapes-pack")
SAMPLE_PROMPTS_FT = SAMPLE_PROMPTS + [
    "a tiny scarlet disk in the upper left corner, navy backdrop",
    "a small crimson disk at the upper left over a navy backdrop",
]


def stash(part: Path, to: Path = STASH) -> Path:
    """Copy a pack part to this machine's /tmp, where a later call of `train` finds it."""
    dest = to / part.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(part, dest)
    return dest


def pack_parts(given: list[Path], stash_dir: Path = STASH) -> list[Path]:
    """The given part folders plus those stashed earlier on this machine (a given part wins over a stashed one)."""
    names = {p.name for p in given}
    stashed = sorted(p for p in stash_dir.glob("part-*") if p.name not in names) if stash_dir.is_dir() else []
    return list(given) + stashed


def load_dit(model_dir: Path, device):
    """Our QwenImageTransformer with the model folder's transformer weights, fp32, for training."""
    from gen.models.qwen_image import QwenImageConfig, QwenImageTransformer

    cfg = json.loads((model_dir / "transformer" / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(QwenImageConfig)}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in fields}
    model = QwenImageTransformer(QwenImageConfig(**cfg))
    state = {}
    for f in sorted((model_dir / "transformer").glob("*.safetensors")):
        state.update(load_file(str(f)))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device)


def load_vae(model_dir: Path, device):
    """The training VAE with the model folder's weights (fp32) and its latent statistics."""
    from training.shapes.vae import AutoencoderKL

    cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    vae = AutoencoderKL(cfg)
    state = {}
    for f in sorted((model_dir / "vae").glob("*.safetensors")):
        state.update(load_file(str(f)))
    vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return vae.to(device), {"scaling_factor": cfg["scaling_factor"], "shift_factor": cfg["shift_factor"]}


@torch.no_grad()
def latents_of(vae, images: np.ndarray, device, chunk: int = 1024) -> torch.Tensor:
    """Posterior means (N, z, h, w) float32 of uint8 images."""
    out = []
    for i in range(0, len(images), chunk):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(vae.encode(to_pixels(images[i:i + chunk], device))[0].float())
    return torch.cat(out)


def background_cells(x: torch.Tensor, factor: int = 8, tol: float = 0.15) -> torch.Tensor:
    """(B, h, w) bool: the latent cells whose pixels, and those of the 8 cells around them, are all background (within
    `tol` of the image's median border color, in [-1, 1] units; the world's color jitter is +-0.08)."""
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (B, 3, 4W)
    bg = border.median(dim=2).values[:, :, None, None]
    far = ((x - bg).abs().amax(1, keepdim=True) > tol).float()
    cell = F.max_pool2d(far, factor)
    return F.max_pool2d(cell, 3, stride=1, padding=1)[:, 0] == 0


def finetune_vae(vae, images: np.ndarray, seconds: float, device, history: list, stats: dict, batch: int = 64,
                 lr: float = 1e-4, min_steps: int = 0, place_weight: float = 1.0, flat_weight: float = 1.0,
                 encoder: bool = True) -> int:
    """Fine-tune the VAE on fresh renders against the corner blot.

    The blot's source: for every image the encoder writes an outlier into the latents of the top-right corner (and
    smaller ones along the right edge), also over a flat background, and the decoder turns it back into a visible
    blot (in plain reconstructions too); the DiT learned to draw that outlier. With `encoder`, encoder and decoder
    are trained together and each image's background latents are pulled to their mean (`flat_weight` x their mean
    squared deviation, in the DiT's latent units): flat background, flat latents, nothing for the DiT to draw there.
    Without it, only the decoder (the latent space, and so the DiT, unchanged). Loss: L1 + MSE + the mean of each
    image's worst 1% of pixels + `place_weight` x the batch-mean error at its worst 0.1% of places (an artifact
    drawn at the same place in every image; object edges move and average out) + 1e-5 KL (with the encoder).
    Decoded latents are noised slightly: the DiT's are never exact."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    if encoder:
        params += list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(7)
    scale = stats["scaling_factor"]
    step, start = 0, time.time()
    while time.time() - start < seconds or step < min_steps:
        idx = torch.randint(0, len(images), (batch,), generator=g).numpy()
        x = to_pixels(images[idx], device)
        with torch.set_grad_enabled(encoder), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            mean, logvar = vae.encode(x)
        mean, logvar = mean.float(), logvar.float()
        z = mean + 0.05 * mean.detach().std() * torch.randn_like(mean)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            rec = vae.decode(z).float()
        err = (rec - x).abs().mean(1).flatten(1)  # (B, H*W)
        worst = err.topk(max(1, err.shape[1] // 100), dim=1).values.mean()
        fixed = err.mean(0).topk(max(1, err.shape[1] // 1000)).values.mean()
        l1, l2 = err.mean(), ((rec - x) ** 2).mean()
        loss = l1 + l2 + 0.1 * worst + place_weight * fixed
        cells = background_cells(x, factor=x.shape[-1] // mean.shape[-1]).unsqueeze(1).float()  # (B, 1, h, w)
        n = cells.sum((2, 3)).clamp(min=1)
        ref = (mean * cells).sum((2, 3)) / n  # each image's mean background latent
        off = ((mean - ref[:, :, None, None]) * scale) ** 2 * cells
        flat = (off.sum((1, 2, 3)) / (n[:, 0] * mean.shape[1])).mean()
        if encoder:
            kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
            loss = loss + flat_weight * flat + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            history.append({"stage": "vae", "step": step, "l1": l1.item(), "mse": l2.item(), "worst1pct": worst.item(),
                            "fixed_place": fixed.item(), "flat": flat.item(), "t": round(time.time() - start, 1)})
            log(f"vae step {step} l1 {l1.item():.4f} mse {l2.item():.5f} worst1% {worst.item():.3f} "
                f"fixed place {fixed.item():.3f} background latent deviation {flat.item():.4f}")
        step += 1
    vae.requires_grad_(False)
    return step


@torch.no_grad()
def sample_grid(dit, vae, llm, stats, device, prompts: list[str], steps: int = 20, cfg: float = 4.0):
    """Euler samples with norm-preserving true CFG (the pipeline's sampler) -> (N, 3, 128, 128) in [-1, 1]."""
    n = len(prompts)
    layer = configs.ENCODER_LAYER
    cond = llm.encode([configs.PROMPT_TEMPLATE.format(p) for p in prompts], hidden_layer=layer)
    unc = llm.encode([configs.PROMPT_TEMPLATE.format("")] * n, hidden_layer=layer)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = pack2x2(torch.randn(n, configs.LATENT_CHANNELS, 16, 16, generator=g)).to(device)
    sig = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        t = torch.full((n,), float(sig[i]), device=device)
        preds = []
        for e in (cond, unc):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                preds.append(dit(hidden_states=x, encoder_hidden_states=e.hidden.to(device),
                                 encoder_hidden_states_mask=e.mask.to(device), timestep=t,
                                 img_shapes=[[(1, 8, 8)]] * n).float())
        c, u = preds
        v = u + cfg * (c - u)
        v = v * (c.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))
        x = x + (sig[i + 1] - sig[i]) * v
    z = unpack2x2(x, 16, 16) / stats["scaling_factor"] + stats["shift_factor"]
    return vae.decode(z).float().clamp(-1, 1)


class TextReadout(torch.nn.Module):
    """An auxiliary head on the DiT's text stream (training only; not exported): one learned query per scene
    attribute attends over the text tokens after block `--aux-block` and classifies it (train.LABELS). Its loss
    makes the text stream carry the attributes in a form that transfers to unseen words: a probe reading the
    frozen encoder's states this way gets 72-77% of the evaluation's paraphrases (training/shapes/probe.py), the
    DiT's own readout 37%."""

    def __init__(self, dim: int, heads: int = 4):
        from training.shapes.train import LABELS

        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.queries = torch.nn.Parameter(torch.randn(len(LABELS), dim) * 0.02)
        self.read = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(dim, len(v)) for v in LABELS.values()])

    def forward(self, txt: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        x = self.norm(txt)
        out, _ = self.read(self.queries.expand(len(x), -1, -1), x, x, key_padding_mask=~mask)
        return [head(out[:, i]) for i, head in enumerate(self.heads)]


def train(args) -> dict:
    from gen.device import resolve_device
    from training.shapes.encoder_pack import load_pack

    t0 = time.time()
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the encoder's states match the CPU's fp32 ones
    parts = pack_parts(args.pack, args.stash)
    try:
        llm = load_pack(parts, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{e}; stashed parts in {args.stash}: "
                         f"{sorted(p.name for p in args.stash.glob('part-*')) if args.stash.is_dir() else 'none'}. "
                         "Run `finetune stash` with the other part first (the machine keeps it only while warm).")
    args.out.mkdir(parents=True, exist_ok=True)
    history: list = []
    images, texts, labels = make_data(args.samples, seed=args.seed, workers=min(16, os.cpu_count() or 1),
                                      augment=True, two_object_rate=args.two_object_rate, with_labels=True)
    labels = torch.from_numpy(labels).to(device)
    log(f"rendered {len(images)} images ({time.time() - t0:.0f} s)")
    emb, mask = encode_texts(llm, texts, args.t_max, device)
    empty_emb, empty_mask = encode_texts(llm, [""], args.t_max, device)
    log(f"encoded captions {tuple(emb.shape)}, longest {int(mask.sum(1).max())} tokens ({time.time() - t0:.0f} s)")

    vae, stats = load_vae(args.model, device)
    if args.resume is not None:  # a previous call's --out: its VAE and statistics, its (EMA) DiT below
        vae.load_state_dict(load_file(str(args.resume / "vae.safetensors")))
        stats = json.loads((args.resume / "vae_stats.json").read_text())
    vae_steps = finetune_vae(vae, images, args.vae_s, device, history, stats, batch=args.vae_batch,
                             min_steps=int(args.tiny), encoder=not args.decoder_only,
                             flat_weight=args.flat_weight) if args.vae_s > 0 else 0
    vae.eval()
    latents = (latents_of(vae, images, device) - stats["shift_factor"]) * stats["scaling_factor"]
    latents = pack2x2(latents).to(torch.bfloat16)  # (N, 64, 32)
    del images
    log(f"latents {tuple(latents.shape)} std {latents.float().std().item():.3f} ({time.time() - t0:.0f} s)")

    dit = load_dit(args.model, device)
    if args.resume is not None:
        dit.load_state_dict(run_dit_state(args.resume))
    ema = copy.deepcopy(dit).requires_grad_(False)
    readout, captured = None, {}
    params = list(dit.parameters())
    if args.aux_weight > 0:  # the text stream after block aux_block, read by TextReadout
        readout = TextReadout(dit.transformer_blocks[0].img_mod[1].in_features).to(device)
        params += list(readout.parameters())
        dit.transformer_blocks[args.aux_block].register_forward_hook(
            lambda module, inputs, output: captured.__setitem__("txt", output[1]))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    n, b = len(latents), args.batch
    img_shapes = [[(1, 8, 8)]] * b
    g = torch.Generator(device=device).manual_seed(args.seed)
    step, running, running_aux, t_last = 0, [], [], time.time()
    stop_at = args.budget_s - args.reserve_s
    dit.train()
    while time.time() - t0 < stop_at or step < 2 * int(args.tiny):
        idx = torch.randint(0, n, (b,), device=device, generator=g)
        e, m = emb[idx], mask[idx]
        drop = torch.rand(b, device=device, generator=g) < 0.1  # caption dropout: the unconditional input
        e = torch.where(drop[:, None, None], empty_emb, e)
        m = torch.where(drop[:, None], empty_mask, m)
        x0 = latents[idx].float()
        sigma = torch.sigmoid(torch.randn(b, device=device, generator=g))
        noise = torch.randn(x0.shape, device=device, generator=g)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v = dit(hidden_states=xt, encoder_hidden_states=e, encoder_hidden_states_mask=m, timestep=sigma,
                    img_shapes=img_shapes)
        loss = F.mse_loss(v.float(), noise - x0)
        if readout is not None:
            y = labels[idx]
            keep = (y[:, 0] >= 0) & ~drop  # one-object scenes with their caption
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = readout(captured["txt"], m)
            aux = sum(F.cross_entropy(lg.float()[keep], y[keep, j]) for j, lg in enumerate(logits)) if keep.any() \
                else loss * 0
            loss = loss + args.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(dit.parameters()), 1 - args.ema)
        running.append(loss.detach())
        if readout is not None:
            running_aux.append(aux.detach())
        step += 1
        if step % args.log_every == 0:
            mean = torch.stack(running).mean().item()
            aux_mean = torch.stack(running_aux).float().mean().item() if running_aux else None
            running, running_aux, rate, t_last = [], [], args.log_every / (time.time() - t_last), time.time()
            history.append({"stage": "dit", "step": step, "loss": mean, "aux": aux_mean, "it_s": round(rate, 2),
                            "t": round(time.time() - t0, 1)})
            log(f"dit step {step} loss {mean:.4f}" + (f" (aux {aux_mean:.3f})" if aux_mean is not None else "")
                + f" {rate:.1f} it/s")
    log(f"trained {step} DiT steps, {vae_steps} VAE steps ({time.time() - t0:.0f} s)")
    ema.eval()
    save_dit(ema, args.out)
    save_file({k: v.float().cpu().contiguous() for k, v in vae.state_dict().items()}, str(args.out / "vae.safetensors"))
    (args.out / "vae_stats.json").write_text(json.dumps(stats))
    run = {"augmented": True, "from": str(args.resume or args.model), "dit_steps": step, "vae_steps": vae_steps,
           "aux_weight": args.aux_weight, "aux_block": args.aux_block if args.aux_weight > 0 else None,
           "vae_encoder": vae_steps > 0 and not args.decoder_only,
           "samples": args.samples, "batch": b, "lr": args.lr, "seconds": round(time.time() - t0, 1)}
    (args.out / "run.json").write_text(json.dumps(run))
    prompts = SAMPLE_PROMPTS_FT[-2:] if args.tiny else SAMPLE_PROMPTS_FT
    samples = sample_grid(ema, vae, llm, stats, device, prompts, steps=args.sample_steps)
    with tarfile.open(args.out / "meta.tar", "w") as tar:
        for name, data in (("log.json", json.dumps(history).encode()), ("samples.png", grid_png(samples))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    log(f"done in {time.time() - t0:.0f} s: {args.out}")
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stash", help="copy a pack part to this machine's /tmp for a later `train` call")
    s.add_argument("part", type=Path)
    s.add_argument("--to", type=Path, default=STASH)
    t = sub.add_parser("train", help="fine-tune from --model's weights and write the result under --out")
    t.add_argument("--pack", type=Path, nargs="+", required=True, help="pack part folders carried by this call")
    t.add_argument("--stash", type=Path, default=STASH, help="where `stash` left the other parts")
    t.add_argument("--model", type=Path, default=ROOT / "assets" / configs.MODEL_DIR)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--resume", type=Path, default=None,
                   help="continue from a previous call's --out (copied to this machine's /tmp while warm)")
    t.add_argument("--budget-s", type=float, default=330, help="the whole call, rendering and saving included")
    t.add_argument("--reserve-s", type=float, default=25, help="left at the end to save and draw the samples")
    t.add_argument("--vae-s", type=float, default=60, help="seconds of VAE fine-tuning (0: none)")
    t.add_argument("--decoder-only", action="store_true",
                   help="fine-tune the VAE's decoder only (keeps the latent space; the blot's source stays)")
    t.add_argument("--flat-weight", type=float, default=1.0, help="weight of the flat-background latent term")
    t.add_argument("--samples", type=int, default=120_000)
    t.add_argument("--two-object-rate", type=float, default=0.45, help="before rejection (the world's: 0.3)")
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--ema", type=float, default=0.998)
    t.add_argument("--aux-weight", type=float, default=0.0,
                   help="weight of the auxiliary text-readout loss (TextReadout; 0: none)")
    t.add_argument("--aux-block", type=int, default=1, help="the block whose text-stream output it reads")
    t.add_argument("--t-max", type=int, default=64)
    t.add_argument("--seed", type=int, default=11)
    t.add_argument("--sample-steps", type=int, default=20)
    t.add_argument("--log-every", type=int, default=200)
    t.add_argument("--vae-batch", type=int, default=64)
    t.add_argument("--device", default=None, help="default: the accelerator if there is one (gen.device)")
    t.add_argument("--tiny", action="store_true", help="a seconds-long CPU check of the whole path (tests)")
    args = ap.parse_args(argv)
    if args.command == "train" and args.tiny:
        for k, v in dict(samples=16, batch=2, vae_batch=2, vae_s=0.1 if args.vae_s > 0 else 0, budget_s=0,
                         reserve_s=0, sample_steps=1, log_every=1, device=args.device or "cpu").items():
            setattr(args, k, v)
    if args.command == "stash":
        print(f"stashed {stash(args.part, args.to)}")
    else:
        print(json.dumps(train(args)))


if __name__ == "__main__":
    main()
