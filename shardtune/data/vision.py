"""The model's own image processing: how many tokens each picture becomes, and its pixel tensors.

Read from the tokenizer's folder (model.path, or model.tokenizer_path when set): the image processor of its
`preprocessor_config.json`, and the processor (`AutoProcessor`) when it loads. The processor is the model's
own rule for expanding an image into tokens; Qwen-VL and Gemma 4 processors also build a video processor that
needs torchvision, so where the processor cannot load the rule is derived from the image processor itself
(Qwen-style processors report each image's patch grid: grid tokens / merge_size^2 image tokens; Gemma 4's its
`num_soft_tokens_per_image`, which its processor writes between its begin- and end-of-image tokens).

The chat template decides what an image looks like in the text: `ImageProcessing.marker` is what it writes for
one `{"type": "image"}` part (found by rendering one), e.g. `<|vision_start|><|image_pad|><|vision_end|>` or
`<start_of_image>`. data/media.py writes that marker (without the whitespace around it, `placed`) where each
picture sits, the loss masks are derived on that text, and `expand` then replaces each marker's tokens by the
image's tokens (the whole marker's, expanded), none of them trained.
Videos (lists of frames, data/video.py) go the same way for Qwen2-VL and Qwen2.5-VL: the template's marker for a
`{"type": "video"}` part becomes the video's grid / merge_size^2 video tokens; other families refuse them by name.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import torch

from shardtune.batch import IGNORE_INDEX
from shardtune.data.media import decode
from shardtune.data.readers import Row
from shardtune.data.video import VIDEO_FAMILIES, VideoPatches, is_video, video_tensors
from shardtune.errors import DataError, row_error
from shardtune.vision import PROCESSOR_FILES, has_image_processor

_PROBE = ("\x01shardtune-before\x01", "\x01shardtune-after\x01")


class WithImages(NamedTuple):
    """A tokenized sample (as data/chat.py's `Tokenized`) with the encoded pictures whose tokens it holds."""

    input_ids: list[int]
    labels: list[int]
    images: tuple[bytes, ...]
    weights: list[float] | None = None  # as Tokenized's: the loss weight of each trained token


def images_of(sample: Any) -> tuple[bytes, ...]:
    """The pictures of a tokenized sample (none for text)."""
    return getattr(sample, "images", ())


class ImageProcessing:
    def __init__(self, folder: str, tokenizer: Any, template: str):
        from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

        self.folder = folder
        self.tokenizer = tokenizer
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        try:
            self.processor = AutoProcessor.from_pretrained(folder)
        except Exception:  # e.g. a video processor that needs torchvision; the image processor's rule serves
            self.processor = None
        if self.processor is not None and not hasattr(self.processor, "image_processor"):
            self.processor = None  # AutoProcessor fell back to the bare tokenizer or image processor
        config = AutoConfig.from_pretrained(folder)
        self.image_token_id = _image_token_id(config, tokenizer)
        self.marker = template_marker(tokenizer, template)
        self.marker_ids = tokenizer(self.marker, add_special_tokens=False)["input_ids"]
        # what a message's text holds for an image: the marker without the whitespace around it (Gemma 4 writes
        # '\n\n<|image|>\n\n'), which the template's trim of the text would eat at its ends; `expand` puts the
        # whole marker's tokens back
        self.placed = self.marker.strip()
        self.placed_ids = tokenizer(self.placed, add_special_tokens=False)["input_ids"]
        if self.image_token_id not in self.marker_ids and self.processor is None:
            raise DataError(f"The chat template writes {self.marker!r} for an image, which holds no image token "
                            f"(id {self.image_token_id}) of the model. Fix: use the model's own chat template "
                            "(data.chat_template).")
        self.video_token_id = getattr(config, "video_token_id", None)
        self.video_marker, self.video_marker_ids, self.video_refusal = self._video_marker(config, template)
        self.video_placed = self.video_marker.strip() if self.video_marker else None  # as `placed` for images
        self.video_placed_ids = (tokenizer(self.video_placed, add_special_tokens=False)["input_ids"]
                                 if self.video_placed else [])
        self.videos = VideoPatches(self.image_processor, folder) if self.video_marker else None

    def _video_marker(self, config: Any, template: str) -> tuple[str | None, list[int], str]:
        """What the template writes for a video, its tokens, and why videos are refused where they are."""
        family = config.model_type
        if family not in VIDEO_FAMILIES:
            why = ("its video tokens carry a timestamp per frame group, which is not built here"
                   if family.startswith("qwen3") else "its video tokens are not built here")
            return None, [], ("the row has videos, and shardtune trains videos (as lists of frames) for Qwen2-VL "
                              f"and Qwen2.5-VL only (model types {', '.join(VIDEO_FAMILIES)}); {family} is refused "
                              f"({why})")
        try:
            marker = template_marker(self.tokenizer, template, "video")
        except DataError as e:
            return None, [], f"the row has videos, and {e}"
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
        if self.video_token_id not in ids:
            return None, [], (f"the row has videos, and the chat template writes {marker!r} for a video, which "
                              f"holds no video token (id {self.video_token_id}) of the model")
        return marker, ids, ""

    def expand(self, ids: list[int], labels: list[int], media: list[bytes], row: Row,
               weights: list[float] | None = None) -> WithImages:
        """Each image or video marker of a sample's tokens replaced by that picture's or video's tokens (the whole
        marker's, expanded), with no label (and weight 0). A sample cut from the conversation
        (thinking_history=per_turn) holds the first ones only: they are returned."""
        places = sorted([(at, False) for at in _find(ids, self.placed_ids)]
                        + ([(at, True) for at in _find(ids, self.video_placed_ids)] if self.video_marker else []))
        if len(places) > len(media):
            raise row_error(row.path, row.index, None,
                            f"the rendered chat holds {len(places)} image or video markers ({self.marker!r}, "
                            f"{self.video_marker!r}) for {len(media)} images and videos (a message text writes the "
                            "marker itself)", "write images and videos as <image>/<video> placeholders or parts, "
                            "not as the template's tokens")
        out_ids, out_labels, out_weights, at = [], [], [], 0
        for (start, video), blob in zip(places, media):
            if video != is_video(blob):
                raise row_error(row.path, row.index, None, "the rendered chat's image and video markers are not "
                                "in the order of the row's images and videos (a message text writes a marker "
                                "itself)", "write images and videos as <image>/<video> placeholders or parts")
            out_ids += ids[at:start]
            out_labels += labels[at:start]
            tokens = self.video_tokens(blob) if video else self.image_tokens(blob)
            out_ids += tokens
            out_labels += [IGNORE_INDEX] * len(tokens)
            if weights is not None:
                out_weights += weights[at:start] + [0.0] * len(tokens)
            at = start + len(self.video_placed_ids if video else self.placed_ids)
        return WithImages(out_ids + ids[at:], out_labels + labels[at:], tuple(media[: len(places)]),
                          None if weights is None else out_weights + weights[at:])

    def video_tokens(self, video: bytes) -> list[int]:
        """The tokens one packed video becomes in place of its marker: grid tokens / merge_size^2 video tokens."""
        k = self.video_marker_ids.index(self.video_token_id)
        n = self.videos.tokens(video)
        return self.video_marker_ids[:k] + [self.video_token_id] * n + self.video_marker_ids[k + 1:]

    def image_tokens(self, image: bytes) -> list[int]:
        """The tokens one image becomes in place of the marker."""
        picture = decode(image)
        if self.processor is not None:
            # no special tokens: a tokenizer that adds <bos> to every text (Gemma's) would put one in each image
            out = self.processor(text=[self.marker], images=[picture], add_special_tokens=False)
            return list(out["input_ids"][0])
        out = self.image_processor(images=[picture], return_tensors="pt")
        if "image_grid_thw" in out:  # Qwen-VL: the patch grid, merged merge_size x merge_size per token
            n = int(out["image_grid_thw"][0].prod()) // int(getattr(self.image_processor, "merge_size", 1)) ** 2
        elif "num_soft_tokens_per_image" in out:  # Gemma 4: the pooled patches
            n = int(out["num_soft_tokens_per_image"][0])
        else:
            raise DataError(f"The processor of {self.folder} cannot be loaded and its image processor "
                            f"({type(self.image_processor).__name__}) reports no patch grid to count image tokens "
                            "by. Fix: install what the processor needs (e.g. torchvision).")
        k = self.marker_ids.index(self.image_token_id)
        return self.marker_ids[:k] + self._wrapped([self.image_token_id] * n) + self.marker_ids[k + 1:]

    def _wrapped(self, tokens: list[int]) -> list[int]:
        """An image's tokens as its processor writes them in place of the image token: between the tokenizer's
        begin/end-of-image tokens where it names them and the template's marker does not write them (Gemma 4's
        processor: <|image> + image tokens + <image|>); as they are otherwise (Qwen-VL's marker holds its own)."""
        ends = [getattr(self.tokenizer, name, None) for name in ("boi_token_id", "eoi_token_id")]
        if None in ends or any(t in self.marker_ids for t in ends):
            return tokens
        return [ends[0]] + tokens + [ends[1]]



def media_audit(samples: list[WithImages], vision: ImageProcessing) -> dict[str, int]:
    """The pictures and videos of a row's samples, their tokens, and how many of those are trained (none)."""
    out = {}
    for kind, token in (("image", vision.image_token_id), ("video", vision.video_token_id)):
        out[kind + "s"] = sum((kind == "video") == is_video(b) for s in samples for b in s.images)
        out[kind + "_tokens"] = sum(s.input_ids.count(token) for s in samples) if token is not None else 0
        out[f"trained_{kind}_tokens"] = sum(t == token and lab != IGNORE_INDEX
                                            for s in samples for t, lab in zip(s.input_ids, s.labels))
    if not out["videos"]:  # a row without videos keeps the picture-only audit it had
        out = {k: v for k, v in out.items() if "video" not in k}
    return out


def _image_token_id(config: Any, tokenizer: Any) -> int:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise DataError(f"{type(config).__name__} names no image token (image_token_id). Fix: a vision-language model "
                    "folder whose config.json sets image_token_id.")


def template_marker(tokenizer: Any, template: str, kind: str = "image") -> str:
    """What the chat template writes for one image (or video) part of a user message."""
    before, after = _PROBE
    messages = [{"role": "user", "content": [{"type": "text", "text": before}, {"type": kind},
                                             {"type": "text", "text": after}]},
                {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    except Exception as e:
        raise DataError(f"The chat template cannot render an {kind} part ({type(e).__name__}: {e}). Fix: use the "
                        "model's own multimodal chat template (data.chat_template).") from None
    if before not in text or after not in text:
        raise DataError("The chat template does not write the text parts of a message's content list, so it cannot "
                        f"place {kind}s. Fix: use the model's own multimodal chat template (data.chat_template).")
    marker = text.split(before, 1)[1].split(after, 1)[0]
    if not marker.strip():
        raise DataError(f"The chat template writes nothing for an {kind} part. Fix: use the model's own multimodal "
                        "chat template (data.chat_template).")
    return marker


def _find(ids: list[int], pattern: list[int]) -> list[int]:
    n, out, i = len(pattern), [], 0
    while i + n <= len(ids):
        if ids[i:i + n] == pattern:
            out.append(i)
            i += n
        else:
            i += 1
    return out


def processor_folder(tokenizer: Any) -> str | None:
    """The tokenizer's folder when it holds an image processor."""
    folder = getattr(tokenizer, "name_or_path", "") or ""
    return folder if folder and has_image_processor(folder) else None


def fingerprint(tokenizer: Any) -> str:
    """The image and processor settings (they decide the image token counts), for cache keys; '' without them."""
    folder = processor_folder(tokenizer)
    if folder is None:
        return ""
    files = [Path(folder) / name for name in PROCESSOR_FILES if (Path(folder) / name).is_file()]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


class Pixels:
    """Encoded pictures -> the image processor's tensors (what the vision tower takes): one image at a time,
    concatenated along dim 0 (flattened patches and patch grids for Qwen-VL, one picture per row for others)."""

    def __init__(self, folder: str):
        from transformers import AutoImageProcessor

        self.folder = folder
        self.image_processor = AutoImageProcessor.from_pretrained(folder)
        self._videos: VideoPatches | None = None  # made at the first video (only Qwen-VL's processors have them)

    @property
    def videos(self) -> VideoPatches:
        if self._videos is None:
            self._videos = VideoPatches(self.image_processor, self.folder)
        return self._videos

    def __call__(self, media: list[bytes]) -> dict[str, torch.Tensor]:
        """The tensors of the pictures, then of the videos (pixel_values_videos, video_grid_thw, ...), each kind
        in sequence order."""
        parts = [self.image_processor(images=[decode(b)], return_tensors="pt") for b in media if not is_video(b)]
        out = {k: torch.cat([p[k] for p in parts]) for k in (parts[0].keys() if parts else ())
               if isinstance(parts[0][k], torch.Tensor)}
        videos = [b for b in media if is_video(b)]
        return {**out, **video_tensors(self.videos, videos)} if videos else out


def pixels_for(tokenizer: Any) -> Pixels | None:
    """The pixel tensors of the tokenizer's model folder, or None for a text model."""
    folder = processor_folder(tokenizer)
    return None if folder is None else Pixels(folder)


@lru_cache(maxsize=4)
def _load(folder: str, tokenizer_id: int, template: str, tokenizer: Any) -> ImageProcessing:
    return ImageProcessing(folder, tokenizer, template)


def image_processing(tokenizer: Any, template: str) -> ImageProcessing | None:
    """The image processing of the tokenizer's model folder (loaded once per process), or None for a text model."""
    folder = processor_folder(tokenizer)
    if folder is None:
        return None
    return _load(os.path.abspath(folder), id(tokenizer), template, tokenizer)
