"""The Gradio web UI (mounted at /ui by gen.server.app): one page that follows the model's modality.

It is a door like the REST API: requests are admitted by the same Service (validation and the server's limits) onto
the same queue, outputs are served by opaque name under /outputs/ (no server paths reach the page), and a generation
whose page goes away (tab closed, run cancelled) is cancelled. Not model code and not HTTP routing.
"""
from __future__ import annotations

import asyncio
import html
import random
import time
from pathlib import Path

import gradio as gr

from gen.server.service import Service, job_api_error
from gen.server.queue import Job
from gen.server.schemas import ApiError, decode_image, encode_image
from gen.types import GenerationRequest

MAX_SEED = 2**31 - 1
PAGE_GONE = "the page was closed or the run cancelled"
CSS = ".gen-results{display:flex;flex-wrap:wrap;gap:8px}.gen-results figure{margin:0}" \
      ".gen-results img,.gen-results video{max-width:100%;display:block}"


def build_ui(service: Service, delete_cache: tuple[int, int] | None = None) -> gr.Blocks:
    """The page for `service`'s model. `delete_cache`: Gradio's (every, older than) seconds for its upload cache."""
    gen = service.generator
    d = gen.defaults
    video = gen.modality == "video"
    takes_images = getattr(gen.pipeline, "takes_images", "never")
    limits = service.budget.limits
    base = service.opts.public_url.rstrip("/") if service.opts.public_url else ".."  # the page is /ui/

    def finish(job: Job) -> list[str]:  # in the worker, under the job's deadline
        result = job.result
        if video:
            return [service.outputs.save_video(result.frames, result.fps or 16, job.check)]
        names = []
        for image in result.images:
            job.check()
            names.append(service.outputs.save(encode_image(image, "png", None), "png"))
        return names

    async def generate(prompt, negative_prompt, seed, randomize, width, height, steps, guidance, num_frames, fps,
                       image, enhance, progress=gr.Progress()):
        seed = random.randint(0, MAX_SEED) if randomize or seed is None else int(seed)
        try:
            images = ()
            if image:
                data = await asyncio.to_thread(Path(image).read_bytes)
                images = (await asyncio.to_thread(decode_image, data, "image"),)
            req = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt or None, seed=seed,
                                    num_inference_steps=int(steps), guidance_scale=float(guidance),
                                    height=int(height), width=int(width),
                                    num_frames=int(num_frames) if video else None, fps=int(fps) if video else None,
                                    images=images, enhance_prompt=bool(enhance))
            job = service.submit(service.admit(req, gen.modality), finish)
        except ApiError as e:
            raise gr.Error(e.message) from None
        try:
            progress(0, desc="queued")
            while not job.done.is_set():
                if time.monotonic() > job.deadline:
                    service.queue.cancel(job, "timeout")
                    break
                if job.total:
                    progress((job.step, job.total), desc="denoising", unit="steps")
                yield gr.skip(), gr.skip(), gr.skip()  # Gradio stops a run whose page has gone at a yield
                await asyncio.sleep(0.25)
        finally:
            if not job.done.is_set():
                service.queue.cancel(job, PAGE_GONE)
        if job.error is not None or job.cancel_reason is not None:
            raise gr.Error(job_api_error(job).message)
        revised = job.result.revised_prompt or prompt
        yield _results_html(base, job.output, video), job.result.seed, revised

    with gr.Blocks(title=f"gen: {service.model_id}", delete_cache=delete_cache) as ui:
        gr.Markdown(f"## gen: `{service.model_id}` ({gen.family}, {gen.modality})")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                image = gr.Image(label="Input image", type="filepath", visible=takes_images != "never")
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
                    steps = gr.Slider(1, limits.max_steps, value=d.num_inference_steps, step=1, label="Steps",
                                      elem_id="steps")
                    guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.1, label="Guidance scale")
                with gr.Row(visible=video):
                    num_frames = gr.Slider(1, limits.max_frames or 161, value=d.num_frames or 81, step=4,
                                           label="Frames (4k+1)")
                    fps = gr.Slider(1, 60, value=d.fps or 16, step=1, label="FPS")
                enhance = gr.Checkbox(label="Enhance prompt", value=False)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                result = gr.HTML(label="Video" if video else "Images", elem_id="result")
                used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                revised = gr.Textbox(label="Prompt used (revised when enhanced)", interactive=False)
        # concurrency_limit=None: Gradio holds no queue of its own; the server's queue bounds (and refuses) runs
        run.click(generate, inputs=[prompt, negative, seed, randomize, width, height, steps, guidance, num_frames,
                                    fps, image, enhance],
                  outputs=[result, used_seed, revised], api_name="generate", concurrency_limit=None)
    return ui


def _results_html(base: str, names: list[str], video: bool) -> str:
    """The outputs, by their /outputs/ URLs, each with a download link."""
    items = []
    for i, name in enumerate(names):
        src = html.escape(f"{base}/outputs/{name}", quote=True)
        media = (f'<video src="{src}" controls loop></video>' if video
                 else f'<img src="{src}" alt="output {i + 1}">')
        items.append(f'<figure>{media}<a href="{src}" download="{html.escape(name)}">Download</a></figure>')
    return f'<div class="gen-results">{"".join(items)}</div>'
