"""Vision-language models in training: which parts train, and what a micro-batch with pictures adds to the
model's inputs.

- Parts: the vision tower (patch embedding and blocks), the projector into the language model (Qwen's merger,
  Gemma's multi-modal projector) and the language model; model.freeze_vision_model / freeze_vision_projection /
  freeze_language_model say which get no gradient (the tower and projector are frozen by default).
- Inputs: the image processor's tensors (pixel_values, image_grid_thw, ...; for videos pixel_values_videos,
  video_grid_thw and Qwen2.5-VL's second_per_grid_ts) and which tokens are image (1) or video (2) tokens
  (`mm_token_type_ids`). Qwen-VL's 3-D rope positions ("mrope") are computed per sequence by the model's own
  `get_rope_index` and concatenated for a packed row, with the plain positions (restarting per sequence) as the
  first of four rows, which is how transformers takes packed mrope positions; padded rows let the model compute
  them itself from the attention mask.
- Gemma 3 attends both ways among the tokens of one picture (and Gemma 4 on its sliding-window layers): the model
  is given `token_type_ids` (its padded rows then get transformers' own mask), and packed rows give the
  per-sequence kernel each token's picture (`image_blocks`, attention.py), so a picture's tokens see each other
  while the sequences of the row stay apart.
- Every rank runs the vision tower once in every micro-batch: FSDP2 gathers the tower's blocks when they run, so
  a rank whose micro-batch has no picture runs it on one blank picture (its features times zero join the input
  embeddings) while another rank runs it on real ones; otherwise the ranks' collectives would not pair up. A
  family that trains videos runs the tower once for pictures and once for videos: the ranks share (one small
  all-reduce) which kinds any of them has, and each runs a blank for a kind it lacks.
- Ulysses sequence parallelism: the micro-batch keeps the whole row's tokens (`full_input_ids`); the model embeds
  the whole row and places the pictures' features, and a pre-hook on the language model hands it this rank's part
  of the embeddings and positions (and of Qwen3-VL's deepstack features); attention gathers the row as for text.
"""

from __future__ import annotations

import inspect
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shardtune.batch import MicroBatch
from shardtune.errors import ConfigError

# module-name pieces of the vision tower and of its projector, as the families name them
TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("merger", "deepstack_merger_list", "multi_modal_projector", "mm_projector", "projector",
                   "embed_vision")


def is_vision_config(hf_config: Any) -> bool:
    return getattr(hf_config, "vision_config", None) is not None


def part_of(name: str) -> str:
    """'projector', 'tower' or 'language' for a parameter name of a vision-language model."""
    pieces = name.split(".")
    if any(p in PROJECTOR_NAMES for p in pieces):
        return "projector"
    if any(p in TOWER_NAMES for p in pieces):
        return "tower"
    return "language"


def freeze(model: torch.nn.Module, cfg: Any) -> None:
    """Turn off the gradients of the parts the config freezes (a frozen part is not given to the optimizer)."""
    frozen = {"tower": cfg.freeze_vision_model, "projector": cfg.freeze_vision_projection,
              "language": cfg.freeze_language_model}
    for name, p in model.named_parameters():
        if frozen[part_of(name)]:
            p.requires_grad_(False)


def lora_exclude(cfg: Any) -> str | None:
    """A peft exclude_modules pattern keeping LoRA off the frozen vision parts (None: nothing to exclude)."""
    names = (TOWER_NAMES if cfg.freeze_vision_model else ()) + (PROJECTOR_NAMES if cfg.freeze_vision_projection else ())
    return rf".*\b({'|'.join(names)})\b.*" if names else None


def attention_per_part(hf_config: Any, text_attention: str) -> str | dict[str, str]:
    """The attention of each sub-model: the chosen kernel for the language model, plain sdpa for the vision
    tower (bidirectional within each picture; its tokens are not packed rows nor split over ranks)."""
    if not is_vision_config(hf_config):
        return text_attention
    return {key: ("sdpa" if "vision" in key else text_attention) for key in hf_config.sub_configs}


class VisionInputsBuilder:
    """What a vision-language model takes beside input_ids for one micro-batch."""

    def __init__(self, model: torch.nn.Module, blank: dict[str, torch.Tensor] | None = None, sp_rank: int = 0,
                 blank_video: dict[str, torch.Tensor] | None = None):
        """`blank`: the image processor's tensors of a blank picture, run through the tower by a micro-batch
        without pictures (needed only when several ranks run FSDP2); `blank_video` the same for a family that
        trains videos (a micro-batch may then run the tower twice, once for its pictures and once for its
        videos)."""
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = self.base.config
        self.image_token_id = getattr(config, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(config, "image_token_index", None)
        self.video_token_id = getattr(config, "video_token_id", None)
        self.rope = next((m for m in self.base.modules() if hasattr(m, "get_rope_index")), None)
        self.takes = set(inspect.signature(self.base.forward).parameters)
        self.type_key = next((k for k in ("mm_token_type_ids", "token_type_ids") if k in self.takes), None)
        self.image_attention = bidirectional_images(config)
        # the image processor's tensors the model takes (not e.g. Gemma 3's `num_crops`, which its processor drops)
        blank = None if blank is None else {k: v for k, v in blank.items() if k in self.takes}
        self.blank = blank
        self.blank_video = blank_video
        self.sp_rank = sp_rank
        self._pending_blank: list[tuple[str, dict[str, torch.Tensor]]] = []  # (tower call, its blank tensors)
        self._part: slice | None = None  # this rank's part of the whole row (sequence parallelism with pictures)
        self.base.get_decoder().register_forward_pre_hook(self._before_language_model, with_kwargs=True)

    def inputs(self, mb: MicroBatch, to_device: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        """The vision keyword arguments (and mrope position_ids for packed rows) of one micro-batch."""
        self._part = None
        self._pending_blank = [(call, {k: to_device(v) for k, v in blank.items()})
                               for call, blank in self._blank_runs(mb, to_device)]
        if mb.vision is None:
            return {}
        if self.rope is None and self.image_attention is None:
            raise ConfigError(
                f"{type(self.base).__name__} is given pictures, and shardtune trains pictures for the Qwen-VL families "
                "(their 3-D rope positions are computed per packed sequence) and Gemma 3/4 (their bidirectional "
                "image attention is kept per packed sequence); this family's image attention is not proven here. "
                "Fix: train a Qwen-VL, Gemma 3 or Gemma 4 (use_bidirectional_attention: vision) checkpoint, or "
                "drop the pictures (data.image_key).")
        ids = mb.full_input_ids if mb.full_input_ids is not None else mb.input_ids
        out: dict[str, Any] = {k: to_device(v) for k, v in mb.vision.tensors.items() if k in self.takes}
        if mb.full_input_ids is not None:  # the whole row goes in; the language model gets this rank's part
            width = mb.input_ids.shape[1]
            self._part = slice(self.sp_rank * width, (self.sp_rank + 1) * width)
            out["input_ids"] = to_device(ids)
        types = (ids == self.image_token_id).int()
        if self.video_token_id is not None:  # transformers' token types: text 0, image 1, video 2
            types = types + 2 * (ids == self.video_token_id).int()
        if self.type_key is not None:
            out[self.type_key] = to_device(types)
        if self.image_attention is not None:  # read by the per-sequence kernel; other kernels ignore it
            out["image_blocks"] = to_device(image_blocks(types))
            out["image_blocks_on"] = self.image_attention
        if self.rope is not None:
            # packed rows: per-sequence 3-D positions; padded rows: the model computes them from the mask
            out["position_ids"] = to_device(self.packed_positions(mb, ids)) if mb.cu_seqlens is not None else None
        elif mb.full_input_ids is not None:  # the whole row's positions; the language model gets this rank's part
            out["position_ids"] = to_device(_plain_positions(mb, ids.shape[1]))
        return out

    def packed_positions(self, mb: MicroBatch, ids: torch.Tensor) -> torch.Tensor:
        """[4, 1, T]: the plain positions, then the 3-D rope positions of each sequence, concatenated."""
        tensors, vision = mb.vision.tensors, mb.vision
        videos = vision.videos_per_sequence or [0] * len(mb.seq_lengths)
        rows, at, first, first_video = [], 0, 0, 0
        for n, k, v in zip(mb.seq_lengths, vision.images_per_sequence, videos):
            seq = ids[:, at:at + n]
            types = (seq == self.image_token_id).int()
            if self.video_token_id is not None:
                types = types + 2 * (seq == self.video_token_id).int()
            # only what the sequence has: not every family's get_rope_index takes second_per_grid_ts
            per_video = {key: tensors[key][first_video:first_video + v] for key in ("video_grid_thw",
                                                                                 "second_per_grid_ts")
                         if v and key in tensors and key in self.takes}
            pos, _ = self.rope.get_rope_index(seq, types, image_grid_thw=tensors["image_grid_thw"][first:first + k]
                                              if k else None, **per_video)
            rows.append(pos)
            at, first, first_video = at + n, first + k, first_video + v
        if at < ids.shape[1]:  # padding after the sequences (sequence parallelism): plain positions
            rows.append(torch.arange(ids.shape[1] - at).view(1, 1, -1).expand(3, 1, -1))
        plain = mb.position_ids if mb.full_input_ids is None else _plain_positions(mb, ids.shape[1])
        return torch.cat([plain[None], torch.cat(rows, dim=2)], dim=0)

    def _blank_runs(self, mb: MicroBatch, to_device: Callable[[torch.Tensor], torch.Tensor]
                    ) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """The blank tower runs that make this rank run the tower as often as every other rank (their FSDP2
        collectives pair up): a picture family runs it once per micro-batch; a video family runs it for
        pictures where any rank has pictures (or none has anything) and for videos where any rank has videos,
        which the ranks tell each other in one small all-reduce."""
        if self.blank is None:
            return []
        tensors = mb.vision.tensors if mb.vision is not None else {}
        here = ["pixel_values" in tensors, "pixel_values_videos" in tensors]
        if self.blank_video is None:
            return [] if any(here) else [("get_image_features", self.blank)]
        flags = to_device(torch.tensor(here, dtype=torch.int32))
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        images, videos = (bool(x) for x in flags.tolist())
        return ([("get_image_features", self.blank)] if (images or not videos) and not here[0] else []) + (
            [("get_video_features", self.blank_video)] if videos and not here[1] else [])

    def _before_language_model(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._part is not None:
            kwargs = _split_for_rank(kwargs, self._part)
        blanks, self._pending_blank = self._pending_blank, []
        if kwargs.get("inputs_embeds") is not None:
            for call, blank in blanks:
                kwargs = self._with_blank_run(kwargs, call, blank)
        return args, kwargs

    def _with_blank_run(self, kwargs: dict, call: str, blank: dict[str, torch.Tensor]) -> dict:
        """For a micro-batch without pictures (or videos): the vision tower on the blank picture (or video), its
        features times zero added to the input embeddings (so its gradients are zeros, not missing)."""
        features = getattr(self.base, call)(**blank)
        zero = sum(t.float().sum() for t in _tensors(features)) * 0.0
        return {**kwargs, "inputs_embeds": kwargs["inputs_embeds"] + zero.to(kwargs["inputs_embeds"].dtype)}


def bidirectional_images(hf_config: Any) -> str | None:
    """Where a family attends both ways among one picture's tokens: 'all' layers (Gemma 3), the 'sliding'
    window layers (Gemma 4 with use_bidirectional_attention='vision'), or None (causal, e.g. Qwen-VL)."""
    if hf_config.model_type == "gemma3":
        return "all"
    text = hf_config.get_text_config()
    if hf_config.model_type.startswith("gemma4") and getattr(text, "use_bidirectional_attention", None) == "vision":
        return "sliding"
    return None


def image_blocks(types: torch.Tensor) -> torch.Tensor:
    """[B, T] image-token flags -> the index of each token's picture in its row (-1 for text), numbered as
    transformers numbers them for Gemma's mask: a new picture at every run of image tokens."""
    is_image = types.bool()
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


def _split_for_rank(kwargs: dict, part: slice) -> dict:
    """The language model's inputs for this rank's part of the row: embeddings and positions, Gemma 4's
    per-layer inputs (made from the whole row's tokens), and Qwen3-VL's deepstack features of the image tokens
    that fall in the part."""
    out = dict(kwargs)
    out["inputs_embeds"] = kwargs["inputs_embeds"][:, part]
    out["position_ids"] = kwargs["position_ids"][..., part]
    if kwargs.get("per_layer_inputs") is not None:  # [B, T, layers, width]
        out["per_layer_inputs"] = kwargs["per_layer_inputs"][:, part]
    mask = kwargs.get("visual_pos_masks")
    if mask is not None:
        out["visual_pos_masks"] = mask[:, part]
        places = mask.flatten().nonzero().flatten()
        keep = (places >= part.start) & (places < part.stop)
        if kwargs.get("deepstack_visual_embeds") is not None:
            out["deepstack_visual_embeds"] = [e[keep] for e in kwargs["deepstack_visual_embeds"]]
    return out


def _plain_positions(mb: MicroBatch, total: int) -> torch.Tensor:
    """[1, total]: positions restarting at every sequence of the whole (unsplit) row."""
    pos = [torch.arange(n) for n in mb.seq_lengths]
    rest = total - sum(mb.seq_lengths)
    return torch.cat(pos + ([torch.arange(rest)] if rest else []))[None]


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return _tensors(x.to_tuple()) if hasattr(x, "to_tuple") else []


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def copy_processor_files(src: str | Path, dst: str | Path) -> None:
    """The image/video processor configs of a model folder, copied beside the weights written from it (so the
    folder serves and trains on pictures as the base model did)."""
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def has_image_processor(folder: str | Path) -> bool:
    """Whether a model folder holds an image processor: its own preprocessor_config.json, or inside the
    processor's processor_config.json (how transformers 5 saves a processor)."""
    folder = Path(folder)
    if (folder / "preprocessor_config.json").is_file():
        return True
    try:
        return "image_processor" in json.loads((folder / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False


def blank_video(folder: str, hf_config: Any) -> dict[str, torch.Tensor] | None:
    """What the video tower call takes for one black frame (None for a family that trains no videos)."""
    from transformers import AutoImageProcessor

    from shardtune.data import video
    from shardtune.data.media import pil_image

    if hf_config.model_type not in video.VIDEO_FAMILIES or not has_image_processor(folder):
        return None
    buf = io.BytesIO()
    pil_image().new("RGB", (32, 32)).save(buf, format="PNG")
    patches = video.VideoPatches(AutoImageProcessor.from_pretrained(folder), folder)
    out = video.video_tensors(patches, [video.pack([buf.getvalue()])])
    return {k: out[k] for k in ("pixel_values_videos", "video_grid_thw")}


def blank_picture(folder: str) -> dict[str, torch.Tensor] | None:
    """The tensors the model folder's image processor makes of one small black picture (None without one)."""
    from transformers import AutoImageProcessor

    from shardtune.data.media import pil_image

    if not has_image_processor(folder):
        return None
    Image = pil_image()
    out = AutoImageProcessor.from_pretrained(folder)(images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
