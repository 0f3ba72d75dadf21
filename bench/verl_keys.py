"""Every key of verl's composed SFT configs as shardtune vendors them (shardtune/verl/configs.py), with how
shardtune's table handles it: the list docs/migrating-from-verl.md carries (a test checks that it names each).

    python bench/verl_keys.py > /tmp/keys.md
"""

from __future__ import annotations

from shardtune.verl.configs import composed_keys
from shardtune.verl.rules import Custom, Map, Refuse, Warn
from shardtune.verl.translate import ENGINE, LEGACY, Spec, rule_for


def handling(key: str, spec: Spec) -> str:
    rule = rule_for(key, spec)
    if isinstance(rule, Map):
        return f"`{rule.target}`"
    return {Warn: "ignored (warning)", Refuse: "refused unless verl's default", Custom: "rule"}.get(type(rule), "?")


def main() -> None:
    for spec in (LEGACY, ENGINE):
        tree = spec.trainer.compose(spec.trainer.defaults)
        keys = composed_keys(tree)
        print(f"\n#### `{spec.trainer.name}` ({spec.trainer.yaml} composed: {len(keys)} keys)\n")
        sections: dict[str, list[str]] = {}
        for key in keys:
            sections.setdefault(key.split(".")[0] if "." in key else "(top level)", []).append(key)
        for section, names in sections.items():
            print(f"* {section}: " + ", ".join(f"`{k}` ({handling(k, spec)})" for k in names))


if __name__ == "__main__":
    main()
