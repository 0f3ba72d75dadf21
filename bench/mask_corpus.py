"""Loss masks on a corpus of chat templates, checked independently of shardtune's method.

    python bench/mask_corpus.py [FOLDER ...] [-v]

Each corpus is a folder of `.jinja` templates (TRL's packaged templates are always measured first). Every
template gets the conversation shapes of tests/mask_checks.py (two turns; system + one turn; three turns;
thinking in history; a tool call, its result and the answer): a shape the template cannot render (it raises
or drops the tool call) counts as not applicable; otherwise shardtune's mask is "right" when the checker finds
no trained user/system/tool text, no trained role header (unless the template's generation markers say so),
every assistant content trained and every trained turn closed by an end-of-turn token or EOS; "wrong"
otherwise; "refused" when shardtune raises TemplateMismatch. `-v` prints each failing case. Where the
released templates of bench/RESULTS.md came from: bench/template_sources.md.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mask_checks import SHAPES, applicable, check_mask, tokenizer_for_template  # noqa: E402

from shardtune.data import tokenize_conversation  # noqa: E402
from shardtune.errors import TemplateMismatch  # noqa: E402


def measure(paths: list[Path], verbose: bool) -> tuple[Counter, set[str]]:
    counts, failing = Counter(), set()
    for path in paths:
        template = path.read_text()
        tok = tokenizer_for_template(template)
        for shape, (msgs, tools) in SHAPES.items():
            if applicable(tok, template, msgs, tools):
                counts["not_applicable"] += 1
                continue
            try:
                ids, labels = tokenize_conversation(msgs, tok, tools, chat_template=template)
            except TemplateMismatch as e:
                counts["refused"] += 1
                failing.add(path.stem)
                if verbose:
                    print(f"  {path.stem} / {shape}: refused: {str(e)[:200]}")
                continue
            problems = check_mask(tok, template, msgs, tools, ids, labels)
            counts["wrong" if problems else "right"] += 1
            if problems:
                failing.add(path.stem)
                if verbose:
                    print(f"  {path.stem} / {shape}: wrong: {problems[:2]}")
    return counts, failing


def main() -> None:
    import trl

    verbose = "-v" in sys.argv
    folders = [Path(trl.__file__).parent / "chat_templates"] + [Path(a) for a in sys.argv[1:] if a != "-v"]
    for folder in folders:
        paths = sorted(folder.glob("*.jinja"))
        counts, failing = measure(paths, verbose)
        print(f"{folder}: {len(paths)} templates: right {counts['right']}, wrong {counts['wrong']}, refused "
              f"{counts['refused']}, not applicable {counts['not_applicable']}; templates with a failing case: "
              f"{sorted(failing) or 'none'}")


if __name__ == "__main__":
    main()
