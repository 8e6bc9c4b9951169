"""The rule file of ``lumireg pacs``: which incoming series is registered onto which.

A JSON or TOML file with a list ``rules``; the first rule whose ``moving`` patterns all match a new series wins:

```json
{"rules": [{"name": "t1 follow-up",
            "moving": {"Modality": "MR", "SeriesDescription": "*T1*"},
            "fixed": "previous",
            "fixed_match": {"SeriesDescription": "*T1*"},
            "parameters": {"align": "affine"}}]}
```

- ``moving``: DICOM keyword -> shell pattern (``fnmatch``, case-insensitive) the new series must match.
- ``fixed``: ``"previous"``, the same patient's most recent series acquired before the new one (by Study Date /
  Time, then Series Date / Time) among those matching ``fixed_match`` (default: ``moving``'s patterns); or
  ``{"series": "<Series Instance UID>"}``, a reference series the PACS holds.
- ``parameters``: request parameters (:data:`lumireg.contract.PARAMETERS`) sent with the registration.

Series that lumireg wrote (Series Description starting ``lumireg``) and segmentations never match as moving.
"""

from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from lumireg.contract import request_parameters

OWN_PREFIX = "lumireg"
ORDER_KEYS = ("StudyDate", "StudyTime", "SeriesDate", "SeriesTime")


@dataclass(frozen=True)
class Rule:
    """One pairing rule (see the module's docstring)."""

    name: str
    moving: dict
    fixed_series: str | None = None  # None: the previous matching series
    fixed_match: dict = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)

    def matches(self, attributes: dict) -> bool:
        """True when ``attributes`` (keyword -> value) of a new series match ``moving`` and it is not ours."""
        return is_image(attributes) and _match(self.moving, attributes)

    def fixed_candidates(self, moving: dict, series: list[dict]) -> list[dict]:
        """The earlier series of ``series`` that may be the fixed image of ``moving``, most recent first."""
        patterns = self.fixed_match or self.moving
        key = order_key(moving)
        earlier = [
            s
            for s in series
            if s.get("SeriesInstanceUID") != moving.get("SeriesInstanceUID")
            and is_image(s)
            and _match(patterns, s)
            and order_key(s) < key
        ]
        return sorted(earlier, key=order_key, reverse=True)


def is_image(attributes: dict) -> bool:
    """Not a segmentation and not a series lumireg wrote."""
    description = str(attributes.get("SeriesDescription", "") or "")
    return attributes.get("Modality") != "SEG" and not description.lower().startswith(OWN_PREFIX)


def order_key(attributes: dict) -> tuple[str, ...]:
    """When a series was acquired, as sortable strings (Study Date, Study Time, Series Date, Series Time)."""
    return tuple(str(attributes.get(k, "") or "").ljust(6, "0") for k in ORDER_KEYS)


def _match(patterns: dict, attributes: dict) -> bool:
    return all(fnmatch.fnmatch(str(attributes.get(k, "") or "").lower(), str(p).lower()) for k, p in patterns.items())


def load_rules(path: str | Path) -> list[Rule]:
    """The rules of a ``.json`` or ``.toml`` file; ``ValueError`` naming the file and the rule for a bad one."""
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the rule file ({' '.join(str(exc).split())})") from exc
    entries = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list 'rules'")
    rules = []
    for n, entry in enumerate(entries):
        where = f"{path}: rule {n + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("moving", {}), dict):
            raise ValueError(f"{where}: a rule is an object with a 'moving' object of patterns")
        unknown = set(entry) - {"name", "moving", "fixed", "fixed_match", "parameters"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        fixed = entry.get("fixed", "previous")
        if fixed != "previous" and not (isinstance(fixed, dict) and isinstance(fixed.get("series"), str)):
            raise ValueError(f'{where}: \'fixed\' is "previous" or {{"series": "<Series Instance UID>"}}')
        parameters = entry.get("parameters", {})
        try:
            request_parameters(parameters)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        rules.append(
            Rule(
                name=str(entry.get("name", f"rule {n + 1}")),
                moving=dict(entry.get("moving", {})),
                fixed_series=None if fixed == "previous" else fixed["series"],
                fixed_match=dict(entry.get("fixed_match", {})),
                parameters=dict(parameters),
            )
        )
    return rules
