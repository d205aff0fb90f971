"""Reading a features directory (features.json + layer_{l:02d}.jsonl) as autointerp needs it.

Layer files can be large (every feature carries its example contexts), so features are
streamed line by line, and features a resumed run will skip are recognised from the first
few bytes of their line without parsing it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from clt_lens.errors import InputError, MissingFileError

MANIFEST_FILE = "features.json"
_PREFIX_RE = re.compile(rb'^\{\s*"layer"\s*:\s*(\d+)\s*,\s*"index"\s*:\s*(\d+)\s*[,}]')


def layer_file_name(layer: int) -> str:
    return f"layer_{layer:02d}.jsonl"


class FeaturesDir:
    """A validated features directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"features directory {str(self.path)!r} does not exist")
        mpath = self.path / MANIFEST_FILE
        if not mpath.is_file():
            raise MissingFileError(
                f"{str(mpath)!r} not found: is {str(self.path)!r} a directory written by "
                "'clt-lens features'?"
            )
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise InputError(f"{mpath}: expected a JSON object")
        if manifest.get("format_version") != 1:
            raise InputError(
                f"{mpath}: format_version {manifest.get('format_version')!r} is not supported "
                "(expected 1)"
            )
        for key in ("n_layers", "d_sae"):
            if not isinstance(manifest.get(key), int) or manifest[key] < 1:
                raise InputError(f"{mpath}: {key!r} must be a positive integer")
        self.manifest = manifest
        self.n_layers: int = manifest["n_layers"]
        self.d_sae: int = manifest["d_sae"]

    def layer_path(self, layer: int) -> Path:
        return self.path / layer_file_name(layer)

    def check_layers(self, layers: list[int]) -> None:
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise InputError(
                    f"layer {layer} is out of range: the features directory has "
                    f"n_layers={self.n_layers}"
                )
            p = self.layer_path(layer)
            if not p.is_file():
                raise MissingFileError(f"{str(p)!r} not found (layer {layer} of {self.path})")
            self._check_first_line(layer, p)

    def _check_first_line(self, layer: int, p: Path) -> None:
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if raw.strip():
                    check_feature(_parse(raw, p, lineno), layer, f"{p}:{lineno}")
                    return

    def iter_layer(
        self, layer: int, parse: Callable[[int], bool] = lambda index: True
    ) -> Iterator[tuple[int, dict | None]]:
        """(index, feature) for each feature of the layer in file order; feature is None
        (and the line is not parsed when its prefix names the index) if not ``parse(index)``."""
        p = self.layer_path(layer)
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                m = _PREFIX_RE.match(raw)
                if m and int(m.group(1)) == layer and not parse(int(m.group(2))):
                    yield int(m.group(2)), None
                    continue
                feature = _parse(raw, p, lineno)
                check_feature(feature, layer, f"{p}:{lineno}")
                idx = feature["index"]
                yield idx, (feature if parse(idx) else None)


def _parse(raw: bytes, p: Path, lineno: int) -> dict:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{lineno}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{p}:{lineno}: expected a JSON object per line")
    return obj


def check_feature(feature: dict, layer: int, where: str) -> None:
    if feature.get("layer") != layer:
        raise InputError(f"{where}: 'layer' is {feature.get('layer')!r}, expected {layer}")
    if not isinstance(feature.get("index"), int) or feature["index"] < 0:
        raise InputError(f"{where}: 'index' must be a non-negative integer")
    for key in ("max_act", "top_examples"):
        if key not in feature:
            raise InputError(f"{where}: feature lacks {key!r}")
    for key in ("top_examples", "quantile_examples", "negative_examples"):
        if not isinstance(feature.get(key, []), list):
            raise InputError(f"{where}: {key!r} must be a list")
