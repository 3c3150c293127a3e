"""Components with settings as users write them in one string: "atpt[aggregator=reliability]".

Used for adapter variants (`--adapters "atpt,atpt[views=32]"`) and attacks
(`--attacks "pgd[steps=20],square"`); values read as JSON where they parse.
"""

from __future__ import annotations

import json
from typing import Dict, List, Tuple


def split_top_level(text: str, separator: str = ",") -> List[str]:
    """`text` split at `separator`s outside brackets: "a,b[x=1,y=[2,3]]" -> ["a", "b[x=1,y=[2,3]]"]."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if depth < 0:
            raise ValueError(f"unbalanced brackets in {text!r}")
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"unbalanced brackets in {text!r}")
    return parts + [current]


def parse_setting(pair: str, where: str) -> Tuple[str, object]:
    """ "key=value" with the value read as JSON where it parses (numbers, true, [0.5, 1.0]), else a string."""
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{where} takes KEY=VALUE, got {pair!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value.strip()


def parse_named_settings(spec: str, what: str = "adapter") -> Tuple[str, Dict[str, object]]:
    """ "atpt[aggregator=reliability,views=32]" -> ("atpt", {"aggregator": "reliability", "views": 32})."""
    spec = spec.strip()
    name, bracket, rest = spec.partition("[")
    if not bracket:
        return name, {}
    if not rest.endswith("]") or not name.strip():
        raise ValueError(f"{what} variant {spec!r} must read NAME[KEY=VALUE,...]")
    pairs = [p for p in split_top_level(rest[:-1]) if p.strip()]
    if not pairs:
        raise ValueError(f"{what} variant {spec!r} has empty brackets; drop them or add KEY=VALUE settings")
    return name.strip(), dict(parse_setting(pair, f"{what} variant {spec!r}") for pair in pairs)
