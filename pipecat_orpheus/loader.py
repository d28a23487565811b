"""Load the Orpheus LLM + tokenizer and the SNAC codec from a hub id or a local directory.

A hub id is first resolved to a local snapshot with `huggingface_hub` (progress bars on
download, the cache when offline), so every hub failure arrives as a typed error and becomes a
`ModelLoadError` that says what to do: set `HF_TOKEN`, accept the licence, or pass a local path.
A local directory never touches the network, so `HF_HUB_OFFLINE=1` with local paths just works.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors import SafetensorError

from pipecat_orpheus import format as fmt
from pipecat_orpheus.config import ModelConfig
from pipecat_orpheus.errors import ConfigError, ModelLoadError

# Files a transformers Llama checkpoint needs; skips e.g. Meta's `original/*.pth` copies.
_LLM_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
_SNAC_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # preferred first
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# -- device and dtype ------------------------------------------------------------------------


def resolve_device(model_cfg: ModelConfig) -> torch.device:
    """The torch device for `model.device`: "auto" is cuda when available, else cpu."""
    name = model_cfg.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError("model.device", f"{name!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"model.device is {name!r} but this torch has no usable CUDA (torch {torch.__version__}): "
                "use device: cpu (--device cpu), or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(f"model.device is {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_dtype(model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The weight dtype for `model.dtype`: "auto" is bfloat16 on cuda, float32 elsewhere."""
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return _DTYPES[model_cfg.dtype]


# -- locating files ----------------------------------------------------------------------------


def _offline() -> bool:
    """Offline mode, read at call time (huggingface_hub reads HF_HUB_OFFLINE only at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else is meant as a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def _hub_hint(repo_id: str) -> str:
    return (
        f"if it is gated, set HF_TOKEN to a token of an account that accepted the licence at "
        f"https://huggingface.co/{repo_id}; or download it once and pass the local directory instead"
    )


def _hub_error(repo_id: str, what: str, error: Exception) -> ModelLoadError:
    """Translate a huggingface_hub error (by type, never by message) into advice."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    url = f"https://huggingface.co/{repo_id}"
    taken = "(no local directory of that name exists, so it was taken as a hub id)"
    if isinstance(error, GatedRepoError):
        msg = f"{what} {repo_id!r} is gated: accept the licence at {url}, then set HF_TOKEN to your access token"
    elif isinstance(error, RepositoryNotFoundError):
        msg = f"{what} {repo_id!r} was not found on the hub (or is private/gated) {taken}: check the id; "
        msg += _hub_hint(repo_id)
    elif isinstance(error, LocalEntryNotFoundError):
        mode = "offline mode (HF_HUB_OFFLINE=1) is on" if _offline() else "the hub could not be reached"
        msg = (
            f"{what} {repo_id!r} {taken} is not in the local Hugging Face cache and {mode}: download it once online "
            f"({_hub_hint(repo_id)})"
        )
    elif isinstance(error, HFValidationError):
        msg = f"{what} {repo_id!r} is neither an existing local directory nor a valid hub id (owner/name)"
    else:
        msg = f"{what} {repo_id!r} could not be downloaded ({type(error).__name__}: {error}); {_hub_hint(repo_id)}"
    return ModelLoadError(msg)


def _check_local_dir(name: str, what: str) -> Path | None:
    """The directory `name` if it is a local path; None if it should be treated as a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if _looks_like_path(name):
        raise ModelLoadError(
            f"{what} path {name!r} is not a directory: pass a directory holding the files, or a hub id"
        )
    return None


def resolve_llm_dir(model: str) -> Path:
    """A local directory holding the LLM checkpoint and tokenizer: `model` itself, or its hub snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    local = _check_local_dir(model, "model.llm")
    if local is not None:
        return local
    logger.info(f"Resolving LLM {model!r} on the Hugging Face hub (offline={_offline()})")
    try:
        return Path(snapshot_download(model, allow_patterns=_LLM_FILES, local_files_only=_offline()))
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise _hub_error(model, "model.llm", e) from e


def resolve_snac_files(codec: str) -> tuple[Path, Path]:
    """(config.json, weights file) of the SNAC codec: from a local directory, or downloaded by hub id."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    local = _check_local_dir(codec, "model.codec")
    if local is not None:
        weights = [local / w for w in _SNAC_WEIGHTS if (local / w).is_file()]
        if not (local / "config.json").is_file() or not weights:
            raise ModelLoadError(
                f"model.codec directory {str(local)!r} must hold config.json and one of {', '.join(_SNAC_WEIGHTS)}"
            )
        return local / "config.json", weights[0]
    logger.info(f"Resolving SNAC {codec!r} on the Hugging Face hub (offline={_offline()})")
    offline = _offline()
    try:
        config = Path(hf_hub_download(codec, "config.json", local_files_only=offline))
        for i, name in enumerate(_SNAC_WEIGHTS):
            try:
                return config, Path(hf_hub_download(codec, name, local_files_only=offline))
            except EntryNotFoundError:
                if i == len(_SNAC_WEIGHTS) - 1:
                    raise
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise _hub_error(codec, "model.codec", e) from e
    raise AssertionError("unreachable")


# -- loading -----------------------------------------------------------------------------------


def load_tokenizer(model: str) -> Any:
    """The tokenizer of the Orpheus model `model` (hub id or directory), checked for Orpheus's audio tokens."""
    from transformers import AutoTokenizer

    path = resolve_llm_dir(model)
    logger.info(f"Loading tokenizer from {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of model.llm {model!r} from {path}: {e}") from e
    if tokenizer.convert_tokens_to_ids("<custom_token_2>") != fmt.END_OF_SPEECH:
        raise ModelLoadError(f"the tokenizer of model.llm {model!r} lacks Orpheus's <custom_token_N> layout")
    return tokenizer


def load_llm(model: str, *, dtype: torch.dtype | str, device: torch.device | str) -> tuple[Any, Any]:
    """Load the Orpheus `LlamaForCausalLM` (eval mode, on `device`) and its tokenizer from a hub id or directory."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    tokenizer = load_tokenizer(model)
    path = resolve_llm_dir(model)
    logger.info(f"Loading LLM weights from {path} ({dtype}, {device})")
    try:
        llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise ModelLoadError(f"cannot load the weights of model.llm {model!r} from {path}: {e}") from e
    if llm.config.vocab_size < fmt.VOCAB_SIZE:
        raise ModelLoadError(
            f"model.llm {model!r} has a vocabulary of {llm.config.vocab_size} tokens, not Orpheus's {fmt.VOCAB_SIZE}: "
            "it is not an Orpheus checkpoint"
        )
    llm = llm.to(device).eval()
    logger.info(f"Loaded LLM: {sum(p.numel() for p in llm.parameters()) / 1e6:.1f} M parameters on {device}")
    return llm, tokenizer


def load_snac(codec: str, *, device: torch.device | str) -> Any:
    """Load the SNAC codec (eval mode, on `device`) from a hub id or a directory with config.json + weights."""
    from snac import SNAC

    config_path, weights_path = resolve_snac_files(codec)
    logger.info(f"Loading SNAC from {weights_path.parent} ({device})")
    try:
        config = json.loads(config_path.read_text())
        model = SNAC(**config)
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"model.codec {codec!r}: {config_path} is not a valid SNAC config: {e}") from e
    try:
        if weights_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights_path))
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        raise ModelLoadError(f"model.codec {codec!r}: cannot load weights {weights_path}: {e}") from e
    return model.to(device).eval()


def load_models(model_cfg: ModelConfig) -> tuple[Any, Any, Any, torch.device]:
    """(llm, tokenizer, snac, device) for a `ModelConfig`: the one call most callers need."""
    device = resolve_device(model_cfg)
    dtype = resolve_dtype(model_cfg, device)
    llm, tokenizer = load_llm(model_cfg.llm, dtype=dtype, device=device)
    snac = load_snac(model_cfg.codec, device=device)
    return llm, tokenizer, snac, device
