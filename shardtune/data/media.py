"""Images and videos in chat rows: where a row keeps them, how they are read, and where they sit in the chat.

Three layouts are read (any mix within a row):
- verl's: an `images` column (data.image_key) holding a list of images, and `<image>` placeholders inside the
  message texts, matched to the list in order; likewise a `videos` column (data.video_key) and `<video>`
  placeholders;
- TRL's: the same columns, with `{"type": "image"}` / `{"type": "video"}` parts in the message contents in place
  of the placeholders;
- OpenAI-style content parts carrying the picture themselves: `{"type": "image", "image" | "path" | "url": ...}`,
  `{"type": "image_url", "image_url": {"url": ...}}`, and `{"type": "video", "video": [frames]}`.

An image is raw bytes, a `{bytes, path}` mapping (how Hugging Face datasets and verl store images), a local path
(absolute, or relative to the working directory or to the data file's folder), an fsspec URL (s3://, gs://, ...,
read through the remote-storage readers) or a `data:image/...;base64,` URL. Each is read to its encoded bytes and
decoded once to check it; the bytes are what the cache and the stream carry (never decoded pixels). A video is
the list of its frames, each an image as above (data/video.py: an encoded video file is refused, there is no
video decoder; videos are trained for Qwen2-VL and Qwen2.5-VL).

`<video>` placeholders are matched to the videos before anything else (`check_video_places`) on a
vision-language model: a placeholder without its video is an error naming the row and the message, never text
sent to the model (to a text model `<video>` is text, an HTML tag say).

Every message's content comes back as text with the chat template's own marker for an image (e.g.
`<|vision_start|><|image_pad|><|vision_end|>`) or a video where each sits, so the loss masks see plain texts and
every text rule holds unchanged; the processor (data/vision.py) later expands each marker into its tokens.
"""

from __future__ import annotations

import base64
import io
import os
import re
from typing import Any

from shardtune import remote
from shardtune.data.readers import Row
from shardtune.errors import ConfigError, row_error

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"  # data/video.py
_IMAGE_PART_KEYS = ("image", "path", "url", "image_url")


def row_has_media(row: Row, messages: list[dict[str, Any]], image_key: str, video_key: str) -> bool:
    """Whether the row carries pictures or videos: a non-empty media column or an image or video part."""
    if row.data.get(image_key) or row.data.get(video_key):
        return True
    return any(isinstance(p, dict) and p.get("type") in ("image", "image_url", "video")
               for m in messages if isinstance(m.get("content"), list) for p in m["content"])


def row_has_videos(row: Row, messages: list[dict[str, Any]], video_key: str) -> bool:
    """Whether the row carries videos: a non-empty videos column or a video part."""
    return bool(row.data.get(video_key)) or any(
        isinstance(p, dict) and p.get("type") == "video"
        for m in messages if isinstance(m.get("content"), list) for p in m["content"])


def _texts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, text) of every text of the messages: a string content, or a content list's text parts."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        out += [(f"messages[{i}].content", str(p.get("text") or "")) for p in parts
                if isinstance(p, dict) and (p.get("type") == "text" or (p.get("type") is None and "text" in p))]
    return out


def check_video_places(row: Row, messages: list[dict[str, Any]], video_key: str) -> None:
    """Every `<video>` placeholder and column video part has one video of the column, and every video one place:
    checked before anything is read, so a row without videos cannot pass `<video>` on to the model as text."""
    places = [where for where, text in _texts(messages) for _ in range(text.count(VIDEO_PLACEHOLDER))]
    places += [f"messages[{i}].content" for i, m in enumerate(messages) if isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "video"
               and all(p.get(k) is None for k in _VIDEO_PART_KEYS)]
    videos = len(_column(row, video_key, "videos"))
    if places and not videos:
        raise row_error(row.path, row.index, places[0],
                        f"a {VIDEO_PLACEHOLDER} placeholder, and the row has no videos (no '{video_key}' column, "
                        "data.video_key; a {type: video} part without its video counts as one)",
                        f"give the row its videos in '{video_key}' (each a list of frames), or take the "
                        f"{VIDEO_PLACEHOLDER} placeholder out of the text (or set data.on_bad_row=skip)")
    if len(places) != videos:
        raise row_error(row.path, row.index, video_key,
                        f"{videos} videos but {len(places)} placeholders ({VIDEO_PLACEHOLDER} or video parts) in "
                        "the messages", f"give every video one {VIDEO_PLACEHOLDER} placeholder where it belongs in "
                        "the conversation (or set data.on_bad_row=skip)")


def place_media(row: Row, messages: list[dict[str, Any]], image_key: str, video_key: str, marker: str,
                video_marker: str | None) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The messages with every image written as `marker` and every video as `video_marker`, and their encoded
    bytes in chat order (a video's frames packed into one, data/video.py)."""
    placer = _Placer(row, {"image": (image_key, marker), "video": (video_key, video_marker)})
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}].content"
        content = m.get("content")
        if isinstance(content, list):
            text = "".join(placer.part(part, f"{where}[{j}]", where) for j, part in enumerate(content))
        else:
            text = placer.part({"type": "text", "text": content or ""}, where, where)
        out.append({**m, "content": text})
    placer.check_all_used()
    return out, placer.media


_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
_VIDEO_PART_KEYS = ("video", "path", "url")


class _Placer:
    """Reads the pictures and videos of one row in chat order, each where it is named."""

    def __init__(self, row: Row, kinds: dict[str, tuple[str, str | None]]):
        self.row = row
        self.kinds = kinds  # kind -> (its column, its marker in the chat)
        self.columns = {kind: _column(row, key, kind + "s") for kind, (key, _) in kinds.items()}
        self.used = dict.fromkeys(kinds, 0)  # of each column, the entries placed so far
        self.media: list[bytes] = []

    def part(self, part: Any, where: str, message: str) -> str:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" or (kind is None and isinstance(part, dict) and "text" in part):
            pieces = _PLACEHOLDERS.split(str(part.get("text") or ""))
            return "".join(self.take("image" if p == IMAGE_PLACEHOLDER else "video", message) if k % 2 else p
                           for k, p in enumerate(pieces))
        keys = {"image": _IMAGE_PART_KEYS, "image_url": _IMAGE_PART_KEYS, "video": _VIDEO_PART_KEYS}.get(kind)
        if keys is None:
            raise row_error(self.row.path, self.row.index, where, f"a content part of type {kind!r}",
                            "use text, image and video parts ({type: text, text}, {type: image, image: ...}, "
                            "{type: video, video: [frames]})")
        kind = "video" if kind == "video" else "image"
        value = next((part[key] for key in keys if part.get(key) is not None), None)
        if value is None:  # TRL's layout: the column's next one
            return self.take(kind, message)
        return self.add(kind, value, where)

    def take(self, kind: str, where: str) -> str:
        key, column, k = self.kinds[kind][0], self.columns[kind], self.used[kind]
        if k >= len(column):
            raise row_error(self.row.path, self.row.index, where,
                            f"more {kind} placeholders than the {len(column)} {kind}s of the '{key}' column",
                            f"give every <{kind}> placeholder one {kind} in '{key}' (data.{kind}_key)")
        self.used[kind] += 1
        return self.add(kind, column[k], f"{key}[{k}]")

    def add(self, kind: str, value: Any, where: str) -> str:
        from shardtune.data.video import read_video  # data/video.py reads its frames with this module

        self.media.append(read_image(self.row, value, where) if kind == "image" else
                          read_video(self.row, value, where))
        return self.kinds[kind][1]

    def check_all_used(self) -> None:
        key, column = self.kinds["image"][0], self.columns["image"]
        if self.used["image"] != len(column):
            raise row_error(self.row.path, self.row.index, key,
                            f"{len(column)} images but {self.used['image']} placeholders (<image> or image parts) "
                            "in the messages",
                            "give every image one <image> placeholder where it belongs in the conversation")


def _column(row: Row, key: str, what: str = "images") -> list[Any]:
    value = row.data.get(key)
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (bytes, str, dict)):
        return [value]
    raise row_error(row.path, row.index, key, f"expected a list of {what}, got {type(value).__name__}",
                    f"store a list of {what} ({{bytes, path}} mappings, paths or URLs"
                    + ("; a video as a list of its frames)" if what == "videos" else ")"))


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
