"""Images in chat rows: where a row keeps its pictures, how they are read, and where they sit in the chat.

Three layouts are read (any mix within a row):
- verl's: an `images` column (data.image_key) holding a list of images, and `<image>` placeholders inside the
  message texts, matched to the list in order (a row with `videos`, data.video_key, is refused by name: no
  video path is proven here);
- TRL's: the same column, with `{"type": "image"}` parts in the message contents in place of the placeholders;
- OpenAI-style content parts carrying the picture themselves: `{"type": "image", "image" | "path" | "url": ...}`,
  `{"type": "image_url", "image_url": {"url": ...}}`.

An image is raw bytes, a `{bytes, path}` mapping (how Hugging Face datasets and verl store images), a local path
(absolute, or relative to the working directory or to the data file's folder), an fsspec URL (s3://, gs://, ...,
read through the remote-storage readers) or a `data:image/...;base64,` URL. Each is read to its encoded bytes and
decoded once to check it; the bytes are what the cache and the stream carry (never decoded pixels).

Every message's content comes back as text with the chat template's own marker for an image (e.g.
`<|vision_start|><|image_pad|><|vision_end|>`) where each picture sits, so the loss masks see plain texts and
every text rule holds unchanged; the processor (data/vision.py) later expands each marker into the image's tokens.
"""

from __future__ import annotations

import base64
import io
import os
from typing import Any

from shardtune import remote
from shardtune.data.readers import Row
from shardtune.errors import ConfigError, row_error

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_IMAGE_PART_KEYS = ("image", "path", "url", "image_url")


def check_video_placeholders(row: Row, messages: list[dict[str, Any]], video_key: str) -> None:
    """A `<video>` placeholder in a text with no videos in the row is refused (it would reach the model as the
    plain text '<video>', which no model sees as a video)."""
    if row.data.get(video_key):
        return  # place_images names the videos column itself
    for i, m in enumerate(messages):
        content = m.get("content")
        texts = [content] if isinstance(content, str) else [
            p.get("text") for p in content or [] if isinstance(p, dict) and isinstance(p.get("text"), str)]
        if any(VIDEO_PLACEHOLDER in t for t in texts if isinstance(t, str)):
            raise row_error(row.path, row.index, f"messages[{i}].content",
                            f"a {VIDEO_PLACEHOLDER} placeholder, and the row has no videos (column '{video_key}', "
                            "data.video_key); shardtune does not train videos",
                            "drop the placeholder (or the row), give the frames as images with <image> "
                            "placeholders, or set data.on_bad_row=skip to skip such rows")


def row_has_media(row: Row, messages: list[dict[str, Any]], image_key: str, video_key: str) -> bool:
    """Whether the row carries pictures or videos: a non-empty media column or an image part."""
    if row.data.get(image_key) or row.data.get(video_key):
        return True
    return any(isinstance(p, dict) and p.get("type") in ("image", "image_url", "video")
               for m in messages if isinstance(m.get("content"), list) for p in m["content"])


def place_images(row: Row, messages: list[dict[str, Any]], image_key: str, video_key: str,
                 marker: str) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The messages with every image written as `marker`, and the images' encoded bytes in chat order."""
    if row.data.get(video_key):
        raise row_error(row.path, row.index, video_key, "the row has videos, which shardtune does not train (the "
                        "Qwen-VL video processors need torchvision, and no video path is proven here)",
                        "drop the videos column (or the rows), give the frames as images, or set "
                        "data.on_bad_row=skip to skip such rows")
    column = _column(row, image_key)
    used = 0  # images of the column placed so far
    images: list[bytes] = []
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}].content"
        content, text = m.get("content"), []
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" or (kind is None and isinstance(part, dict) and "text" in part):
                pieces = str(part.get("text") or "").split(IMAGE_PLACEHOLDER)
                for k, piece in enumerate(pieces):
                    if k:
                        images.append(_take(row, column, used, image_key, where))
                        used += 1
                        text.append(marker)
                    text.append(piece)
            elif kind in ("image", "image_url"):
                value = next((part[key] for key in _IMAGE_PART_KEYS if part.get(key) is not None), None)
                if value is None:  # TRL's layout: the picture is the column's next one
                    images.append(_take(row, column, used, image_key, where))
                    used += 1
                else:
                    images.append(read_image(row, value, f"{where}[{j}]"))
                text.append(marker)
            else:
                raise row_error(row.path, row.index, f"{where}[{j}]", f"a content part of type {kind!r}",
                                "use text and image parts ({type: text, text}, {type: image, image: ...})")
        out.append({**m, "content": "".join(text)})
    if used != len(column):
        raise row_error(row.path, row.index, image_key,
                        f"{len(column)} images but {used} placeholders (<image> or image parts) in the messages",
                        "give every image one <image> placeholder where it belongs in the conversation")
    return out, images


def _column(row: Row, key: str) -> list[Any]:
    value = row.data.get(key)
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (bytes, str, dict)):
        return [value]
    raise row_error(row.path, row.index, key, f"expected a list of images, got {type(value).__name__}",
                    "store a list of images ({bytes, path} mappings, paths or URLs)")


def _take(row: Row, column: list[Any], used: int, key: str, where: str) -> bytes:
    if used >= len(column):
        raise row_error(row.path, row.index, where,
                        f"more image placeholders than the {len(column)} images of the '{key}' column",
                        f"give every <image> placeholder one image in '{key}' (data.image_key)")
    return read_image(row, column[used], f"{key}[{used}]")


def read_image(row: Row, value: Any, where: str) -> bytes:
    """The encoded bytes of one image, checked to decode."""
    data = _image_bytes(row, value, where)
    check_image(row, data, where)
    return data


def _image_bytes(row: Row, value: Any, where: str) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        inner = value.get("path") or value.get("url") or (value.get("image_url") or {}).get("url")
        if inner:
            return _image_bytes(row, inner, where)
        raise row_error(row.path, row.index, where, f"an image mapping without bytes or a path (keys {sorted(value)})",
                        "store {bytes: ..., path: ...} with the bytes, or a path that exists")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise row_error(row.path, row.index, where,
                        f"expected image bytes, a path or a URL, got {type(value).__name__}",
                        "store the image's bytes, a path or a URL")
    if value.startswith("data:"):
        try:
            return base64.b64decode(value.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise row_error(row.path, row.index, where, "a data: URL that is not base64",
                            "use data:image/png;base64,<...>") from None
    if remote.is_url(value):
        try:
            with remote.open_data(value) as f:
                return f.read()
        except Exception as e:  # the store's own errors: missing object, no credentials
            raise row_error(row.path, row.index, where, f"cannot read {value} ({type(e).__name__}: {e})",
                            "check the URL and the storage credentials") from None
    for candidate in _local_candidates(row.path, value):
        if os.path.isfile(candidate):
            try:
                with open(candidate, "rb") as f:
                    return f.read()
            except OSError as e:  # no permission, an unreadable disk
                raise row_error(row.path, row.index, where, f"the image file '{candidate}' cannot be read "
                                f"({e.strerror or e})", "make the file readable, or store the image's bytes") from None
    raise row_error(row.path, row.index, where, f"the image file '{value}' does not exist",
                    "store the image's bytes, an absolute path, or a path relative to the data file")


def _local_candidates(data_file: str, path: str) -> list[str]:
    path = os.path.expanduser(path)
    if os.path.isabs(path) or remote.is_url(data_file):
        return [path]
    return [path, os.path.join(os.path.dirname(os.path.abspath(data_file)), path)]


def pil_image() -> Any:
    """PIL's Image module, or one clear error saying how to install it (Pillow is the `vision` extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("The data holds images, and reading them needs Pillow, which is not installed. "
                          "Fix: pip install 'shardtune[vision]' (or pip install pillow).") from None
    return Image


def check_image(row: Row, data: bytes, where: str) -> None:
    Image = pil_image()
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise row_error(row.path, row.index, where, f"the image cannot be decoded ({type(e).__name__}: {e})",
                        "replace the image with a valid PNG/JPEG, or set data.on_bad_row=skip") from None


def decode(data: bytes) -> Any:
    """Encoded bytes -> an RGB PIL image (what image processors take)."""
    with pil_image().open(io.BytesIO(data)) as im:
        return im.convert("RGB")
