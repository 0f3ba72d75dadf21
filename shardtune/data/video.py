"""Videos in chat rows, without a video decoder: a video is given as the list of its frames (pictures).

Where a row keeps its videos (data/media.py places them): verl's `videos` column (data.video_key) matched in
order to `<video>` placeholders in the message texts, TRL's `{"type": "video"}` parts taking the column's next
video, or a part carrying the video itself (`{"type": "video", "video": [...]}`). One video is a list of frames,
each read as data/media.py reads an image (bytes, a `{bytes, path}` mapping, a path, a URL), or a mapping whose
`video` (or `frames`) holds that list. An encoded video file (mp4, webm, ...) is refused by name: decoding one
needs a video decoder (the Qwen-VL video processors need torchvision), so the fix is to give its frames.

The frames of one video travel through the cache and the stream as one byte string (`pack`): a marker that no
image format starts with, the frame count and lengths, then the frames' encoded bytes; `frames_of` reads it back.

Tokens and tensors (Qwen2-VL and Qwen2.5-VL, `VIDEO_FAMILIES`): every frame goes through the model's own image
processor, whose smart_resize decides the size once per video (frames of another size are first resized to the
first frame's, so all frames share it, as the video processor requires); frames are grouped by
temporal_patch_size (the last frame repeated to fill the last group) and each group's patches are laid out as
Qwen's video processor lays out pixel_values_videos: rows by (group, merged block row, block column, row in
block, column in block), each row channel x time x patch x patch. A video is video_grid_thw.prod() /
merge_size^2 video tokens. Frames are used as given (no sampling); Qwen2.5-VL's temporal positions take them as
`VIDEO_FPS` frames per second (second_per_grid_ts = temporal_patch_size / VIDEO_FPS).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from shardtune.data.media import decode, pil_image, read_image
from shardtune.data.readers import Row
from shardtune.errors import row_error

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# the frame rate given frames are taken at: qwen-vl-utils' default sampling rate, the one verl's Qwen-VL videos
# are sampled at
VIDEO_FPS = 2.0
_MAGIC = b"\x00shardtune-video-frames\x00"  # PNG, JPEG, GIF, WebP, BMP and TIFF never start with a NUL byte
_VIDEO_FILE_HINT = "an encoded video file"


def pack(frames: list[bytes]) -> bytes:
    """One video's encoded frames as one byte string (what the cache and the stream carry)."""
    return _MAGIC + struct.pack(f"<I{len(frames)}Q", len(frames), *map(len, frames)) + b"".join(frames)


def is_video(blob: bytes) -> bool:
    return blob[:len(_MAGIC)] == _MAGIC


def frames_of(blob: bytes) -> list[bytes]:
    """The encoded frames of a packed video."""
    at = len(_MAGIC)
    (n,) = struct.unpack_from("<I", blob, at)
    sizes = struct.unpack_from(f"<{n}Q", blob, at + 4)
    at += 4 + 8 * n
    out = []
    for size in sizes:
        out.append(blob[at:at + size])
        at += size
    return out


def read_video(row: Row, value: Any, where: str) -> bytes:
    """One video (a list of frames, or a mapping holding one) read and checked frame by frame, packed."""
    frames = value
    if isinstance(value, dict) and not value.get("bytes"):
        frames = value.get("video", value.get("frames", value.get("path")))
    if not isinstance(frames, (list, tuple)):
        shown = frames if isinstance(frames, str) else f"{type(frames).__name__} data"
        raise row_error(row.path, row.index, where,
                        f"the video is {_VIDEO_FILE_HINT} or a single value ({str(shown)[:120]}), and shardtune has "
                        "no video decoder (a video is trained as the list of its frames)",
                        "give each video as a list of its frames (image bytes, {bytes, path} mappings or paths), "
                        "e.g. sampled at 2 per second, or set data.on_bad_row=skip")
    if not frames:
        raise row_error(row.path, row.index, where, "a video without frames",
                        "give each video at least one frame, or drop its <video> placeholder")
    return pack([read_image(row, frame, f"{where}[{k}]") for k, frame in enumerate(frames)])


class VideoPatches:
    """Packed videos -> Qwen-VL's pixel_values_videos rows and video_grid_thw, through the image processor."""

    def __init__(self, image_processor: Any, folder: str | Path):
        self.image_processor = image_processor
        self.overrides = _video_settings(Path(folder))
        get = lambda name: self.overrides.get(name, getattr(image_processor, name))  # noqa: E731
        self.patch, self.merge, self.temporal = get("patch_size"), get("merge_size"), get("temporal_patch_size")

    def grid(self, blob: bytes) -> tuple[int, int, int]:
        """(groups, patch rows, patch columns) of a packed video: the size from its first frame alone."""
        frames = frames_of(blob)
        out = self.image_processor(images=[decode(frames[0])], return_tensors="pt", **self.overrides)
        _, h, w = (int(x) for x in out["image_grid_thw"][0])
        return -(-len(frames) // self.temporal), h, w

    def tokens(self, blob: bytes) -> int:
        t, h, w = self.grid(blob)
        return t * h * w // self.merge ** 2

    def __call__(self, blob: bytes) -> tuple[torch.Tensor, list[int]]:
        frames = [decode(f) for f in frames_of(blob)]
        size = frames[0].size
        resample = pil_image().Resampling.BICUBIC
        frames = [f if f.size == size else f.resize(size, resample) for f in frames]
        frames += [frames[-1]] * (-len(frames) % self.temporal)  # the video processor's fill of the last group
        out = self.image_processor(images=frames, return_tensors="pt", **self.overrides)
        _, h, w = (int(x) for x in out["image_grid_thw"][0])
        n, t, p = len(frames), self.temporal, self.patch
        # the image processor repeats each picture `t` times along time: one copy is that frame's patches
        per_frame = out["pixel_values"].view(n, h * w, -1, t, p, p)[:, :, :, 0]
        grouped = per_frame.view(n // t, t, h * w, -1, p, p).permute(0, 2, 3, 1, 4, 5)
        return grouped.reshape(n // t * h * w, -1), [n // t, h, w]


def _video_settings(folder: Path) -> dict[str, Any]:
    """The video processor's own size and patch settings (video_preprocessor_config.json), passed to the image
    processor in place of its own; none without that file (the video processor then reads the image's)."""
    try:
        conf = json.loads((folder / "video_preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {k: conf[k] for k in ("patch_size", "merge_size", "temporal_patch_size") if conf.get(k)}
    size = dict(conf.get("size") or {})
    if conf.get("min_pixels"):
        size["shortest_edge"] = conf["min_pixels"]
    if conf.get("max_pixels"):
        size["longest_edge"] = conf["max_pixels"]
    if size.get("shortest_edge") and size.get("longest_edge"):
        out["size"] = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
    return out


def video_tensors(patches: VideoPatches, videos: list[bytes]) -> dict[str, torch.Tensor]:
    """pixel_values_videos, video_grid_thw and second_per_grid_ts of a micro-batch's videos, in order."""
    parts = [patches(v) for v in videos]
    return {"pixel_values_videos": torch.cat([p for p, _ in parts]),
            "video_grid_thw": torch.tensor([g for _, g in parts], dtype=torch.long),
            "second_per_grid_ts": torch.full((len(parts),), patches.temporal / VIDEO_FPS)}
