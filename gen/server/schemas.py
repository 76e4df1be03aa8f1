"""Request bodies of the REST API (OpenAI's field names, plus our extensions) and their conversion to requests.

Not the HTTP handling (app.py); bad values raise ApiError naming the field in `param`.
"""
from __future__ import annotations

import io
import json
import math
import re
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from gen.types import GenerationRequest, image_bytes

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
MAX_INPUT_PIXELS = 4096 * 4096  # an uploaded image may not decode to more (decompression bombs)
MAX_JSON_DEPTH = 16  # our bodies are flat; deeper nesting is refused before parsing
MAX_NUMBER_DIGITS = 40  # longer number literals are refused (Python's int() would take quadratic time past 4300)
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class ApiError(Exception):
    """An error answered as {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(data: bytes) -> dict:
    """A JSON object body, or a 400 naming what is wrong: not UTF-8 / not JSON, nested deeper than MAX_JSON_DEPTH,
    number literals longer than MAX_NUMBER_DIGITS, NaN / Infinity (not JSON), not an object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 (byte {e.start})", None, "invalid_json") from None
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the body is nested deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json")
        elif c in "]}":
            depth -= 1

    def number(kind):
        def parse(literal: str):
            if len(literal) > MAX_NUMBER_DIGITS:
                raise ApiError(400, f"a number in the body has {len(literal)} characters; at most "
                                    f"{MAX_NUMBER_DIGITS} are accepted", None, "invalid_json")
            value = kind(literal)
            if isinstance(value, float) and not math.isfinite(value):
                raise ApiError(400, f"the number {literal} is out of range", None, "invalid_json")
            return value
        return parse

    def constant(name: str):
        raise ApiError(400, f"{name} is not valid JSON", None, "invalid_json")

    try:
        value = json.loads(text, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", None,
                       "invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(value).__name__}", None, "invalid_json")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def parse(cls, data: dict):
        """Validate `data` (a JSON object or form fields) or raise a 400 ApiError naming the first bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e.errors()) from None


def validation_error(errors) -> ApiError:
    """The first pydantic / FastAPI validation error as a 400 naming its field (never FastAPI's 422 body)."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path")]
    param = loc[0] if loc else None
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown parameter {param!r}", param, "unknown_parameter")
    if err.get("type") == "missing":
        return ApiError(400, f"missing required parameter {param!r}", param, "missing_required_parameter")
    return ApiError(400, f"invalid {param!r}: {err.get('msg')}", param, "invalid_value")


class _Common(_Body):
    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    user: str | None = None  # accepted for OpenAI compatibility, unused
    loras: Any = None  # [{"name", "scale", "target"}]: LoRAs of the server's --lora-dir (checked by the library)

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_in_a_form(cls, value):
        """A multipart form sends the list as a JSON string."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"a form's loras must be a JSON list, got {value[:40]!r} ({e.msg})") from None
        return value


class ImageBody(_Common):
    """POST /v1/images/generations (JSON) and /v1/images/edits (form fields)."""

    n: int = 1
    size: str | None = None  # "WxH" or "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = None
    enhance_prompt: bool = False
    stream: bool = False  # server-sent events: partial images, then the final ones (OpenAI's image streaming)
    partial_images: int | None = None  # 0-3 partial images while streaming (default 0)

    def to_request(self, images: tuple[Image.Image, ...] = ()) -> GenerationRequest:
        if self.output_compression is not None and not 0 <= self.output_compression <= 100:
            raise ApiError(400, f"output_compression must be between 0 and 100, got {self.output_compression}",
                           "output_compression", "invalid_value")
        if self.partial_images is not None and not 0 <= self.partial_images <= 3:
            raise ApiError(400, f"partial_images must be between 0 and 3, got {self.partial_images}",
                           "partial_images", "invalid_value")
        if self.stream and self.response_format == "url":
            raise ApiError(400, "a streamed response carries b64_json images; response_format 'url' cannot be "
                                "streamed", "response_format", "invalid_value")
        width, height = parse_size(self.size)
        return GenerationRequest(prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed,
                                 num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                 true_cfg_scale=self.true_cfg_scale, height=height, width=width, images=images,
                                 num_outputs=self.n, enhance_prompt=self.enhance_prompt)


class VideoBody(_Common):
    """POST /v1/videos (JSON, or form fields with an `input_reference` file)."""

    seconds: float | None = None
    size: str | None = None
    fps: int | None = None
    num_frames: int | None = None
    webhook_url: str | None = None  # called when the job completes or fails (gen/server/webhooks.py)

    def to_request(self, fps_default: int, images: tuple[Image.Image, ...] = ()) -> GenerationRequest:
        width, height = parse_size(self.size)
        frames = self.num_frames
        if self.seconds is not None:
            if not 0 < self.seconds <= 60:
                raise ApiError(400, f"seconds must be in (0, 60], got {self.seconds}", "seconds", "invalid_value")
            if frames is None:  # the nearest valid 4k+1 frame count
                frames = 4 * max(1, round(self.seconds * (self.fps or fps_default) / 4)) + 1
        return GenerationRequest(prompt=self.prompt, negative_prompt=self.negative_prompt, seed=self.seed,
                                 num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                                 true_cfg_scale=self.true_cfg_scale, height=height, width=width, num_frames=frames,
                                 fps=self.fps, images=images)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """"WxH" -> (width, height); None or "auto" -> the model's defaults."""
    if size is None or size == "auto":
        return None, None
    m = _SIZE.fullmatch(size)
    if m is None:
        raise ApiError(400, f"size must look like '1024x1024' (width x height), got {size!r}", "size", "invalid_value")
    return int(m[1]), int(m[2])


def decode_image(data: bytes, param: str) -> Image.Image:
    """Uploaded bytes -> RGB image; anything that is not a readable image (or is a decompression bomb) -> 400."""
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            if im.width * im.height > MAX_INPUT_PIXELS:
                raise ApiError(400, f"{param} is {im.width}x{im.height} pixels; the most accepted is "
                                    f"{MAX_INPUT_PIXELS} pixels", param, "image_too_large")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ApiError(400, f"{param} is not a readable image ({type(e).__name__})", param, "invalid_image") from None


def encode_image(image: Image.Image, fmt: str, compression: int | None) -> bytes:
    """PNG / JPEG / WEBP bytes; `compression` (0-100, as OpenAI's: 100 is best quality) is the JPEG/WEBP quality."""
    return image_bytes(image, fmt, compression if fmt in ("jpeg", "webp") else None)
