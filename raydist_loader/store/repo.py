"""Layer 2 (store): Which files of a Hugging Face repo are served: the weights, the engine files ``pull_files`` writes,
the rest skipped.

Real repos hold more than one copy of the weights: Mistral ships ``consolidated.safetensors`` beside the HF shards,
many ship ``pytorch_model*.bin``, ``*.pt``, ``*.gguf`` or an ``original/`` folder, and some carry large unrelated
files. ``publish`` (a local directory) and ``index`` (a prefix of a store) both select through :func:`select`:

* weights: the files ``model.safetensors.index.json`` names, else a lone ``model.safetensors``; nothing else is
  ever read as weights (vLLM makes the same choice);
* engine files (config, generation config, tokenizer, chat template, processor configs, remote code) recorded for
  ``pull_files``, each at most ``max_file_bytes``; these, the index and nothing else are read whole;
* everything else is skipped unread and reported (name, size, why) in the command's result.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

from ..connectors import Connector
from ..errors import ConfigError, NotFoundError
from .manifest import VERSION_RE, is_safe_file_name

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
DEFAULT_MAX_FILE_BYTES = 64 << 20  # Gemma 3's tokenizer.json is 33 MB, Mistral's tekken.json 15-19 MB

ENGINE_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "tokenizer.model.v*",  # Mistral (tokenizer_mode mistral)
    "tekken.json",  # Mistral
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "hf_quant_config.json",  # ModelOpt quantized checkpoints (vLLM reads it)
    "quantize_config.json",  # GPTQ / AutoGPTQ
    "configuration_*.py",  # remote code named by config.json's auto_map (trust_remote_code)
    "modeling_*.py",
    "tokenization_*.py",
    "processing_*.py",
    "image_processing_*.py",
)
"""Top-level names (globs) an engine may read beside the weights; :func:`select` records these and only these."""

OTHER_WEIGHTS: tuple[str, ...] = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
    "*.gguf",
    "*.onnx",
    "*.index.json",
)
"""Weights (and their indexes) in other formats or not chosen: never read."""


@dataclass(frozen=True)
class SkippedFile:
    """A repo entry that was neither read as weights nor recorded for ``pull_files`` (a folder ends in ``/``)."""

    name: str
    nbytes: int | None  # a folder: None (not walked)
    reason: str


@dataclass
class RepoFiles:
    """What :func:`select` chose: weight keys (in file order), config.json, engine files (bytes), skipped."""

    weights: list[str]
    config: dict
    files: dict[str, bytes] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)


def select(conn: Connector, prefix: str, where: str, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> RepoFiles:
    """Choose the weights and engine files of the repo at ``prefix`` of ``conn`` (``""`` or ``"<model>/"``).

    ``where`` names the repo in errors. Reads only the index, config.json and the engine files (each within
    ``max_file_bytes``); the store's own ``manifest.json`` and version folders under the prefix are ignored.
    """
    names, folders = _listing(conn, prefix)
    if not names and not folders:
        raise NotFoundError(
            f"no files at {where}: expected a Hugging Face checkpoint there (config.json with model.safetensors, or "
            f"{INDEX} and the shards it names)"
        )
    weights = _weights(conn, prefix, names, where, max_file_bytes)
    if CONFIG not in names:
        raise ConfigError(f"{where} has no config.json: the sharding rules are chosen by its model_type")
    files: dict[str, bytes] = {}
    skipped = [SkippedFile(f"{d}/", None, "folder: not read (weights and engine files are top-level)") for d in folders]
    for name in sorted(names - set(weights) - {INDEX}):
        size = conn.stat(prefix + name)
        reason = _skip_reason(name, size, max_file_bytes, INDEX in names)
        if reason is None:
            files[name] = conn.read(prefix + name)
        elif name == CONFIG:
            raise ConfigError(f"{where}/config.json: {reason}")
        else:
            skipped.append(SkippedFile(name, size, reason))
    try:
        config = json.loads(files[CONFIG])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}/config.json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}/config.json is not a JSON object")
    return RepoFiles([prefix + w for w in weights], config, files, sorted(skipped, key=lambda s: s.name))


def _listing(conn: Connector, prefix: str) -> tuple[set[str], list[str]]:
    """Top-level file names and folder names under ``prefix`` (the store's own manifest and versions left out)."""
    names: set[str] = set()
    folders: set[str] = set()
    for key in conn.list(prefix):
        rel = key[len(prefix) :]
        top, _, rest = rel.partition("/")
        if rest:
            if not (prefix and VERSION_RE.match(top)):
                folders.add(top)
        elif not (prefix and rel == "manifest.json"):
            names.add(rel)
    return names, sorted(folders)


def _weights(conn: Connector, prefix: str, names: set[str], where: str, cap: int) -> list[str]:
    """The index's files when there is an index, else ``model.safetensors``; a clear error when neither."""
    if INDEX in names:
        size = conn.stat(prefix + INDEX) or 0
        if size > cap:
            raise ConfigError(f"{where}/{INDEX} is {size} bytes, over the {cap}-byte cap (--max-file-bytes)")
        try:
            weight_map = json.loads(conn.read(prefix + INDEX))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{where}/{INDEX} is not a valid safetensors index ({e!r})") from None
        bad = [f for f in files if not isinstance(f, str) or "/" in f or not is_safe_file_name(f)]
        if bad:
            raise ConfigError(f"{where}/{INDEX} names files outside the repo's top level: {bad[:5]}")
        missing = [f for f in files if f not in names]
        if missing:
            raise ConfigError(f"{where}/{INDEX} names files that are missing: {missing[:5]}")
        if not files:
            raise ConfigError(f"{where}/{INDEX} names no files (empty weight_map)")
        return files
    if SINGLE in names:
        return [SINGLE]
    others = sorted(n for n in names if fnmatch.fnmatch(n, "*.safetensors") or _other_weights(n))
    found = f" (found {', '.join(others[:5])}, which are never read)" if others else ""
    raise ConfigError(
        f"no *.safetensors files to serve in {where}{found}: publish and index take {INDEX} and the shards it "
        f"names, or a lone {SINGLE}, as Hugging Face's save_pretrained(..., safe_serialization=True) writes them"
    )


def _other_weights(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in OTHER_WEIGHTS)


def _skip_reason(name: str, size: int | None, cap: int, has_index: bool) -> str | None:
    """Why a top-level file is not recorded (None: it is an engine file within the cap)."""
    if any(fnmatch.fnmatch(name, p) for p in ENGINE_FILES):
        if size is not None and size > cap:
            return f"{size} bytes is over the {cap}-byte cap for engine files (--max-file-bytes)"
        return None
    if fnmatch.fnmatch(name, "*.safetensors"):
        chooser = f"not named by {INDEX}" if has_index else f"not {SINGLE}"
        return f"safetensors {chooser} (e.g. Mistral's consolidated copy): never read"
    if _other_weights(name):
        return "weights in another format: never read"
    return "not a file an engine needs"
