"""Hub ids -> local snapshot directories, downloaded through huggingface_hub (as vLLM does).

    --model org/name [--revision R] [--download-dir DIR] [--load-format F]
      1. the cache (DIR, else HF_HUB_CACHE): a snapshot of R that is complete there, for what
         we load, is used as it is, without a single request to the Hub
      2. the Hub: R resolved to a commit (refs/R written), its file list read, the shard
         index fetched when there is one, then `snapshot_download` of only what we load:
         configs, tokenizer, chat templates, sentence-transformers files and the shards of
         one weight format (F; auto = safetensors when the repo has them, else .bin/.pt)

HF_TOKEN, HF_HUB_OFFLINE and HF_HUB_CACHE act through huggingface_hub itself. HF_ENDPOINT is
read here when a download starts and passed on, because huggingface_hub reads it only once,
at import, and a process may set it later. Every failure is one ModelLoadError line: repo
not found, gated, access denied, revision not found, offline and not cached, Hub unreachable.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from engine.config import ModelConfig
from engine.errors import ModelLoadError

logger = logging.getLogger(__name__)

# What the tokenizer loads (transformers reads config.json to pick a tokenizer class).
TOKENIZER_PATTERNS = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "chat_template.jinja", "chat_template.json",
    "additional_chat_templates/*.jinja",
)
# Everything else a served model reads besides its weights: request defaults and the
# sentence-transformers pipeline (modules.json -> 1_Pooling/config.json, 2_Normalize).
MODEL_PATTERNS = (
    *TOKENIZER_PATTERNS, "generation_config.json", "modules.json",
    "sentence_bert_config.json", "config_sentence_transformers.json", "*_Pooling/*",
    "*_Normalize/*",
)


GGUF_SUFFIX = ".gguf"


def is_gguf_file(model: str | Path) -> bool:
    path = Path(model).expanduser()
    return path.suffix == GGUF_SUFFIX and path.is_file()


def is_hub_id(model: str) -> bool:
    """`org/name` or `name` that is not a local directory (a path-like value never is)."""
    path = Path(model).expanduser()
    return not (path.is_dir() or path.is_absolute() or model.startswith((".", "~"))
                or model.count("/") > 1 or not model.strip() or is_gguf_file(path))


def model_directory(
    model: str, *, revision: str | None = None, download_dir: str | None = None,
    load_format: str = "auto",
) -> Path:
    """A local directory as it is; a hub id from the cache, or downloaded into it."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if is_gguf_file(path):
        from engine.models.gguf_checkpoint import gguf_model_directory

        return gguf_model_directory(path)
    if not is_hub_id(model):
        raise ModelLoadError(f"model directory {model} does not exist")
    return download_snapshot(model, revision=revision, cache_dir=download_dir,
                             load_format=load_format)


def local_model_config(config: ModelConfig) -> ModelConfig:
    """`config` with its model and tokenizer as local directories: hub ids are downloaded
    here, once, so every process started after this one (the engine core) reads the
    snapshot and none asks the Hub again. The served name stays the hub id."""
    tokenizer = config.tokenizer
    separate_tokenizer_revision = (
        tokenizer is None and config.tokenizer_revision not in (None, config.revision)
    )
    if is_gguf_file(config.model):  # its directory holds the config and tokenizer it implies
        from engine.models.gguf_checkpoint import gguf_model_directory

        return replace(config, model=str(gguf_model_directory(Path(config.model))),
                       served_model_names=config.served_model_names or (config.model,))
    if not is_hub_id(config.model) and not (tokenizer is not None and is_hub_id(tokenizer)):
        # Said here, before engine-serve imports torch, not seconds later by the loader.
        model_dir = Path(config.model).expanduser()
        if not model_dir.is_dir():
            raise ModelLoadError(f"model directory {config.model} does not exist")
        if not (model_dir / "config.json").is_file():
            raise ModelLoadError(f"no config.json in {model_dir.resolve()}")
        return config
    model_dir = model_directory(config.model, revision=config.revision,
                                download_dir=config.download_dir, load_format=config.load_format)
    if tokenizer is not None and is_hub_id(tokenizer):
        tokenizer = str(download_snapshot(tokenizer, revision=config.tokenizer_revision,
                                          cache_dir=config.download_dir, load_format=None,
                                          revision_flag="--tokenizer-revision"))
    elif separate_tokenizer_revision and is_hub_id(config.model):
        tokenizer = str(download_snapshot(config.model, revision=config.tokenizer_revision,
                                          cache_dir=config.download_dir, load_format=None,
                                          revision_flag="--tokenizer-revision"))
    return replace(config, model=str(model_dir), tokenizer=tokenizer,
                   served_model_names=config.served_model_names or (config.model,))


def download_snapshot(
    repo_id: str, *, revision: str | None = None, cache_dir: str | None = None,
    load_format: str | None = "auto", revision_flag: str = "--revision",
) -> Path:
    """The snapshot directory of `repo_id` at `revision` holding what we load: the model
    for `load_format` (dummy: no weights), or only the tokenizer when it is None."""
    import huggingface_hub.constants

    label = repo_id + (f" (revision {revision})" if revision else "")
    cache = str(Path(cache_dir or huggingface_hub.constants.HF_HUB_CACHE).expanduser())
    cached = _cached_snapshot(repo_id, revision, cache, load_format)
    if cached is not None:
        logger.info("%s: using the cached snapshot %s", label, cached)
        return cached
    if huggingface_hub.constants.is_offline_mode():
        raise ModelLoadError(
            f"model {label} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is "
            "set: download it first, or unset HF_HUB_OFFLINE")
    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    try:
        return _download(repo_id, revision, cache, load_format, endpoint, label)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line below
        where = endpoint or huggingface_hub.constants.ENDPOINT
        raise ModelLoadError(_describe(exc, repo_id, revision, revision_flag, where, cache)) from None


def _allow_patterns(
    names: Iterable[str], load_format: str | None, where: str,
    weight_map: Callable[[str], Mapping[str, str]],
) -> list[str]:
    if load_format is None:
        return list(TOKENIZER_PATTERNS)
    if load_format == "dummy":
        return list(MODEL_PATTERNS)
    from engine.models.weights import weight_layout

    layout = weight_layout(names, load_format, where)
    index = layout.index_file
    shards = layout.shards(weight_map(index) if index else None)
    return [*MODEL_PATTERNS, *([index] if index else []), *shards]


def _cached_snapshot(
    repo_id: str, revision: str | None, cache: str, load_format: str | None
) -> Path | None:
    """The snapshot when the cache holds every file we would download; no request made."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    from engine.models.weights import read_weight_map

    def local(patterns: list[str] | None) -> Path | None:
        try:
            return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                          allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, incomplete, invalid id: not usable
            return None

    try:
        names = [entry.path for entry in get_cached_repo_tree(repo_id, revision=revision,
                                                              cache_dir=cache)]
    except (CachedRepoTreeNotFoundError, ValueError):
        # Filled by other tools (transformers, `hf download`) with no file list kept: the
        # snapshot as it is, when it holds what we load.
        folder = local(None)
        return folder if folder is not None and _has_files(folder, load_format) else None
    folder = local(list(TOKENIZER_PATTERNS))  # the folder, and the index if any, first
    if folder is None:
        return None
    try:
        patterns = _allow_patterns(names, load_format, repo_id,
                                   lambda index: read_weight_map(folder / index))
    except ModelLoadError:
        return None  # the download path reports it, with the repo's file list
    return local(patterns)


def _has_files(folder: Path, load_format: str | None) -> bool:
    if load_format is None:
        return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    if not (folder / "config.json").is_file():
        return False
    if load_format == "dummy":
        return True
    from engine.models.weights import find_checkpoint_files

    try:
        find_checkpoint_files(folder, load_format)
    except ModelLoadError:
        return False
    return True


def _download(repo_id: str, revision: str | None, cache: str, load_format: str | None,
              endpoint: str | None, label: str) -> Path:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    from engine.models.weights import read_weight_map

    api = HfApi(endpoint=endpoint)
    # One commit for every file: the branch may move while we download.
    resolved = api.resolve_revision(repo_id, revision=revision, cache_dir=cache)
    names = api.list_repo_files(repo_id, revision=resolved.resolved)

    def weight_map(index: str) -> Mapping[str, str]:
        return read_weight_map(Path(hf_hub_download(
            repo_id, index, revision=resolved.resolved, cache_dir=cache, endpoint=endpoint)))

    patterns = _allow_patterns(names, load_format, label, weight_map)
    logger.info("downloading %s (commit %s) from %s into %s", label, resolved.resolved[:12],
                api.endpoint, cache)
    return Path(snapshot_download(repo_id, revision=resolved, cache_dir=cache,
                                  allow_patterns=patterns, endpoint=endpoint))


def _describe(exc: Exception, repo_id: str, revision: str | None, revision_flag: str,
              endpoint: str, cache: str) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return (f"model {repo_id} is gated on {endpoint}: accept its terms on its page and set "
                "HF_TOKEN to a token of an account with access")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"model {repo_id} not found on {endpoint}: check the id, or set HF_TOKEN if "
                "it is a private repository")
    if isinstance(exc, RevisionNotFoundError):
        return f"revision {revision!r} ({revision_flag}) not found in {repo_id} on {endpoint}"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 403:
            return f"access to {repo_id} on {endpoint} denied (403): HF_TOKEN has no access to it"
        return f"{endpoint} answered {status} for {repo_id}: {_first_line(exc)}"
    # LocalEntryNotFoundError: the Hub could not be reached and the cache had no copy.
    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | LocalEntryNotFoundError):
        return f"cannot download {repo_id} into {cache}: {_first_line(exc)}"
    # Connection refused, DNS, timeouts, and nothing in the cache to fall back on.
    return (f"cannot reach {endpoint} to download {repo_id}, and it is not in the cache "
            f"{cache}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
