"""VAE decode split over ranks by rows, exact: every rank decodes a band of the latent's rows.

Applied from outside diffusers' VAE classes with hooks on their decoder's modules, active only during a split
`decode` call:
- convolutions with a kernel taller than one row get the neighbouring bands' edge rows as a halo before they run
  (zeros at the image's own edges, as their zero padding), and their output is cropped back to the band: each
  output row sees exactly the inputs it sees in a whole decode. A causal video conv's cached frames get theirs too.
- GroupNorm (AutoencoderKL's decoder) normalises with statistics summed over all bands (two passes: the mean, then
  the variance around it), as one GroupNorm over the whole image would.
- attention blocks (one per decoder, at the latent's resolution) run on the whole feature map, gathered from the
  bands, and keep their band of the output.
Everything else in these decoders works row by row (per-position norms, nearest upsampling, 1x1 convs, the channel
to space rearrangements of Wan2.2 / Qwen-Image 2.1): the module types are declared below, and a decoder holding any
other type is not split (decoded whole on every rank, with a warning naming the type). Every rank then gathers the
bands, so each holds the whole output, as before. Tiled or compiled decoders are decoded whole.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION = {"Attention", "WanAttentionBlock", "QwenImageAttentionBlock", "QwenImage21AttentionBlock"}
CAUSAL_CONV = {"WanCausalConv3d", "QwenImageCausalConv3d", "QwenImage21CausalConv3d"}  # pad in `_padding`
# modules whose own forward is row-local apart from their children
ROW_LOCAL = {
    "Decoder", "UNetMidBlock2D", "UpDecoderBlock2D", "ResnetBlock2D", "Upsample2D",  # AutoencoderKL (+ FLUX.2's)
    "WanDecoder3d", "WanMidBlock", "WanResidualBlock", "WanUpBlock", "WanResidualUpBlock", "WanResample",
    "WanUpsample", "WanRMS_norm", "DupUp3D",  # Wan2.2: channels repeated into 2x2 (and time) blocks, row by row
    "QwenImageDecoder3d", "QwenImageMidBlock", "QwenImageResidualBlock", "QwenImageUpBlock", "QwenImageResample",
    "QwenImageUpsample", "QwenImageRMS_norm",
    "QwenImage21Decoder3d", "QwenImage21MidBlock", "QwenImage21ResidualBlock", "QwenImage21ResidualUpBlock",
    "QwenImage21Resample", "QwenImage21Upsample", "QwenImage21RMS_norm", "QwenImage21DupUp3D",
    "ModuleList", "Sequential", "SiLU", "Dropout", "Identity",
}
MIN_ROWS = 2  # fewer latent rows a rank than this: decode whole


def bands(rows: int, n: int) -> list[int]:
    """Rows per rank: as even as can be, the first ranks one more."""
    return [rows // n + (i < rows % n) for i in range(n)]


class SplitDecode:
    """Splits `vae.decode` over `group` (every member calls decode with the same latents); `remove()` undoes it."""

    def __init__(self, vae: nn.Module, group, rank: int, size: int):
        self.vae, self.group, self.rank, self.size = vae, group, rank, size
        self.split: list[int] | None = None  # latent rows per rank, during a split decode
        self.handles: list = []
        self.norms: list[nn.GroupNorm] = []  # their forward replaced (the instance attribute) while installed
        self.crops: list[list[int]] = []  # per conv call in flight: the rows to crop its output to
        self.unsupported = self._install(vae.decoder)
        if self.unsupported:
            log.warning("VAE decode is not split over ranks: its decoder holds %s, not known to work row by row",
                        ", ".join(sorted(self.unsupported)))
            self.remove()
            return
        original = vae.decode

        def decode(z, *args, **kwargs):
            return self._decode(original, z, *args, **kwargs)

        vae.decode = decode

    # ---- installing

    def _install(self, module: nn.Module) -> set[str]:
        unknown: set[str] = set()
        for child in module.children():
            kind = type(child).__name__
            if kind in ATTENTION:
                self.handles.append(child.register_forward_pre_hook(self._gather_input, with_kwargs=True))
                self.handles.append(child.register_forward_hook(self._own_band))
                continue  # runs whole: its insides need nothing
            if isinstance(child, nn.GroupNorm):
                child.forward = lambda x, norm=child: self._group_norm(norm, x)
                self.norms.append(child)
            elif isinstance(child, (nn.Conv2d, nn.Conv3d)):
                if self._halo_rows(child) is None:
                    unknown.add(f"{kind} (stride, padding or padding mode not row-local)")
                elif self._halo_rows(child):
                    self.handles.append(child.register_forward_pre_hook(self._add_halo, with_kwargs=True))
                    self.handles.append(child.register_forward_hook(self._crop))
            elif isinstance(child, nn.Linear) or kind in ROW_LOCAL:
                pass
            else:
                unknown.add(kind)
            unknown |= self._install(child)
        return unknown

    @staticmethod
    def _halo_rows(conv: nn.Conv2d | nn.Conv3d) -> int | None:
        """Rows of halo the conv needs (its zero padding along the height), None if it is not row-local."""
        hdim = -2  # kernel / stride / padding tuples end with (..., height, width)
        kernel, stride, dilation = conv.kernel_size[hdim], conv.stride[hdim], conv.dilation[hdim]
        if type(conv).__name__ in CAUSAL_CONV:
            pad = conv._padding[2]  # (w, w, h, h, t, 0): applied in its forward
        elif isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            return None
        else:
            pad = conv.padding[hdim]
        if stride != 1 or 2 * pad != dilation * (kernel - 1):
            return None
        return pad

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for norm in self.norms:
            norm.__dict__.pop("forward", None)
        self.handles, self.norms = [], []
        self.vae.__dict__.pop("decode", None)

    # ---- the call

    def _decode(self, original, z: torch.Tensor, *args, **kwargs):
        rows = z.shape[-2]
        split = bands(rows, self.size)
        if (min(split) < MIN_ROWS or getattr(self.vae, "use_tiling", False)
                or getattr(self.vae.decoder, "_compiled_call_impl", None) is not None):
            return original(z, *args, **kwargs)
        start = sum(split[: self.rank])
        self.split = split
        try:
            out = original(z.narrow(-2, start, split[self.rank]), *args, **kwargs)
        finally:
            self.split = None
        if isinstance(out, tuple):
            return (self._gather(out[0], split), *out[1:])
        out.sample = self._gather(out.sample, split)
        return out

    # ---- collectives over the bands

    def _gather(self, x: torch.Tensor, split: list[int]) -> torch.Tensor:
        """Each rank's band (rows = its latent rows x a common factor) -> the whole tensor on every rank."""
        factor = x.shape[-2] // split[self.rank]
        assert factor * split[self.rank] == x.shape[-2], (x.shape, split)
        tallest = max(split) * factor
        x = x.contiguous()
        padded = F.pad(x, (0, 0, 0, tallest - x.shape[-2])) if x.shape[-2] < tallest else x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([p[..., : s * factor, :] for p, s in zip(parts, split)], dim=-2)

    def _halo(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        """x with `pad` rows of the bands above and below (zeros at the image's edges) added."""
        if x.shape[-2] < pad:
            raise RuntimeError(f"a band of {x.shape[-2]} rows cannot lend a halo of {pad}")
        edges = torch.cat([x[..., :pad, :], x[..., -pad:, :]], dim=-2).contiguous()
        parts = [torch.empty_like(edges) for _ in range(self.size)]
        dist.all_gather(parts, edges, group=self.group)
        zeros = torch.zeros_like(edges[..., :pad, :])
        above = parts[self.rank - 1][..., pad:, :] if self.rank > 0 else zeros
        below = parts[self.rank + 1][..., :pad, :] if self.rank < self.size - 1 else zeros
        return torch.cat([above, x, below], dim=-2)

    # ---- hooks (pass-through outside a split decode)

    def _add_halo(self, conv, args, kwargs):
        if self.split is None:
            return None
        pad = self._halo_rows(conv)
        args = list(args)
        x = args[0]
        self.crops.append([pad, x.shape[-2]])
        args[0] = self._halo(x, pad)
        if len(args) > 1 and isinstance(args[1], torch.Tensor):  # a causal conv's cached frames
            args[1] = self._halo(args[1], pad)
        elif isinstance(kwargs.get("cache_x"), torch.Tensor):
            kwargs = {**kwargs, "cache_x": self._halo(kwargs["cache_x"], pad)}
        return tuple(args), kwargs

    def _crop(self, conv, args, out):
        if self.split is None:
            return None
        pad, rows = self.crops.pop()
        return out.narrow(-2, pad, rows)

    def _gather_input(self, block, args, kwargs):
        if self.split is None:
            return None
        self.crops.append([args[0].shape[-2] if args else kwargs["hidden_states"].shape[-2]])
        if args:
            return (self._gather(args[0], self.split), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._gather(kwargs["hidden_states"], self.split)}

    def _own_band(self, block, args, out):
        if self.split is None:
            return None
        rows = self.crops.pop()[0]
        factor = rows // self.split[self.rank]
        start = sum(self.split[: self.rank]) * factor
        return out.narrow(-2, start, self.split[self.rank] * factor)

    def _group_norm(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        """GroupNorm of the band with the statistics of all bands (outside a split decode: the plain one)."""
        if self.split is None:
            return nn.GroupNorm.forward(norm, x)
        b, c = x.shape[:2]
        g = x.float().reshape(b, norm.num_groups, -1)
        rows = x.shape[-2]  # this band's; the image's are as many per latent row
        count = g.shape[-1] // rows * (rows // self.split[self.rank] * sum(self.split))
        total = g.sum(-1)
        dist.all_reduce(total, group=self.group)
        mean = total / count
        sq = (g - mean[..., None]).square().sum(-1)
        dist.all_reduce(sq, group=self.group)
        var = sq / count
        y = (g - mean[..., None]) * torch.rsqrt(var[..., None] + norm.eps)
        y = y.reshape(x.shape)
        if norm.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return y.to(x.dtype)
