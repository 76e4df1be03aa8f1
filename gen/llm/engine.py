"""Batched prefill, KV-cache decode loop and stop tokens over any model of gen/llm/models; not tokenization or loading."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from gen.llm.sampling import SamplingParams, sample


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, T) left-padded, mask (B, T) bool True = real token, position_ids (B, T) counting real tokens from 0."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, t - len(s):] = True
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), pos.to(device)


def pad_right(seqs: list[list[int]], length: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (B, length) right-padded, mask (B, length) bool True = real token, position_ids 0..length-1 for every row."""
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    pos = torch.arange(length).expand(len(seqs), -1)
    return ids.to(device), mask.to(device), pos.to(device)


def left_to_right(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front: (B, T, ...) left-padded -> right-padded (zeros after), and its mask."""
    lengths = mask.sum(-1)  # (B,)
    t = x.shape[1]
    shift = t - lengths  # pads in front of each row
    idx = (torch.arange(t, device=x.device)[None] + shift[:, None]) % t  # (B, T)
    out = x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))
    new_mask = torch.arange(t, device=x.device)[None] < lengths[:, None]
    return out * new_mask.view(*new_mask.shape, *([1] * (x.dim() - 2))).to(out.dtype), new_mask


def fuse_projections(model: nn.Module) -> nn.Module:
    """Concatenate the linears a module names in `fusable` (q|k|v, gate|up) into one weight: one matmul instead of
    several. The original parameters become views of the fused tensor, so names, state_dict and memory are unchanged.
    A model with `stack_experts()` (MoE) stacks its routed experts first, the same way (see models/deepseek.py)."""
    if hasattr(model, "stack_experts"):
        model.stack_experts()
    for m in model.modules():
        names = getattr(m, "fusable", None)
        if not names or getattr(m, "fused_weight", None) is not None:
            continue
        linears = [getattr(m, n) for n in names]
        has_bias = {lin.bias is not None for lin in linears}
        assert len(has_bias) == 1, f"{type(m).__name__}: {names} mix biased and unbiased linears"
        w = torch.cat([lin.weight.data for lin in linears])  # (sum of outs, in)
        b = torch.cat([lin.bias.data for lin in linears]) if has_bias.pop() else None
        start = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight = nn.Parameter(w[start:start + n], requires_grad=False)
            if b is not None:
                lin.bias = nn.Parameter(b[start:start + n], requires_grad=False)
            start += n
        m.fused_weight, m.fused_bias = w, b
    return model


class Engine:
    """Runs a model (the gen/llm/models interface) on token ids: prefill for hidden states, and a decode loop.

    On an accelerator, models that accept a tensor cache offset (`static_decode = True`) decode one token per step
    in a torch.compile'd function with static shapes (the whole cache is attended, masked). torch.compile guards on
    every input shape, so a batch size it was not built for recompiles instead of reusing a wrong graph; after
    `torch._dynamo.config.recompile_limit` sizes it falls back to eager. On the CPU decode is eager unless asked.
    A model's own shape-dependent choices (the MoE's gathered path for few tokens) are made in Python from the real
    sizes while tracing, so each compiled graph holds only for the shapes it was traced with.

    `compile_prefill` (opt-in, off by default): the prefill forward (prompts from offset 0) is torch.compile'd with
    static shapes in `prefill_mode`, one graph per exact input shape (batch, padded length, cache length, hidden-state
    options), for at most `max_prefill_shapes` shapes; other shapes, and calls with images, run eagerly. No bucketing:
    a serving loop with many prompt lengths should leave it off or pad its batches itself. Parts a model keeps eager
    (the DeepSeek MoE's loop over experts) split the compiled prefill into pieces around them: no gain expected there.
    """

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, max_context: int,
                 stop_ids: list[int], pad_id: int, compile_decode: bool | None = None, static_decode: bool | None = None,
                 compile_mode: str = "max-autotune", compile_prefill: bool = False,
                 prefill_mode: str = "max-autotune-no-cudagraphs", max_prefill_shapes: int = 4):
        self.model, self.device, self.dtype = model, device, dtype
        self.max_context, self.stop_ids, self.pad_id = max_context, list(stop_ids), pad_id
        static = getattr(model, "static_decode", False)
        self.compile = (device.type != "cpu" and static) if compile_decode is None else compile_decode
        if self.compile and not static:
            raise ValueError(f"compile_decode=True needs a model with static_decode, {type(model).__name__} has none")
        self.static = self.compile if static_decode is None else static_decode  # tensor offset, whole-cache mask
        if self.static and not static:
            raise ValueError(f"static_decode=True needs a model with static_decode, {type(model).__name__} has none")
        if self.static or compile_prefill:  # result-neutral; the MoE's static-shape decode path needs stacked experts
            fuse_projections(model)
        # both modes use CUDA graphs; on an H200 (Qwen2.5-7B size, batch 1) "max-autotune" decoded at 81% of the HBM floor
        # after ~25 s more compiling per batch size, "reduce-overhead" at 74% (benchmarks/llm_decode.py)
        self.compile_mode = compile_mode
        self.early_exit = "num_layers" in inspect.signature(model.forward).parameters  # can stop after k layers
        self._step = None
        self._cache = None
        if max_prefill_shapes < 1:
            raise ValueError(f"max_prefill_shapes must be >= 1, got {max_prefill_shapes}")
        self.max_prefill_shapes = max_prefill_shapes
        self._prefill_fn = None
        if compile_prefill:
            def forward(ids, pos, mask, cache, **kw):
                return self.model(ids, pos, mask, cache, 0, **kw)

            self._prefill_fn = torch.compile(forward, mode=prefill_mode, dynamic=False)
        self._prefill_shapes: set[tuple] = set()

    # ---- prefill ---------------------------------------------------------------------------------
    def check_lengths(self, seqs: list[list[int]], extra: int = 0) -> None:
        if len(seqs) == 0:
            raise ValueError("empty prompt list: give at least one prompt")
        for i, s in enumerate(seqs):
            if len(s) == 0:
                raise ValueError(f"prompt {i} is empty (0 tokens)")
            if len(s) + extra > self.max_context:
                raise ValueError(f"prompt {i} has {len(s)} tokens" + (f" + {extra} new tokens" if extra else "")
                                 + f", longer than the model context of {self.max_context}")

    def prefill(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache=None, **kw):
        """The model's forward over whole (left-padded) prompts from cache offset 0 -> (last hidden, hidden states).

        `kw`: output_hidden_states / num_layers / images. Compiled when compile_prefill is on, the call has no images
        and its shape is one of the first `max_prefill_shapes` seen (the set is counted here, in Python)."""
        if self._prefill_fn is not None and all(isinstance(v, (bool, int, type(None))) for v in kw.values()):
            key = (tuple(ids.shape), None if cache is None else (cache.max_len, type(cache).__name__), tuple(sorted(kw.items())))
            if key in self._prefill_shapes or len(self._prefill_shapes) < self.max_prefill_shapes:
                self._prefill_shapes.add(key)
                return self._prefill_fn(ids, pos, mask, cache, **kw)
        return self.model(ids, pos, mask, cache, 0, **kw)

    def num_layers(self) -> int:
        """Decoder layers of the model (every gen/llm model keeps them in model.layers)."""
        return len(self.model.model.layers)

    @torch.inference_mode()
    def hidden_states(self, seqs: list[list[int]], hidden_layer: int | list[int] = -1, final_norm: bool = True,
                      pad_to: int | None = None, **images) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of `hidden_layer` (HF numbering: 0 = embeddings, k = output of layer k, -1 = the last layer's
        output, normed unless `final_norm=False`) as (B, T, D) right-padded with zeros, mask (B, T). A list of layers
        gives their states concatenated on the feature axis in the order given: (B, T, len * D), as FLUX.2 stacks its
        encoder's.

        `pad_to` = L: run the batch the way a reference pipeline does after `tokenizer(padding="max_length",
        max_length=L)` with right padding: each prompt followed by pad tokens up to L, positions 0..L-1, pads masked as
        keys. The result (B, L, D) keeps the states the model computes at the pad positions (FLUX.2 conditions on them);
        real tokens' states equal those of the prompt alone.

        `images`: extra model inputs for vision-language models (pixel_values=..., image_grid_thw=...). Only the
        first max(layers) decoder layers run (`num_layers`) unless the normed output of the last one is asked for.
        """
        self.check_lengths(seqs)
        if pad_to is not None:
            if pad_to > self.max_context:
                raise ValueError(f"pad_to={pad_to} is longer than the model context of {self.max_context}")
            too_long = [i for i, s in enumerate(seqs) if len(s) > pad_to]
            if too_long:
                raise ValueError(f"prompt {too_long[0]} has {len(seqs[too_long[0]])} tokens, more than pad_to={pad_to}")
        n = self.num_layers()
        layers = [hidden_layer] if isinstance(hidden_layer, int) else list(hidden_layer)
        for i in layers:
            if not -(n + 1) <= i <= n:
                raise ValueError(f"hidden layer {i} out of range for {n + 1} hidden states")
        idx = [i % (n + 1) for i in layers]
        if pad_to is None:
            ids, mask, pos = pad_left(seqs, self.pad_id, self.device)
        else:
            ids, mask, pos = pad_right(seqs, pad_to, self.pad_id, self.device)
        images = {k: v.to(self.device) for k, v in images.items() if v is not None}
        several = len(set(idx)) > 1
        if (final_norm and n in idx) or not self.early_exit:  # the full forward; its last hidden state is normed
            if not final_norm and n in idx:
                raise ValueError(f"{type(self.model).__name__} cannot return the last layer's output without its norm")
            last, hidden = self.prefill(ids, pos, mask, output_hidden_states=idx != [n], **images)
            states = [last if i == n else hidden[i] for i in idx]
        else:  # only the first max(idx) layers run; the last of them returned raw
            k = max(idx)
            out, hidden = self.prefill(ids, pos, mask, num_layers=k, output_hidden_states=several, **images)
            states = [out if i == k else hidden[i] for i in idx]
        h = states[0] if len(states) == 1 else torch.cat(states, dim=-1)
        return left_to_right(h, mask) if pad_to is None else (h, mask)

    # ---- decode ----------------------------------------------------------------------------------
    def _new_cache(self, b: int, max_len: int):
        c = self._cache
        if c is None or c[0] != b or c[1] < max_len:  # reuse across calls with the same batch and room enough
            self._cache = None  # free the old one first
            self._cache = (b, max_len, self.model.new_cache(b, max_len, self.device, self.dtype))
            if self.compile:
                for t in vars(self._cache[2]).values():
                    if torch.is_tensor(t):
                        torch._dynamo.mark_static_address(t)
        return self._cache[2]

    def _decode_fn(self):
        def step(tok, pos, mask, cache, offset):
            h, _ = self.model(tok, pos, mask, cache, offset)
            return self.model.compute_logits(h[:, -1])

        if self.compile and self._step is None:
            self._step = torch.compile(step, mode=self.compile_mode, dynamic=False)
        return self._step if self.compile else step

    @torch.inference_mode()
    def generate(self, seqs: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """New token ids per prompt, up to and including the first stop token."""
        self.check_lengths(seqs, params.max_new_tokens)
        ids, mask, pos = pad_left(seqs, self.pad_id, self.device)
        b, t = ids.shape
        total = t + params.max_new_tokens
        cache = self._new_cache(b, total)
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        stop = torch.tensor(self.stop_ids or [-1], device=self.device)

        h, _ = self.prefill(ids, pos, mask, cache)
        logits = self.model.compute_logits(h[:, -1])  # (B, V)
        step_fn = self._decode_fn()
        static = self.static
        full_mask = torch.zeros(b, cache.max_len if static else total, dtype=torch.bool, device=self.device)
        full_mask[:, :t] = mask
        next_pos = pos[:, -1:] + 1  # (B, 1)
        offset = torch.full((), t, dtype=torch.long, device=self.device)  # device-side: no host sync per step
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        out = []
        for i in range(params.max_new_tokens):
            tok = sample(logits, params, gen).masked_fill(done, self.pad_id)  # (B,)
            out.append(tok)
            done |= torch.isin(tok, stop)
            # look at `done` (a host sync) only every few steps, so the host can queue steps ahead of the device
            if i == params.max_new_tokens - 1 or (i % 8 == 7 and bool(done.all())):
                break
            full_mask[:, t + i] = True
            if static:
                logits = step_fn(tok[:, None], next_pos, full_mask, cache, offset)
                offset += 1
            else:
                logits = step_fn(tok[:, None], next_pos, full_mask[:, : t + i + 1], cache, t + i)
            next_pos = next_pos + 1
        return [self._cut(row) for row in torch.stack(out, 1).tolist()]

    def _cut(self, row: list[int]) -> list[int]:
        for i, tok in enumerate(row):
            if tok in self.stop_ids:
                return row[: i + 1]
        return row
