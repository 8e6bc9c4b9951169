"""Render a kustomization of ``deploy/``: ``kubectl kustomize`` when kubectl is installed, else the small subset of
Kustomize that ``deploy/`` uses, in Python (so ``make test`` needs no binary).

The subset: ``resources`` (YAML files, several documents each, and folders holding a kustomization), ``namespace``,
``labels`` (``pairs``, ``includeSelectors``), ``images`` (``name``, ``newName``, ``newTag`` on the ``containers``
of pod templates and Jobs). Anything else in a kustomization is refused, so a manifest that needs more is noticed
here, not rendered wrong; tests/deploy/test_manifests.py checks both renderers agree where kubectl exists.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "labels", "images"}
# where Kustomize writes selector labels (includeSelectors: true) for the kinds deploy/ has; templates get them too,
# and so do the label selectors of a pod template's topologySpreadConstraints
SELECTORS = {
    "Deployment": (("spec", "selector", "matchLabels"), ("spec", "template", "metadata", "labels")),
    "Service": (("spec", "selector"),),
    "PodDisruptionBudget": (("spec", "selector", "matchLabels"),),
    "Job": (("spec", "template", "metadata", "labels"),),
}


def render(folder: str | Path) -> list[dict]:
    """The objects of the kustomization in ``folder``, by kubectl when it is on PATH, else by :func:`render_python`."""
    if shutil.which("kubectl"):
        return render_kubectl(folder)
    return render_python(folder)


def render_kubectl(folder: str | Path) -> list[dict]:
    done = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise ValueError(f"kubectl kustomize {folder}: {done.stderr.strip()}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def render_python(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(spec) - KNOWN
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml: this renderer does not know {sorted(unknown)}")
    objects = []
    for entry in spec.get("resources", []):
        path = folder / entry
        if path.is_dir():
            objects += render_python(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for obj in objects:
        if "namespace" in spec:
            obj["metadata"]["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            _label(obj, label["pairs"], label.get("includeSelectors", False))
        for image in spec.get("images", []):
            _image(obj, image)
    return objects


def _at(obj: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        obj = obj.setdefault(key, {})
    return obj


def _label(obj: dict, pairs: dict, selectors: bool) -> None:
    _at(obj, ("metadata", "labels")).update(pairs)
    if selectors:
        for path in SELECTORS.get(obj["kind"], ()):
            _at(obj, path).update(pairs)
        for constraint in (_pod_spec(obj) or {}).get("topologySpreadConstraints", []):
            _at(constraint, ("labelSelector", "matchLabels")).update(pairs)


def _pod_spec(obj: dict) -> dict | None:
    return obj.get("spec", {}).get("template", {}).get("spec")


def _image(obj: dict, image: dict) -> None:
    pod = _pod_spec(obj)
    for container in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")
