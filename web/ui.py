"""The Gradio web UI (mounted at /ui by gen.server.app): one page that follows the model's modality.

It queues on the same Engine as the REST API, so UI and API requests never run two generations at once.
Not model code and not HTTP routing.
"""
from __future__ import annotations

import random
import uuid
from pathlib import Path

import gradio as gr

from gen.server.engine import Engine, EngineClosed, QueueFull
from gen.types import Cancelled, GenError, GenerationRequest

MAX_SEED = 2**31 - 1


def build_ui(engine: Engine, model_id: str, output_dir: Path) -> gr.Blocks:
    """The page for `engine`'s model; video files it shows are written under `output_dir`."""
    gen = engine.generator
    d = gen.defaults
    video = gen.modality == "video"
    takes_images = getattr(gen.pipeline, "takes_images", "never")
    output_dir.mkdir(parents=True, exist_ok=True)

    def generate(prompt, negative_prompt, seed, randomize, width, height, steps, guidance, num_frames, fps, image,
                 enhance, progress=gr.Progress()):
        seed = random.randint(0, MAX_SEED) if randomize or seed is None else int(seed)
        req = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt or None, seed=seed,
                                num_inference_steps=int(steps), guidance_scale=float(guidance), height=int(height),
                                width=int(width), num_frames=int(num_frames) if video else None,
                                fps=int(fps) if video else None, images=(image,) if image is not None else (),
                                enhance_prompt=bool(enhance))
        try:
            job = engine.submit(req)
        except (QueueFull, EngineClosed) as e:
            raise gr.Error(str(e)) from None
        progress(0, desc="queued")
        while not job.done.wait(0.1):
            if job.total:
                progress((job.step, job.total), desc="denoising", unit="steps")
        if isinstance(job.error, GenError):
            raise gr.Error(str(job.error))
        if isinstance(job.error, Cancelled):
            raise gr.Error(f"cancelled ({job.cancel_reason})")
        if job.error is not None:
            raise gr.Error(f"the generation failed ({type(job.error).__name__}); see the server log")
        result = job.result
        revised = result.revised_prompt or prompt
        if video:
            path = result.save(output_dir / f"{uuid.uuid4().hex}.mp4")
            return None, str(path), result.seed, revised
        return result.images, None, result.seed, revised

    with gr.Blocks(title=f"gen: {model_id}") as ui:
        gr.Markdown(f"## gen: `{model_id}` ({gen.family}, {gen.modality})")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                image = gr.Image(label="Input image", type="pil", visible=takes_images != "never")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED,
                                     elem_id="seed")
                    randomize = gr.Checkbox(label="Randomize seed", value=True, elem_id="randomize")
                with gr.Row():
                    width = gr.Slider(d.size_multiple, 2048, value=d.width, step=d.size_multiple, label="Width",
                                      elem_id="width")
                    height = gr.Slider(d.size_multiple, 2048, value=d.height, step=d.size_multiple, label="Height",
                                       elem_id="height")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=d.num_inference_steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.1, label="Guidance scale")
                with gr.Row(visible=video):
                    num_frames = gr.Slider(1, 161, value=d.num_frames or 81, step=4, label="Frames (4k+1)")
                    fps = gr.Slider(1, 60, value=d.fps or 16, step=1, label="FPS")
                enhance = gr.Checkbox(label="Enhance prompt", value=False)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", visible=not video, format="png", elem_id="gallery")
                clip = gr.Video(label="Video", visible=video, elem_id="video")
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                revised = gr.Textbox(label="Prompt used (revised when enhanced)", interactive=False)
        run.click(generate, inputs=[prompt, negative, seed, randomize, width, height, steps, guidance, num_frames,
                                    fps, image, enhance],
                  outputs=[gallery, clip, used_seed, revised], api_name="generate")
    return ui
