"""verl's `model.lora.*` group (verl 0.9) -> shardtune's LoRA keys.

The group is Megatron-Bridge's PEFT settings: its module names are Megatron's (`linear_qkv`, `linear_fc1`,
...), and verl's FSDP engine reads only the flat keys (`model.lora_rank`, `model.lora_alpha`,
`model.target_modules`), so on verl's FSDP engine a line that sets only `model.lora.rank` trains every
weight. A line that turns the group on asks for an adapter, and shardtune trains that adapter (peft),
with the module names translated to the Hugging Face ones, and says so in a note. vlm_lora's freeze keys
(the vision tower and projector frozen) are shardtune's model.freeze_vision_* keys.
"""

from __future__ import annotations

from typing import Any

# Megatron-Core module names -> the Hugging Face (Llama-family) modules they fuse
MEGATRON_MODULES = {
    "linear_qkv": ["q_proj", "k_proj", "v_proj"], "linear_q": ["q_proj"], "linear_k": ["k_proj"],
    "linear_v": ["v_proj"], "linear_proj": ["o_proj"], "linear_fc1": ["gate_proj", "up_proj"],
    "linear_fc1_gate": ["gate_proj"], "linear_fc1_up": ["up_proj"], "linear_fc2": ["down_proj"],
}
TYPES = ("lora", "vlm_lora", "canonical_lora", "dora")
# keys that change nothing trained by SFT, and why
IGNORED = {
    "merge": "it decides how a rollout engine receives the adapter (merged or separate); SFT has no rollout",
    "a2a_experimental": "a Megatron communication option",
}


def hf_modules(key: str, names: Any, ctx: Any) -> list[str] | None:
    """Megatron module names (or Hugging Face ones, kept) -> Hugging Face names; None after a refusal."""
    out: list[str] = []
    for name in [names] if isinstance(names, str) else list(names or []):
        if name in MEGATRON_MODULES:
            out += [m for m in MEGATRON_MODULES[name] if m not in out]
        elif "*" in name or name.startswith("linear_") or name == "router":
            ctx.refuse(f"{key}={name!r}", "a Megatron module name or pattern with no Hugging Face module shardtune "
                                          f"knows for it (it knows {', '.join(MEGATRON_MODULES)}); closest shardtune "
                                          "setting: model.target_modules with the model's own names, e.g. q_proj")
            return None
        elif name not in out:
            out.append(name)
    return out


def group(key: str, value: Any, ctx: Any) -> None:
    """The whole `model.lora` mapping: off (rank 0) unless the line sets a rank; then every key counts."""
    lora = dict(value or {})
    touched = sorted(k for k in lora if ctx.is_set(f"{key}.{k}"))
    if not lora.get("rank"):
        if [k for k in touched if k != "rank"]:
            ctx.warn(f"{key}.{touched[0]}", "model.lora.rank is 0, so the LoRA group is off (LoRA on FSDP2 also "
                                            "comes from model.lora_rank)")
        return
    if lora.get("type") not in TYPES:
        ctx.refuse(f"{key}.type={lora.get('type')!r}", f"one of {', '.join(TYPES)}")
        return
    _checks(key, lora, ctx)
    targets = hf_modules(f"{key}.target_modules", lora.get("target_modules"), ctx)
    excluded = hf_modules(f"{key}.exclude_modules", lora.get("exclude_modules"), ctx)
    # the line turned the group on with its rank: each of its values counts as set by the line (a conflict
    # with a flat key names the group key, or the rank where the group's default is the value)
    for name, target, v in (("rank", "model.lora_rank", lora["rank"]), ("alpha", "model.lora_alpha", lora.get("alpha")),
                            ("dropout", "model.lora_dropout", lora.get("dropout")),
                            ("target_modules", "model.target_modules", targets),
                            ("exclude_modules", "model.exclude_modules", excluded or None),
                            ("adapter_path", "model.lora_adapter_path", lora.get("adapter_path")),
                            ("type", "model.use_dora", lora.get("type") == "dora")):
        ctx.assign(target, v, f"{key}.{name}" if name in touched else f"{key}.rank")
    ctx.note(key, f"rank {lora['rank']}, type {lora['type']}: verl reads this group on its Megatron engine (its FSDP "
                  "engine reads model.lora_rank); shardtune trains the adapter it describes with peft, on the Hugging "
                  f"Face modules {', '.join(targets or [])}; lora_A starts as peft initialises it (Kaiming-uniform, "
                  "where Megatron draws Xavier); lora_B starts at zero in both, so training starts from the "
                  "unchanged model")
    for k, why in IGNORED.items():
        if k in touched:
            ctx.warn(f"{key}.{k}", why)


def _checks(key: str, lora: dict[str, Any], ctx: Any) -> None:
    if lora.get("dropout_position", "pre") != "pre":
        ctx.refuse(f"{key}.dropout_position={lora['dropout_position']!r}",
                   "peft applies LoRA dropout to the adapter's input ('pre'); closest: model.lora.dropout_position=pre")
    if lora.get("lora_B_init_method", "zero") != "zero":
        ctx.refuse(f"{key}.lora_B_init_method={lora['lora_B_init_method']!r}",
                   "peft starts lora_B at zero, so the adapted model starts as the base model; closest: zero")
    if lora.get("dtype") is not None:
        ctx.refuse(f"{key}.dtype={lora['dtype']!r}", "the adapter's weights take the model's dtype; closest "
                                                     "shardtune setting: model.dtype")
    if lora.get("type") == "vlm_lora":
        _freeze(key, lora, ctx)


def _freeze(key: str, lora: dict[str, Any], ctx: Any) -> None:
    """vlm_lora's freeze keys: the base language model frozen beside its adapters (shardtune's LoRA), and the
    vision tower / projector frozen (shardtune's model.freeze_vision_* keys). An unfrozen part would train its
    full weights beside the adapters; shardtune's LoRA puts adapters on unfrozen vision parts instead."""
    if not lora.get("freeze_language_model", True):
        ctx.refuse(f"{key}.freeze_language_model=False", "LoRA adapters with a trainable base language model are "
                                                         "not supported (the base weights stay frozen); closest: "
                                                         "model.lora.rank=0 (full fine-tuning)")
    for part in ("freeze_vision_model", "freeze_vision_projection"):
        if lora.get(part, True):
            ctx.assign(f"model.{part}", True, f"{key}.{part}")
        else:
            ctx.refuse(f"{key}.{part}=False", "vlm_lora then trains that part's full weights beside the adapters; "
                                              "shardtune's LoRA puts adapters on the unfrozen vision parts instead; "
                                              f"closest shardtune setting: model.{part}=false (adapters there too)")
