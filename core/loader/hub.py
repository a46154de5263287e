"""Model ids: ``ORG/NAME`` (``ORG/NAME:QUANT`` for one file of a GGUF repo) found in the local Hugging Face cache,
and downloaded into it first where the hub answers (HF_HUB_OFFLINE unset, a network)."""
from __future__ import annotations

import os
import re

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import validate_repo_id

from kvserve.core.loader.weights import weight_files

# The files besides its weights that a checkpoint needs: config, generation config, tokenizer, chat template, and
# the code of a trust_remote_code model.
SETTINGS_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")


def resolve(model: str, revision: str | None = None, download_dir: str | None = None,
            gguf_file: str | None = None, weights: bool = True) -> str:
    """A local path for ``model``: ``model`` itself where it exists (a local path wins over an id; ``gguf_file``
    is then a file in that folder), else the snapshot folder, or the chosen .gguf file in it, of the Hugging Face
    model id ``model`` at ``revision`` in the cache folder ``download_dir`` (default: HF_HUB_CACHE, or HF_HOME's
    hub/). The hub is asked first, for at most HF_HUB_ETAG_TIMEOUT seconds, and what the cache lacks is
    downloaded; where it does not answer (HF_HUB_OFFLINE, no network), the cache alone decides. ``weights=False``
    (a tokenizer's repo) downloads no weight files."""
    if os.path.exists(model):
        return os.path.join(model, gguf_file) if gguf_file else model
    repo_id, _, quant = model.partition(":")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"model {model!r} is neither a Hugging Face model folder nor a .gguf file, nor a model id "
                         f"(ORG/NAME, or ORG/NAME:QUANT for a GGUF repo's file)") from None
    if quant and gguf_file:
        raise ValueError(f"model {model!r} chooses its .gguf file by its :{quant} suffix, and gguf_file={gguf_file!r} "
                         f"chooses one too: give one of them")
    cache = download_dir or constants.HF_HUB_CACHE
    try:
        # A timeout of its own: snapshot_download's first request has none, and would wait forever on a network
        # that drops packets.
        info = HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:   # offline, unreachable, unknown or gated: the cache may still hold it
        folder, reason = _cached_snapshot(repo_id, revision, cache), str(error).partition("\n")[0]
        if folder is None:
            raise ValueError(f"model {model!r} is no local path, and model id {repo_id!r} at revision "
                             f"{revision or 'main'!r} is not in the Hugging Face cache {cache!r}; downloading it "
                             f"failed: {type(error).__name__}: {reason}") from None
        names = [os.path.relpath(os.path.join(root, name), folder)
                 for root, _, files in os.walk(folder) for name in files]
        chosen = _chosen_gguf(repo_id, names, quant, gguf_file)
    else:
        names = [sibling.rfilename for sibling in info.siblings or ()]
        chosen = _chosen_gguf(repo_id, names, quant, gguf_file)
        folder = _download(repo_id, revision, info.sha, cache, names, chosen, weights)
    return os.path.join(folder, chosen) if chosen else folder


def _download(repo_id: str, revision: str | None, commit: str, cache: str, names: list[str], chosen: str | None,
              weights: bool) -> str:
    """The snapshot folder, with what the checkpoint needs of the repo's files ``names`` downloaded: the chosen
    .gguf file alone, or the settings and (``weights``) the weights, only the shards an index names."""
    if chosen:
        wanted = [chosen]
    else:
        wanted = [name for name in names if "/" not in name and name.endswith(SETTINGS_SUFFIXES)]
        if weights:
            wanted += weight_files(names, lambda index: hf_hub_download(repo_id, index, revision=commit,
                                                                        cache_dir=cache))
    # The revision as asked, not the commit: refs/ then maps it to the commit, for later offline starts.
    return snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=wanted)


def _cached_snapshot(repo_id: str, revision: str | None, cache: str) -> str | None:
    """The cache's snapshot folder of ``revision`` (a branch or tag that refs/ maps to a commit, or a commit), if
    it has one."""
    repo = os.path.join(cache, repo_folder_name(repo_id=repo_id, repo_type="model"))
    commit = revision or "main"
    if os.path.isfile(ref := os.path.join(repo, "refs", commit)):
        with open(ref) as f:
            commit = f.read().strip()
    folder = os.path.join(repo, "snapshots", commit)
    return folder if os.path.isdir(folder) else None


def _chosen_gguf(repo_id: str, names: list[str], quant: str, gguf_file: str | None) -> str | None:
    """Of the repo's files ``names``, the .gguf file that ``gguf_file`` names, or whose name holds the quant type
    ``quant`` (case-insensitive, between separators: Q4_K is not Q4_K_M), or the only one of a repo without a
    config.json; None for a Hugging Face checkpoint."""
    ggufs = sorted(name for name in names if name.endswith(".gguf"))
    if gguf_file or quant:
        pattern = re.compile(rf"(^|[-._]){re.escape(quant)}([-.]|$)", re.IGNORECASE)
        matches = [name for name in ggufs if name == gguf_file or
                   (quant and pattern.search(os.path.basename(name)[:-len(".gguf")]))]
        problem = f"{len(matches) or 'no'} .gguf files " + (f"named {gguf_file!r}" if gguf_file else f"of {quant}")
    elif "config.json" in names or not ggufs:
        return None
    else:
        matches, problem = ggufs, f"no config.json but {len(ggufs)} .gguf files"
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"{repo_id!r} has {problem}: choose one with {repo_id}:QUANT (a quant type in its name, like "
                     f"Q4_K_M) or gguf_file; its .gguf files: {', '.join(ggufs) or 'none'}")
