"""Train gen-shapes on a GPU machine: the VAE, then the DiT with flow matching on frozen SmolLM2 hidden states.

One call fits the device's 10-minute limit: it renders a fresh batch of the shapes world, encodes its captions with
the packed encoder (training/shapes/encoder_pack.py: bit-identical layer-12 states of SmolLM2), trains or loads the VAE,
then trains the DiT until the time budget and writes, under --out: vae.safetensors, dit-{0,1,2}.safetensors (EMA
weights, fp32, split to stay under 16 MiB a file) and meta.tar (log.json, vae_stats.json, samples.png).
Training resumes from --work (full state, on a machine still warm) or else --resume (a previous call's --out).

    python -m training.shapes.train --out $OUT --encoder .shapes/pack/part-* --resume .shapes/resume --budget-s 540
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import math
import multiprocessing as mp
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from training.shapes.configs import ENCODER_LAYER, PROMPT_TEMPLATE, TRANSFORMER, VAE
from training.shapes.world import COLORS, POSITIONS, SHAPES, SIZES, caption, render, sample_scene, training_sample

T0 = time.time()
SAMPLE_PROMPTS = [
    "a large yellow star in the center on a purple background",
    "a small red circle at the top left on a blue background",
    "a medium green square on the right on a white background",
    "a big blue triangle at the bottom on an orange background",
    "black background, a large pink circle in the middle",
    "a small white star in the bottom right corner on a green background",
    "a cyan square at the top, large, on a black background",
    "a red triangle on the left and a yellow circle on the right on a blue background",
]


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# the attributes of a one-object scene, as class indices (scene_labels): what an auxiliary text readout learns
LABELS = {"size": list(SIZES), "shape": list(SHAPES), "position": list(POSITIONS), "color": list(COLORS),
          "background": list(COLORS)}


def scene_labels(scene) -> list[int]:
    """LABELS' class indices of a one-object scene; -1 each for a two-object scene (no single answer)."""
    if len(scene.objects) != 1:
        return [-1] * len(LABELS)
    o = scene.objects[0]
    return [LABELS[k].index(scene.background if k == "background" else getattr(o, k)) for k in LABELS]


def _render_chunk(args):
    seed, n, augment, two_object_rate = args
    rng = np.random.default_rng(seed)
    images, texts, labels = np.empty((n, 128, 128, 3), np.uint8), [], []
    for i in range(n):
        if two_object_rate is None:
            images[i], text, scene = training_sample(rng, augment)
        else:
            scene = sample_scene(rng, "train", two_object_rate)
            images[i], text = render(scene, rng), caption(scene, rng, "augmented" if augment else "train")
        texts.append(text)
        labels.append(scene_labels(scene))
    return images, texts, labels


def make_data(n: int, seed: int, workers: int, augment: bool = False, two_object_rate: float | None = None,
              with_labels: bool = False):
    """n rendered training samples and their captions (`augment`: the augmented captions; `two_object_rate`: how often
    a two-object scene is drawn, before rejection; None: the world's default); `with_labels`: also (n, 5) int64
    scene_labels."""
    chunk = 2000
    jobs = [(seed * 100003 + i, min(chunk, n - i * chunk), augment, two_object_rate)
            for i in range(math.ceil(n / chunk))]
    with mp.get_context("fork").Pool(workers) as pool:
        parts = pool.map(_render_chunk, jobs)
    images, texts = np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]]
    if with_labels:
        return images, texts, np.array([row for p in parts for row in p[2]], dtype=np.int64)
    return images, texts


@torch.no_grad()
def encode_texts(llm, texts: list[str], t_max: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, t_max, 576) bf16 embeddings and (N, t_max) bool masks of PROMPT_TEMPLATE-wrapped texts."""
    emb = torch.zeros(len(texts), t_max, 576, dtype=torch.bfloat16, device=device)
    mask = torch.zeros(len(texts), t_max, dtype=torch.bool, device=device)
    for i in range(0, len(texts), 2048):
        batch = [PROMPT_TEMPLATE.format(t) for t in texts[i:i + 2048]]
        ids = llm._ids(batch)
        unknown = {j for s in ids for j in s} - llm.vocab
        if unknown:
            raise ValueError(f"captions use tokens outside the packed vocabulary: {sorted(unknown)[:10]}")
        out = llm.encode(ids, hidden_layer=ENCODER_LAYER)
        t = out.hidden.shape[1]
        if t > t_max:
            raise ValueError(f"a caption has {t} tokens, more than t_max={t_max}")
        emb[i:i + len(batch), :t] = out.hidden.to(torch.bfloat16)
        mask[i:i + len(batch), :t] = out.mask
    return emb, mask


def to_pixels(images: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(vae, images: np.ndarray, seconds: float, device, history: list) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=4e-4, weight_decay=0.0)
    vae.train()
    step, start, n = 0, time.time(), len(images)
    g = torch.Generator().manual_seed(1)
    while time.time() - start < seconds:
        idx = torch.randint(0, n, (64,), generator=g).numpy()
        x = to_pixels(images[idx], device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
        rec = rec.float()
        l1, l2 = (rec - x).abs().mean(), ((rec - x) ** 2).mean()
        kl = post.kl().mean() / (8 * 16 * 16)
        loss = l1 + l2 + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            history.append({"stage": "vae", "step": step, "l1": l1.item(), "mse": l2.item(), "kl": kl.item(),
                            "t": round(time.time() - T0, 1)})
            log(f"vae step {step} l1 {l1.item():.4f} mse {l2.item():.5f} kl {kl.item():.2f}")
        step += 1
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device) -> torch.Tensor:
    out = []
    for i in range(0, len(images), 1024):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out.append(vae.encode(to_pixels(images[i:i + 1024], device)).latent_dist.mode().float())
    return torch.cat(out)


def pack2x2(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4), the Qwen-Image token layout."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack2x2(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def save_dit(model, out: Path, parts: int = 3) -> None:
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    for p in range(parts):
        save_file({k: state[k] for k in keys[p::parts]}, str(out / f"dit-{p}.safetensors"))


def load_dit(folder: Path) -> dict:
    state = {}
    for f in sorted(folder.glob("dit-*.safetensors")):
        state.update(load_file(str(f)))
    return state


@torch.no_grad()
def sample_grid(dit, vae, llm, stats, device, steps: int = 20, cfg: float = 4.0):
    """Euler samples of SAMPLE_PROMPTS with norm-preserving CFG -> (N, 3, 128, 128) in [-1, 1]."""
    n = len(SAMPLE_PROMPTS)
    cond = llm.encode([PROMPT_TEMPLATE.format(p) for p in SAMPLE_PROMPTS], hidden_layer=ENCODER_LAYER)
    unc = llm.encode([PROMPT_TEMPLATE.format("")] * n, hidden_layer=ENCODER_LAYER)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = pack2x2(torch.randn(n, 8, 16, 16, generator=g)).to(device)
    sig = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        t = torch.full((n,), float(sig[i]), device=device)
        preds = []
        for e in (cond, unc):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                preds.append(dit(hidden_states=x, encoder_hidden_states=e.hidden.to(device),
                                 encoder_hidden_states_mask=e.mask.to(device), timestep=t,
                                 img_shapes=[[(1, 8, 8)]] * n, return_dict=False)[0].float())
        c, u = preds
        v = u + cfg * (c - u)
        v = v * (c.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))
        x = x + (sig[i + 1] - sig[i]) * v
    z = unpack2x2(x, 16, 16) / stats["scaling_factor"] + stats["shift_factor"]
    return vae.decode(z).sample.float().clamp(-1, 1)


def grid_png(images: torch.Tensor) -> bytes:
    from PIL import Image

    x = ((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    row = np.concatenate(list(x), axis=1)
    buf = io.BytesIO()
    Image.fromarray(row).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    from diffusers import AutoencoderKL, QwenImageTransformer2DModel

    from training.shapes.encoder_pack import load_pack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--encoder", type=Path, nargs="+", required=True, help="the encoder pack's part folders")
    ap.add_argument("--resume", type=Path, default=None, help="a previous call's --out (vae.safetensors, dit-*.safetensors)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/shapes-work"), help="full training state on this machine")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--samples", type=int, default=150_000)
    ap.add_argument("--vae-s", type=float, default=150)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--t-max", type=int, default=48)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default=None, help="default: the accelerator if there is one (gen.device)")
    args = ap.parse_args()
    from gen.device import resolve_device

    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the encoder's states match the CPU's fp32 ones
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    history = json.loads((args.work / "log.json").read_text()) if (args.work / "log.json").is_file() else []
    if not history and args.resume and (args.resume / "log.json").is_file():
        history = json.loads((args.resume / "log.json").read_text())
    run = 1 + max((h.get("run", 0) for h in history), default=0)

    images, texts = make_data(args.samples, seed=run, workers=min(16, os.cpu_count() or 1))
    log(f"run {run}: rendered {len(images)} images")
    llm = load_pack(args.encoder, device)
    emb, mask = encode_texts(llm, texts, args.t_max, device)
    empty_emb, empty_mask = encode_texts(llm, [""], args.t_max, device)
    log(f"encoded captions: {tuple(emb.shape)}, longest {int(mask.sum(1).max())} tokens")

    vae = AutoencoderKL(**{k: v for k, v in VAE.items() if not k.startswith("_")}).to(device)
    vae_file = next((f for f in (args.work / "vae.safetensors", args.resume and args.resume / "vae.safetensors")
                     if f and f.is_file()), None)
    if vae_file is not None:
        vae.load_state_dict(load_file(str(vae_file)))
        stats = json.loads((vae_file.parent / "vae_stats.json").read_text())
        vae.eval()
        log(f"VAE loaded from {vae_file}")
    else:
        train_vae(vae, images, args.vae_s, device, history)
        z = encode_latents(vae, images[:8192], device)
        stats = {"shift_factor": z.mean().item(), "scaling_factor": 1.0 / z.std().item()}
        save_file({k: v.float().cpu().contiguous() for k, v in vae.state_dict().items()}, str(args.work / "vae.safetensors"))
        (args.work / "vae_stats.json").write_text(json.dumps(stats))
        log(f"VAE trained: {stats}")
    vae.requires_grad_(False)
    latents = ((encode_latents(vae, images, device) - stats["shift_factor"]) * stats["scaling_factor"])
    latents = pack2x2(latents).to(torch.bfloat16)  # (N, 64, 32)
    del images
    log(f"latents {tuple(latents.shape)} std {latents.float().std().item():.3f}")

    cfg = {k: v for k, v in TRANSFORMER.items() if not k.startswith("_")}
    dit = QwenImageTransformer2DModel(**cfg).to(device)
    ema = copy.deepcopy(dit).requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = 0
    if (args.work / "dit_state.pt").is_file():
        st = torch.load(args.work / "dit_state.pt", weights_only=False)
        dit.load_state_dict(st["model"]), ema.load_state_dict(st["ema"]), opt.load_state_dict(st["opt"])
        step = st["step"]
        log(f"DiT resumed from {args.work} at step {step}")
    elif args.resume and list(args.resume.glob("dit-*.safetensors")):
        w = load_dit(args.resume)
        dit.load_state_dict(w), ema.load_state_dict(w)
        step = max((h["step"] for h in history if h.get("stage") == "dit"), default=0)
        log(f"DiT restarted from the EMA weights in {args.resume} (step {step}, fresh optimizer)")
    step0 = step

    img_shapes = [[(1, 8, 8)]] * args.batch
    n = len(latents)
    g = torch.Generator(device=device).manual_seed(run)

    def loss_fn(x0, e, m):
        sigma = torch.sigmoid(torch.randn(x0.shape[0], device=device, generator=g))
        noise = torch.randn(x0.shape, device=device, generator=g, dtype=torch.float32)
        x0 = x0.float()
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = dit(hidden_states=xt, encoder_hidden_states=e, encoder_hidden_states_mask=m, timestep=sigma,
                    img_shapes=img_shapes, return_dict=False)[0]
        return F.mse_loss(v.float(), noise - x0)

    step_fn = torch.compile(loss_fn) if args.compile else loss_fn
    stop_at = args.budget_s - 45  # leave time to save and sample
    running, t_last = [], time.time()
    dit.train()
    while time.time() - T0 < stop_at:
        idx = torch.randint(0, n, (args.batch,), device=device, generator=g)
        e, m = emb[idx], mask[idx]
        drop = torch.rand(args.batch, device=device, generator=g) < 0.1
        e = torch.where(drop[:, None, None], empty_emb, e)
        m = torch.where(drop[:, None], empty_mask, m)
        warm = min(1.0, (step - step0 + 1) / 300)
        for group in opt.param_groups:
            group["lr"] = args.lr * warm
        loss = step_fn(latents[idx], e, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(dit.parameters()), 1 - decay)
        running.append(loss.detach())
        step += 1
        if step % 200 == 0:
            mean = torch.stack(running).mean().item()
            running = []
            rate = 200 / (time.time() - t_last)
            t_last = time.time()
            history.append({"stage": "dit", "run": run, "step": step, "loss": mean, "it_s": round(rate, 2),
                            "t": round(time.time() - T0, 1)})
            log(f"dit step {step} loss {mean:.4f} {rate:.1f} it/s")
    history.append({"stage": "dit", "run": run, "step": step, "loss": torch.stack(running).mean().item() if running else None,
                    "t": round(time.time() - T0, 1), "end_of_run": True, "samples": args.samples})
    dit.eval()
    torch.save({"model": dit.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step},
               args.work / "dit_state.pt")
    (args.work / "log.json").write_text(json.dumps(history))
    save_dit(ema, args.out)
    save_file(load_file(str(args.work / "vae.safetensors")), str(args.out / "vae.safetensors"))
    samples = sample_grid(ema, vae, llm, stats, device)
    with tarfile.open(args.out / "meta.tar", "w") as tar:
        for name, data in (("log.json", json.dumps(history).encode()), ("vae_stats.json", json.dumps(stats).encode()),
                           ("samples.png", grid_png(samples))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    log(f"done: step {step} ({step - step0} this run)")


if __name__ == "__main__":
    main()
