"""The Gradio web UI (mounted at /ui by gen.server.app): one page, with a tab per served model that follows the
model's modality.

It is a door like the REST API: requests are admitted by the same Service (the model, its LoRAs, validation and the
server's limits) onto the same queue, outputs are served by opaque name under /outputs/ (no server paths reach the
page; previews travel inline as data URIs), and a generation whose page goes away (tab closed, run cancelled) is
cancelled. Not model code and not HTTP routing.
"""
from __future__ import annotations

import asyncio
import base64
import html
import io
import random
import re
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from gen.server.service import Served, Service, job_api_error
from gen.server.queue import Job
from gen.server.schemas import ApiError, decode_image, encode_image
from gen.types import GenerationRequest

MAX_SEED = 2**31 - 1
PAGE_GONE = "the page was closed or the run cancelled"
POLL_SECONDS = 0.25
CSS = ".gen-results{display:flex;flex-wrap:wrap;gap:8px}.gen-results figure{margin:0}" \
      ".gen-results img,.gen-results video{max-width:100%;display:block}" \
      ".gen-preview img{max-width:100%;display:block;image-rendering:auto}"


def build_ui(service: Service, delete_cache: tuple[int, int] | None = None) -> gr.Blocks:
    """The page for `service`'s models (a tab each when there are several). `delete_cache`: Gradio's (every, older
    than) seconds for its upload cache."""
    title = ", ".join(service.models)
    with gr.Blocks(title=f"gen: {title}", delete_cache=delete_cache) as ui:
        if len(service.models) == 1:
            _model_form(service, service.default, "generate")
        else:
            with gr.Tabs():
                for i, served in enumerate(service.models.values()):
                    with gr.Tab(served.name):
                        _model_form(service, served, "generate" if i == 0 else f"generate_{_slug(served.name)}")
    return ui


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


def _model_form(service: Service, served: Served, api_name: str) -> None:
    """The form of one model and its run handler (`api_name` for gradio_client)."""
    gen = served.generator
    d = gen.defaults
    video = gen.modality == "video"
    takes_images = getattr(gen.pipeline, "takes_images", "never")
    limits = served.budget.limits
    library = served.loras
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
                       image, enhance, lora_names, lora_scale, progress=gr.Progress()):
        seed = random.randint(0, MAX_SEED) if randomize or seed is None else int(seed)
        latest: list[tuple] = []  # the newest (step, total, preview), from the worker

        def on_preview(job: Job, step: int, total: int, preview: Image.Image) -> None:
            latest[:] = [(step, total, preview)]

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
            loras = [{"name": n, "scale": float(lora_scale)} for n in lora_names] if lora_names else None
            _, full = service.admit(req, gen.modality, served.name, loras=loras)
            job = service.submit(served, full, finish, on_preview=on_preview)
        except ApiError as e:
            raise gr.Error(e.message) from None
        try:
            progress(0, desc="queued")
            shown = None
            while not job.done.is_set():
                if time.monotonic() > job.deadline:
                    service.queue.cancel(job, "timeout")
                    break
                if job.total:
                    progress((job.step, job.total), desc="denoising", unit="steps")
                preview = latest[0] if latest else None
                if preview is not None and preview is not shown:
                    shown = preview
                    yield _preview_html(preview[2], full.width, full.height, *preview[:2]), gr.skip(), gr.skip()
                else:
                    yield gr.skip(), gr.skip(), gr.skip()  # Gradio stops a run whose page has gone at a yield
                await asyncio.sleep(POLL_SECONDS)
        finally:
            if not job.done.is_set():
                service.queue.cancel(job, PAGE_GONE)
        if job.error is not None or job.cancel_reason is not None:
            raise gr.Error(job_api_error(job).message)
        revised = job.result.revised_prompt or prompt
        yield _results_html(base, job.output, video), job.result.seed, revised

    gr.Markdown(f"## gen: `{served.name}` ({gen.family}, {gen.modality})")
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            image = gr.Image(label="Input image", type="filepath", visible=takes_images != "never")
            with gr.Row():
                seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
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
            with gr.Row(visible=library is not None):
                lora_names = gr.Dropdown(choices=library.names() if library is not None else [], value=[],
                                         multiselect=True, label="LoRAs", elem_id="loras",
                                         max_choices=getattr(gen.pipeline.loras, "max_loras", None))
                lora_scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale", elem_id="lora-scale")
            enhance = gr.Checkbox(label="Enhance prompt", value=False)
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column():
            result = gr.HTML(label="Video" if video else "Images", elem_id="result")
            used_seed = gr.Number(label="Seed used", precision=0, interactive=False)
            revised = gr.Textbox(label="Prompt used (revised when enhanced)", interactive=False)
    # concurrency_limit=None: Gradio holds no queue of its own; the server's queue bounds (and refuses) runs
    run.click(generate, inputs=[prompt, negative, seed, randomize, width, height, steps, guidance, num_frames,
                                fps, image, enhance, lora_names, lora_scale],
              outputs=[result, used_seed, revised], api_name=api_name, concurrency_limit=None)


def _preview_html(preview: Image.Image, width: int, height: int, step: int, total: int) -> str:
    """The latest preview (latent resolution, PNG inline) shown at the output size, with the step it shows."""
    buf = io.BytesIO()
    preview.save(buf, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return (f'<figure class="gen-preview"><img src="{src}" width="{width}" height="{height}" alt="preview">'
            f'<figcaption>preview, step {step} of {total}</figcaption></figure>')


def _results_html(base: str, names: list[str], video: bool) -> str:
    """The outputs, by their /outputs/ URLs, each with a download link."""
    items = []
    for i, name in enumerate(names):
        src = html.escape(f"{base}/outputs/{name}", quote=True)
        media = (f'<video src="{src}" controls loop></video>' if video
                 else f'<img src="{src}" alt="output {i + 1}">')
        items.append(f'<figure>{media}<a href="{src}" download="{html.escape(name)}">Download</a></figure>')
    return f'<div class="gen-results">{"".join(items)}</div>'
