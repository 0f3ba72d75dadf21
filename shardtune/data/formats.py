"""Row adapters: one raw row (a dict) -> a `Conversation`.

Formats: `messages` (OpenAI style), `prompt_response` (verl's single-turn layout, with nested dict keys),
`alpaca` (instruction/input/output) and `sharegpt` (conversations of from/value). `auto` picks the
format from the first row of each file. Every problem names the file, the row and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from shardtune.config import DataConfig
from shardtune.data.readers import Row
from shardtune.errors import row_error

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ALIASES = ("loss_mask", "trainable")  # other names datasets use for a message's `train` flag
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "model": "assistant", "bing": "assistant", "function_call": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool",
}


@dataclass
class Conversation:
    messages: list[dict[str, Any]]  # may carry a per-message `train: bool`
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def detect_format(row: Row, cfg: DataConfig) -> str:
    d = row.data
    if cfg.messages_key in d:
        first = next(iter(d[cfg.messages_key]), None) if isinstance(d[cfg.messages_key], list) else None
        if isinstance(first, dict) and "from" in first and "role" not in first:
            return "sharegpt"
        return "messages"
    if "conversations" in d and isinstance(d["conversations"], list):
        return "sharegpt"
    if "instruction" in d and "output" in d:
        return "alpaca"
    if cfg.prompt_key in d and cfg.response_key in d:
        return "prompt_response"
    raise row_error(
        row.path, row.index, None,
        f"cannot tell the row format from its keys {sorted(d)}",
        f"set data.format (messages|prompt_response|alpaca|sharegpt) and the matching keys "
        f"(data.messages_key='{cfg.messages_key}', data.prompt_key='{cfg.prompt_key}', "
        f"data.response_key='{cfg.response_key}')",
    )


def to_conversation(row: Row, fmt: str, cfg: DataConfig) -> Conversation:
    adapters = {"messages": _from_messages, "prompt_response": _from_prompt_response,
                "alpaca": _from_alpaca, "sharegpt": _from_sharegpt}
    conv = adapters[fmt](row, cfg)
    _check_messages(row, conv.messages, cfg.messages_key if fmt == "messages" else fmt)
    return conv


def _get(row: Row, key: str, fix: str) -> Any:
    if key not in row.data:
        raise row_error(row.path, row.index, key, f"the key is missing (the row has {sorted(row.data)})", fix)
    return row.data[key]


def _from_messages(row: Row, cfg: DataConfig) -> Conversation:
    key = cfg.messages_key
    raw = _get(row, key, f"set data.messages_key to the column that holds the chat (now '{key}')")
    if isinstance(raw, str):
        raw = _json_or_error(row, key, raw)
    if not isinstance(raw, list):
        raise row_error(row.path, row.index, key, f"expected a list of messages, got {type(raw).__name__}",
                        "store the conversation as a list of {role, content} objects")
    messages = [_clean_message(row, key, i, m, cfg.message_weight_key) for i, m in enumerate(raw)]
    tools = row.data.get(cfg.tools_key)
    if isinstance(tools, str):
        tools = _json_or_error(row, cfg.tools_key, tools)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise row_error(row.path, row.index, cfg.tools_key, "expected a list of tool (function schema) objects",
                        "store tools as a list of JSON schemas, or drop the column")
    kwargs = {}
    thinking = row.data.get(cfg.enable_thinking_key)
    if thinking is not None:
        if not isinstance(thinking, bool):
            raise row_error(row.path, row.index, cfg.enable_thinking_key,
                            f"expected true/false, got {thinking!r}", "store a boolean or drop the column")
        kwargs["enable_thinking"] = thinking
    return Conversation(messages, tools or None, kwargs)


def _clean_message(row: Row, key: str, i: int, m: Any, weight_key: str | None = None) -> dict[str, Any]:
    where = f"{key}[{i}]"
    if not isinstance(m, dict):
        raise row_error(row.path, row.index, where, f"expected a message object, got {type(m).__name__}",
                        "each message must be an object with 'role' and 'content'")
    # parquet gives every message every key of the column's struct type, missing ones as None
    m = {k: v for k, v in m.items() if v is not None}
    if "content" not in m:
        m["content"] = ""
    m.update(_weight_entry(row, f"{where}.{weight_key}", m, weight_key))
    for alias in TRAIN_ALIASES:  # verl's per-message `loss_mask` (0/1) and the common `trainable`
        if alias in m:
            value = m.pop(alias)
            if value not in (0, 1):  # True/False are 1/0
                raise row_error(row.path, row.index, f"{where}.{alias}", f"expected 0/1 or true/false, got {value!r}",
                                "use 1 (train this turn) or 0 (do not)")
            if "train" in m and m["train"] != bool(value):
                raise row_error(row.path, row.index, f"{where}.{alias}", f"disagrees with train={m['train']}",
                                "keep one of the two keys")
            m["train"] = bool(value)
    if "train" in m and not isinstance(m["train"], bool):
        raise row_error(row.path, row.index, f"{where}.train", f"expected true/false, got {m['train']!r}",
                        "use a boolean or drop the key")
    if "tool_calls" in m:
        calls = m["tool_calls"]
        if isinstance(calls, str):
            calls = _json_or_error(row, f"{where}.tool_calls", calls)
        if not isinstance(calls, list):
            raise row_error(row.path, row.index, f"{where}.tool_calls", f"expected a list of tool calls, got "
                            f"{type(calls).__name__}", "store [{type, function: {name, arguments}}, ...] (a one-call "
                            "list for a single call), or set data.on_bad_row=skip to drop such rows")
        m["tool_calls"] = [_clean_tool_call(row, f"{where}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
    return m


def _clean_tool_call(row: Row, where: str, call: Any) -> dict[str, Any]:
    if isinstance(call, str):
        call = _json_or_error(row, where, call)
    if not isinstance(call, dict):
        raise row_error(row.path, row.index, where, "expected a tool call object",
                        "use {type, function: {name, arguments}}")
    call = {k: v for k, v in call.items() if v is not None}
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str) and fn["arguments"].strip():
        # templates render `arguments | tojson`: a JSON string would come out double-encoded; one that is not
        # JSON at all (cut off, single quotes) would be trained as a broken call
        try:
            parsed = json.loads(fn["arguments"])
        except json.JSONDecodeError as e:
            raise row_error(row.path, row.index, f"{where}.function.arguments", f"the string is not valid JSON "
                            f"({e.msg} at character {e.pos})", "store the arguments as a JSON object (or a JSON "
                            "string of one), or set data.on_bad_row=skip to drop such rows") from None
        if isinstance(parsed, dict):
            call["function"] = {**fn, "arguments": parsed}
    return call


def message_weight(row: Row, where: str, value: Any) -> float:
    """A message's loss weight: a finite number >= 0 (not a boolean, not text)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        got = f"{type(value).__name__} {value!r}" if isinstance(value, (str, bool)) else repr(value)
        raise row_error(row.path, row.index, where, f"a message weight must be a finite number >= 0, got {got}",
                        "store a number such as 0.5 (1 = the default, 0 = no loss from the turn), drop the key to "
                        "weigh the turn 1, or set data.on_bad_row=skip to drop such rows")
    return float(value)


def _weight_entry(row: Row, where: str, data: dict[str, Any], key: str | None) -> dict[str, float]:
    """{key: the checked weight} when `data` (a message, a turn, or the row of a prompt/response or alpaca row,
    whose weight goes on its response) holds one; {} when it has none or weights are off."""
    if key is None or data.get(key) is None:
        return {}
    return {key: message_weight(row, where, data[key])}


def _json_or_error(row: Row, key: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise row_error(row.path, row.index, key, f"the string is not valid JSON ({e.msg})",
                        "store a list/object") from None


def _nested(row: Row, key: str, dict_keys: list[str], what: str) -> Any:
    value = _get(row, key, f"set data.{what}_key to the column that holds the {what}")
    path = key
    for k in dict_keys:
        path += f".{k}"
        if isinstance(value, list) and len(value) == 1:  # verl unwraps one-item lists, e.g. its RL `prompt` column
            value = value[0]
        if not isinstance(value, dict) or k not in value:
            have = sorted(value) if isinstance(value, dict) else type(value).__name__
            raise row_error(row.path, row.index, path, f"not found (have {have})",
                            f"check data.{what}_dict_keys")
        value = value[k]
    return value


def _from_prompt_response(row: Row, cfg: DataConfig) -> Conversation:
    prompt = _nested(row, cfg.prompt_key, cfg.prompt_dict_keys, "prompt")
    response = _nested(row, cfg.response_key, cfg.response_dict_keys, "response")
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if isinstance(prompt, list):  # a chat list as prompt, e.g. verl's RL-style `prompt` column
        messages += [_clean_message(row, cfg.prompt_key, i, m, cfg.message_weight_key) for i, m in enumerate(prompt)]
    elif isinstance(prompt, str):
        messages.append({"role": "user", "content": prompt})
    else:
        raise row_error(row.path, row.index, cfg.prompt_key, f"expected a string, got {type(prompt).__name__}",
                        "point data.prompt_key/prompt_dict_keys at a text field")
    if not isinstance(response, str):
        raise row_error(row.path, row.index, cfg.response_key, f"expected a string, got {type(response).__name__}",
                        "point data.response_key/response_dict_keys at a text field")
    weight = cfg.message_weight_key
    messages.append({"role": "assistant", "content": response, **_weight_entry(row, weight, row.data, weight)})
    return Conversation(messages)


def _from_alpaca(row: Row, cfg: DataConfig) -> Conversation:
    parts = {}
    for key in ("instruction", "input", "output", "system"):
        v = row.data.get(key)
        if v is not None and not isinstance(v, str):
            raise row_error(row.path, row.index, key, f"expected a string, got {type(v).__name__}", "store text")
        parts[key] = v or ""
    if not parts["output"]:
        raise row_error(row.path, row.index, "output", "empty or missing", "every alpaca row needs an output")
    user = parts["instruction"] + (f"\n\n{parts['input']}" if parts["input"] else "")
    system = parts["system"] or cfg.system_prompt
    messages = [{"role": "system", "content": system}] if system else []
    weight = cfg.message_weight_key
    messages += [{"role": "user", "content": user},
                 {"role": "assistant", "content": parts["output"], **_weight_entry(row, weight, row.data, weight)}]
    return Conversation(messages)


def _from_sharegpt(row: Row, cfg: DataConfig) -> Conversation:
    key = cfg.messages_key if cfg.messages_key in row.data else "conversations"
    raw = _get(row, key, "sharegpt rows keep turns under 'conversations' (or data.messages_key)")
    if not isinstance(raw, list):
        raise row_error(row.path, row.index, key, "expected a list of turns", "store [{from, value}, ...]")
    messages = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise row_error(row.path, row.index, f"{key}[{i}]", "expected an object with 'from' and 'value'",
                            "store sharegpt turns as {from, value}")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise row_error(row.path, row.index, f"{key}[{i}].from", f"unknown speaker {turn['from']!r}",
                            f"use one of {sorted(SHAREGPT_ROLES)}")
        weight = cfg.message_weight_key
        messages.append({"role": role, "content": turn["value"],
                         **_weight_entry(row, f"{key}[{i}].{weight}", turn, weight)})
    tools = row.data.get(cfg.tools_key)
    if isinstance(tools, str):
        tools = _json_or_error(row, cfg.tools_key, tools)
    return Conversation(messages, tools or None)


def _check_messages(row: Row, messages: list[dict[str, Any]], key: str) -> None:
    if not messages:
        raise row_error(row.path, row.index, key, "the conversation is empty", "drop the row or fill it")
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise row_error(row.path, row.index, f"{key}[{i}].role", f"unknown role {role!r}",
                            f"use one of {list(ROLES)}")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise row_error(row.path, row.index, f"{key}[{i}].content",
                            f"expected a string, got {type(content).__name__}", "store the text of the message")
        if m.get("train") and role != "assistant":
            raise row_error(row.path, row.index, f"{key}[{i}].train", f"train: true on a {role} message",
                            "only assistant turns can be trained")
    if not any(m["role"] == "assistant" for m in messages):
        raise row_error(row.path, row.index, key, "the conversation has no assistant turn, nothing to train",
                        "add an assistant reply, or set data.on_bad_row=skip to drop such rows")
