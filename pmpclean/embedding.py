"""Image and caption embeddings: open_clip behind one door, with an on-disk cache.

This is the only pmpclean module (besides ``training``) that imports ``open_clip``.
It does three things:

* :func:`load_model` validates a model name and a weights source (an open_clip
  pretrained tag, a local checkpoint file, an ``hf-hub:org/name`` model, or
  ``"none"`` for deterministic random weights) *before* doing any work, and turns
  every failure into a :class:`~pmpclean.errors.ModelLoadError` that names the
  model, the weights and the fix. Weights that are neither cached nor downloadable
  fail fast (seconds, not the minutes a retrying hub client can take offline).
* :func:`embed_manifest` embeds each unique image and each unique caption of a
  :class:`~pmpclean.data.Manifest` once, decoding images in DataLoader worker
  processes so that decoding overlaps the forward pass, and broadcasts the
  L2-normalised vectors back to rows. Results go to an SQLite cache keyed by model,
  weights and item content, committed after every batch: a second run does no
  model work (the model is not even loaded) and an interrupted run resumes.
* :func:`load_embeddings` / :func:`save_embeddings` read and write precomputed,
  row-aligned embeddings (``.npz`` or Parquet), so no model is needed at all.

The tiny architecture ``pmpclean-tiny`` (32 px images, one transformer layer per
tower, 32-d embeddings) ships in ``pmpclean/model_configs`` for tests and demos. It
is registered with open_clip on first use; to use it from plain open_clip::

    import open_clip
    from pmpclean.embedding import register_model_configs

    register_model_configs()  # == open_clip.add_model_config(pmpclean.embed.MODEL_CONFIG_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms("pmpclean-tiny")
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
import os
import re
import socket
import sqlite3
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from ._utils import atomic_path, resolve_device
from .errors import ConfigError, EmbeddingError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .data import Manifest, MemberRef

__all__ = [
    "MODEL_CONFIG_DIR",
    "RANDOM_SEED",
    "Embeddings",
    "LoadedModel",
    "default_cache_dir",
    "embed_manifest",
    "load_embeddings",
    "load_model",
    "register_model_configs",
    "save_embeddings",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

#: Folder of the open_clip model configs pmpclean ships (``pmpclean-tiny.json``).
MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

#: Seed of the random initialisation used for ``pretrained="none"``.
RANDOM_SEED = 0

_NONE_WEIGHTS = ("none", "random")
_HF_HUB = "hf-hub:"
_LOCAL_DIR = "local-dir:"
_PRECISIONS = ("fp32", "fp16", "bf16")
_PROBE_TIMEOUT = 5.0  # seconds to decide that the model hub cannot be reached
_REMEDIES = (
    "Fixes: pass a local checkpoint file with --pretrained /path/to/checkpoint "
    "(pretrained='/path/to/checkpoint'), or skip the model with precomputed embeddings: "
    "--embeddings FILE (an .npz with row-aligned float arrays 'image' and 'text')."
)
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
_IMAGE_STAGE = "Embedding images"
_TEXT_STAGE = "Embedding captions"


# --------------------------------------------------------------------------- open_clip import


def _import_open_clip() -> Any:
    """Import open_clip, explaining the classic torch/torchvision mismatch."""
    try:
        return importlib.import_module("open_clip")
    except (RuntimeError, ImportError, AttributeError, OSError) as exc:
        text = str(exc)
        if "torchvision::nms" in text or "torchvision" in text and "operator" in text:
            raise ModelLoadError(
                "cannot import open_clip: torchvision does not match the installed torch "
                f"({text.strip().splitlines()[-1] if text.strip() else type(exc).__name__}). "
                "torch and torchvision were built for different releases (typically a CPU-only "
                "torch wheel next to the registry's default torchvision). Fix: reinstall them "
                "together in a fresh virtual environment, e.g. "
                "`pip install --force-reinstall torch torchvision` (add the same --index-url "
                "for both if you use a CPU or CUDA wheel index)."
            ) from exc
        if isinstance(exc, ImportError):
            raise ModelLoadError(
                f"cannot import open_clip ({exc}); install it with `pip install open_clip_torch`, "
                "or pass precomputed embeddings with --embeddings FILE."
            ) from exc
        raise


_registered = False
_register_lock = threading.Lock()


def register_model_configs() -> None:
    """Register pmpclean's model configs (``pmpclean-tiny``) with open_clip.

    Idempotent. Afterwards ``open_clip.create_model("pmpclean-tiny")`` and
    ``open_clip.get_tokenizer("pmpclean-tiny")`` work in plain open_clip too.
    """
    global _registered
    open_clip = _import_open_clip()
    with _register_lock:
        if not _registered or not set(_shipped_configs()) <= set(open_clip.list_models()):
            open_clip.add_model_config(MODEL_CONFIG_DIR)
            _registered = True


def _shipped_configs() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


# --------------------------------------------------------------------------- model spec


@dataclass(frozen=True)
class _Spec:
    """A validated (model, weights) request; nothing is downloaded or built yet."""

    kind: str  # "tag" | "file" | "none" | "hf-hub" | "local-dir"
    model_name: str  # open_clip architecture name, or the hf-hub:/local-dir: string
    pretrained: str  # tag, absolute file path, "none", "hf-hub" or "local-dir"
    fingerprint: str  # identifies the weights for the embedding cache


def weights_fingerprint(model: str = "ViT-B-32", pretrained: str = "laion2b_s34b_b79k") -> str:
    """Identify a (model, weights) pair for the embedding cache, without loading anything.

    ``"<model>/<tag>"`` for an open_clip tag; ``"file:<abs path>|<size>|<mtime_ns>"``
    for a local checkpoint; ``"random:seed=<RANDOM_SEED>"`` (plus the model) for
    ``"none"``; the ``hf-hub:`` name for a Hugging Face model.

    Raises
    ------
    ModelLoadError
        As :func:`load_model` for an unknown model, tag or missing file.
    """
    return _resolve_spec(model, pretrained).fingerprint


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return f"file:{path}|{st.st_size}|{st.st_mtime_ns}"


def _looks_like_path(value: str) -> bool:
    return (
        os.sep in value
        or "/" in value
        or value.startswith((".", "~"))
        or value.lower().endswith(_CHECKPOINT_SUFFIXES)
    )


def _resolve_spec(model: str, pretrained: str | None) -> _Spec:
    """Validate the model name and the weights source; cheap, no network, no weights."""
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"model must be a non-empty open_clip model name, not {model!r}.")
    model = model.strip()
    pretrained = "none" if pretrained is None else (str(pretrained).strip() or "none")
    open_clip = _import_open_clip()
    register_model_configs()

    # hf-hub:org/name may come as the model (open_clip's convention) or as the weights.
    if pretrained.startswith(_HF_HUB) and not model.startswith((_HF_HUB, _LOCAL_DIR)):
        model = pretrained
    if model.startswith(_HF_HUB):
        repo = model[len(_HF_HUB) :].strip()
        if not repo or repo.count("/") != 1:
            raise ModelLoadError(
                f"invalid Hugging Face model {model!r}: expected 'hf-hub:org/name', "
                "e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K."
            )
        return _Spec("hf-hub", f"{_HF_HUB}{repo}", "hf-hub", f"{_HF_HUB}{repo}")
    if model.startswith(_LOCAL_DIR):
        folder = Path(model[len(_LOCAL_DIR) :]).expanduser().absolute()
        config = folder / "open_clip_config.json"
        if not config.is_file():
            raise ModelLoadError(
                f"model {model!r}: {config} does not exist; a local-dir: model is a folder "
                "holding open_clip_config.json and the weights (as saved by open_clip's "
                "push_to_hf_hub / save_for_hf)."
            )
        parts = [_file_fingerprint(config)]
        parts += [
            _file_fingerprint(p)
            for p in sorted(folder.iterdir())
            if p.suffix in _CHECKPOINT_SUFFIXES
        ]
        digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
        return _Spec(
            "local-dir", f"{_LOCAL_DIR}{folder}", "local-dir", f"local-dir:{folder}|{digest}"
        )

    available = open_clip.list_models()
    name = model.replace("/", "-")  # open_clip accepts ViT-B/32 for ViT-B-32
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"unknown model {model!r}.{hint} Valid names are open_clip architectures "
            f"({len(available)} available; list them with "
            '`python -c "import open_clip; print(open_clip.list_models())"`), '
            "an 'hf-hub:org/name' model, or pmpclean's tiny test model "
            f"{', '.join(repr(c) for c in _shipped_configs())}."
        )

    if pretrained.lower() in _NONE_WEIGHTS:
        return _Spec("none", name, "none", f"{name}/random:seed={RANDOM_SEED}")

    tags = open_clip.list_pretrained_tags_by_model(name)
    if open_clip.is_pretrained_cfg(name, pretrained):
        tag = pretrained.lower().replace("-", "_")
        return _Spec("tag", name, tag, f"{name}/{tag}")

    path = Path(pretrained).expanduser()
    if path.is_file():
        path = path.absolute()
        return _Spec("file", name, str(path), _file_fingerprint(path))
    if path.is_dir():
        raise ModelLoadError(
            f"pretrained={pretrained!r} for model {name!r} is a directory, not a checkpoint "
            "file; pass the checkpoint file itself (.pt/.pth/.bin/.safetensors), or use "
            f"--model local-dir:{path.absolute()} for a folder with open_clip_config.json."
        )
    if _looks_like_path(pretrained):
        raise ModelLoadError(
            f"checkpoint file {str(path.absolute())!r} (pretrained={pretrained!r}, model "
            f"{name!r}) does not exist; check the path, or pass an open_clip pretrained tag"
            + (f" ({', '.join(tags)})" if tags else "")
            + " or 'none' for random weights."
        )
    if tags:
        close = difflib.get_close_matches(
            pretrained.lower().replace("-", "_"), tags, n=3, cutoff=0.6
        )
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelLoadError(
            f"unknown pretrained tag {pretrained!r} for model {name!r} (and no file of that "
            f"name exists).{hint} Valid tags for {name}: {', '.join(tags)}. Or pass a "
            "checkpoint file path, an 'hf-hub:org/name' model, or 'none' for random weights."
        )
    raise ModelLoadError(
        f"unknown pretrained tag {pretrained!r} for model {name!r}: open_clip has no "
        f"pretrained weights for {name} (and no file of that name exists). Pass a "
        "checkpoint file path, or 'none' for random weights (scores then mean nothing)."
    )


# --------------------------------------------------------------------------- weights


def _hub_unreachable_reason(url: str | None = None) -> str | None:
    """Return why the model hub cannot be reached, or ``None`` if a TCP connect works.

    Checked once before any download so that an offline machine fails in seconds
    instead of waiting for the hub client's retries (about a minute per file).
    """
    try:
        from huggingface_hub import constants as hf_constants

        offline = bool(getattr(hf_constants, "HF_HUB_OFFLINE", False))
        endpoint = getattr(hf_constants, "ENDPOINT", "https://huggingface.co")
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        offline, endpoint = False, "https://huggingface.co"
    if offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in (
        "1",
        "true",
        "yes",
        "on",
    ):
        return "HF_HUB_OFFLINE is set"
    parsed = urlparse(url or endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(var)
        if proxy:
            p = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            if p.hostname:
                host, port = p.hostname, p.port or 80
            break
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT):
                result.append(None)
        except OSError as exc:
            result.append(f"cannot connect to {host}:{port}: {exc}")

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores timeouts
    thread.start()
    thread.join(_PROBE_TIMEOUT + 1.0)
    if not result:
        return f"no answer from {host}:{port} within {_PROBE_TIMEOUT:.0f} s"
    return result[0]


def _unobtainable(spec: _Spec, detail: str) -> ModelLoadError:
    what = (
        f"model {spec.model_name!r}"
        if spec.kind == "hf-hub"
        else f"model {spec.model_name!r} with pretrained tag {spec.pretrained!r}"
    )
    return ModelLoadError(f"cannot obtain the weights for {what}: {detail}. {_REMEDIES}")


def _hf_cached(repo: str, filenames: Sequence[str]) -> str | None:
    from huggingface_hub import hf_hub_download

    for filename in filenames:
        try:
            return str(hf_hub_download(repo_id=repo, filename=filename, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            continue
    return None


def _weight_candidates(filename: str) -> list[str]:
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    filename = filename or HF_WEIGHTS_NAME
    out = []
    if filename == HF_WEIGHTS_NAME:
        out.append(HF_SAFE_WEIGHTS_NAME)
    elif filename.endswith((".bin", ".pth")):
        out.append(filename[:-4] + ".safetensors")
    out.append(filename)
    return out


def _hf_fetch(spec: _Spec, repo: str, filenames: Sequence[str]) -> str:
    """Local cache first; else one download attempt after a quick reachability probe."""
    cached = _hf_cached(repo, filenames)
    if cached is not None:
        return cached
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise _unobtainable(
            spec,
            f"{' or '.join(filenames)} of Hugging Face repo {repo!r} is not in the local "
            f"Hugging Face cache and the hub cannot be reached ({reason})",
        )
    from huggingface_hub import hf_hub_download

    last: Exception | None = None
    for filename in filenames:
        try:
            return str(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as exc:  # noqa: BLE001 - reported below with the remedies
            last = exc
    raise _unobtainable(spec, f"download from Hugging Face repo {repo!r} failed ({last})")


def _tag_checkpoint(spec: _Spec) -> tuple[str, dict[str, Any]]:
    """Path of the checkpoint file for an open_clip tag, and the tag's preprocessing."""
    open_clip = _import_open_clip()
    from open_clip.transform import PreprocessCfg

    cfg = open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained)
    keep = set(PreprocessCfg.__dataclass_fields__) - {"size"}
    preprocess = {k: v for k, v in cfg.items() if k in keep}
    if cfg.get("file"):
        return str(cfg["file"]), preprocess
    if cfg.get("hf_hub"):
        # open_clip's convention: "org/name/file.bin", or "org/name/" for the default file
        repo, filename = os.path.split(cfg["hf_hub"])
        return _hf_fetch(spec, repo, _weight_candidates(filename)), preprocess
    url = cfg.get("url", "")
    if not url:  # pragma: no cover - every open_clip tag has a url or hf_hub
        raise _unobtainable(spec, "open_clip lists no download location for it")
    target = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if target.is_file():
        return str(target), preprocess
    reason = _hub_unreachable_reason(url)
    if reason is not None:
        raise _unobtainable(spec, f"{target} does not exist and {url} cannot be reached ({reason})")
    from open_clip.pretrained import download_pretrained_from_url

    try:
        return str(download_pretrained_from_url(url)), preprocess
    except Exception as exc:  # noqa: BLE001
        raise _unobtainable(spec, f"download from {url} failed ({exc})") from exc


# --------------------------------------------------------------------------- load_model


@dataclass
class LoadedModel:
    """An open_clip model ready for inference, with what is needed to use and cache it.

    Attributes
    ----------
    model : torch.nn.Module
        The open_clip model, in ``eval()`` mode, on ``device``.
    preprocess : callable
        PIL image -> ``(3, H, W)`` float tensor (open_clip's validation transform).
    tokenizer : callable
        ``list[str]`` -> ``(n, context_length)`` int64 token tensor.
    device : str
        Concrete torch device, e.g. ``"cpu"`` or ``"cuda"``.
    precision : str
        ``"fp32"``, ``"fp16"`` or ``"bf16"``.
    model_name : str
        open_clip architecture name (or the ``hf-hub:`` / ``local-dir:`` string).
    pretrained : str
        Tag, absolute checkpoint path, ``"none"``, ``"hf-hub"`` or ``"local-dir"``.
    fingerprint : str
        Identifies the weights for the embedding cache (see :func:`weights_fingerprint`).
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], Any]
    tokenizer: Callable[[Sequence[str]], Any]
    device: str
    precision: str
    model_name: str
    pretrained: str
    fingerprint: str

    @property
    def source(self) -> str:
        """``"model:<name>/<pretrained>"``, as recorded in :attr:`Embeddings.source`."""
        return f"model:{self.model_name}/{self.pretrained}"


def _resolve_precision(device: str, precision: str | None) -> str:
    if precision is None:
        return "fp16" if device.startswith("cuda") else "fp32"
    p = precision.lower().strip()
    aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
    p = aliases.get(p, p)
    if p not in _PRECISIONS:
        raise ConfigError(
            f"Unknown precision {precision!r}: expected one of {', '.join(_PRECISIONS)} "
            "(default: fp16 on CUDA, fp32 on CPU and MPS)."
        )
    return p


def load_model(
    model: str = "ViT-B-32",
    pretrained: str = "laion2b_s34b_b79k",
    *,
    device: str = "auto",
    precision: str | None = None,
) -> LoadedModel:
    """Load an open_clip model and its weights for inference, failing fast and clearly.

    Parameters
    ----------
    model : str, default "ViT-B-32"
        open_clip architecture (see ``open_clip.list_models()``), ``"pmpclean-tiny"``
        (shipped tiny test model), ``"hf-hub:org/name"`` or ``"local-dir:/folder"``.
    pretrained : str, default "laion2b_s34b_b79k"
        An open_clip pretrained tag for ``model``, a local checkpoint file, an
        ``"hf-hub:org/name"`` model (then it replaces ``model``), or ``"none"``: random
        weights from a fixed seed (:data:`RANDOM_SEED`), with a warning that scores
        then mean nothing. Ignored when ``model`` is an ``hf-hub:``/``local-dir:`` model.
    device : str, default "auto"
        ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    precision : str, optional
        ``fp32``, ``fp16`` or ``bf16``. Default: fp16 on CUDA, fp32 elsewhere.

    Returns
    -------
    LoadedModel
        Model in ``eval()`` mode on ``device``, with its preprocessing and tokenizer.

    Raises
    ------
    ModelLoadError
        Unknown model (close matches are listed), unknown tag (valid tags listed),
        missing checkpoint file, a checkpoint that does not fit the architecture, or
        weights that are neither cached nor downloadable (no network): the message
        names the model and tag and gives the remedies (a local checkpoint with
        ``--pretrained``, or precomputed ``--embeddings``). Also when torch and
        torchvision do not match.
    ConfigError
        Unknown device or precision.

    Notes
    -----
    Loading never changes the global torch RNG state: random initialisation runs
    under ``torch.random.fork_rng``, seeded with :data:`RANDOM_SEED`.
    """
    spec = _resolve_spec(model, pretrained)
    dev = resolve_device(device)
    prec = _resolve_precision(dev, precision)
    return _build(spec, dev, prec)


def random_weights_warning(model_name: str) -> str:
    """The warning for a model with random weights (``--pretrained none``), in CLI terms."""
    return (
        f"model {model_name!r} has RANDOM weights (--pretrained none, seed {RANDOM_SEED}): "
        "embeddings and match scores mean nothing. Use this only for smoke tests and "
        "pipeline checks; pass a pretrained tag or checkpoint for real use."
    )


def _build(spec: _Spec, device: str, precision: str) -> LoadedModel:
    import torch

    open_clip = _import_open_clip()
    kwargs: dict[str, Any] = {"precision": precision, "device": device}
    model_name = spec.model_name
    pretrained: str | None = None
    tokenizer_name = spec.model_name

    if spec.kind == "none":
        warnings.warn(random_weights_warning(spec.model_name), UserWarning, stacklevel=3)
    elif spec.kind == "file":
        pretrained = spec.pretrained
    elif spec.kind == "tag":
        pretrained, preprocess_cfg = _tag_checkpoint(spec)
        kwargs["force_preprocess_cfg"] = preprocess_cfg
        tag_cfg = open_clip.get_pretrained_cfg(spec.model_name, spec.pretrained)
        model_cfg = open_clip.get_model_config(spec.model_name) or {}
        if bool(tag_cfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
            warnings.warn(
                f"pretrained tag {spec.pretrained!r} was trained with quick_gelu="
                f"{bool(tag_cfg.get('quick_gelu', False))} but model {spec.model_name!r} uses "
                f"quick_gelu={bool(model_cfg.get('quick_gelu', False))}; use model "
                f"'{spec.model_name}-quickgelu' for matching activations.",
                UserWarning,
                stacklevel=3,
            )
    elif spec.kind == "hf-hub":
        from open_clip.constants import HF_CONFIG_NAME

        repo = spec.model_name[len(_HF_HUB) :]
        config_path = _hf_cached(repo, [HF_CONFIG_NAME])
        weights = _hf_cached(repo, _weight_candidates(""))
        if (
            config_path is not None
            and weights is not None
            and Path(config_path).parent == Path(weights).parent
        ):
            # Fully cached: build from the snapshot folder, so no request reaches the hub.
            model_name = tokenizer_name = f"{_LOCAL_DIR}{Path(config_path).parent}"
        else:
            reason = _hub_unreachable_reason()
            if reason is not None:
                missing = HF_CONFIG_NAME if config_path is None else "the weights"
                raise _unobtainable(
                    spec,
                    f"{missing} of Hugging Face repo {repo!r} is not in the local Hugging Face "
                    f"cache and the hub cannot be reached ({reason})",
                )

    try:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)  # random init (and "none") is deterministic
            with warnings.catch_warnings(), _quiet_open_clip():
                warnings.simplefilter("ignore", FutureWarning)
                net = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
        preprocess = image_transform_v2(PreprocessCfg(**net.visual.preprocess_cfg), is_train=False)
        tokenizer = open_clip.get_tokenizer(tokenizer_name)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - everything open_clip raises becomes one message
        text = str(exc).strip()
        msg = (text.splitlines()[0] if text else type(exc).__name__)[:300]
        if spec.kind in ("file", "tag") and ("state_dict" in text or "size mismatch" in text):
            raise ModelLoadError(
                f"checkpoint {pretrained!r} does not fit model {spec.model_name!r} ({msg}); "
                "pass the --model architecture the checkpoint was trained with."
            ) from exc
        if spec.kind == "file":
            raise ModelLoadError(
                f"cannot read checkpoint {pretrained!r} for model {spec.model_name!r} ({msg}); "
                "it must be an open_clip / PyTorch state_dict (.pt, .pth, .bin or .safetensors)."
            ) from exc
        if spec.kind == "hf-hub":
            raise _unobtainable(spec, f"open_clip failed to load it ({msg})") from exc
        raise ModelLoadError(
            f"cannot load model {spec.model_name!r} with weights {spec.pretrained!r}: {msg}"
        ) from exc

    net.eval()
    return LoadedModel(
        model=net,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        model_name=spec.model_name,
        pretrained=spec.pretrained,
        fingerprint=spec.fingerprint,
    )


class _quiet_open_clip:
    """Mute open_clip's root-logger chatter ("No pretrained weights loaded ...") while
    building: pmpclean reports the same facts itself (the random-weights warning)."""

    def __enter__(self) -> None:
        self._disabled = logging.root.manager.disable
        logging.disable(max(self._disabled, logging.WARNING))

    def __exit__(self, *exc: object) -> None:
        logging.disable(self._disabled)


# --------------------------------------------------------------------------- Embeddings


@dataclass
class Embeddings:
    """Row-aligned image and caption embeddings.

    Attributes
    ----------
    image : numpy.ndarray, shape (n_rows, d_img), float16
        L2-normalised image embedding per manifest row; rows without a usable image
        (status not ``"ok"``) are all-NaN. Held as float16 (half the memory of
        float32; CLIP's cosines move by about 1e-4) and, above 256 MB, memory-mapped:
        the embeddings file itself when it already holds unit float16 rows
        uncompressed, else an unnamed temporary file (:func:`new_float16`).
    text : numpy.ndarray, shape (n_rows, d_txt), float16
        L2-normalised caption embedding per row, held like ``image``; rows without a
        usable caption are all-NaN. ``d_txt`` may differ from ``d_img`` for
        precomputed features.
    source : str
        ``"model:<name>/<pretrained>"`` or ``"file:<path>"``.
    n_model_images, n_model_texts : int
        How many unique images / captions went through the model in this call
        (0 on a full cache hit, and for precomputed embeddings).
    notes : list of str
        What a key join of precomputed embeddings could not match (see
        :func:`pmpclean.sources.load_source_embeddings`); the scan's summary lists them.
    """

    image: np.ndarray
    text: np.ndarray
    source: str
    n_model_images: int = 0
    n_model_texts: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.image.shape[0])


#: Rows handled at once when embeddings are checked, normalised or copied: bounds the
#: temporaries (8,192 x 512 float64 = 32 MB) whatever the number of rows.
_ROWS = 1 << 13
#: Float16 arrays larger than this are memory-mapped on an unnamed temporary file in
#: :func:`default_cache_dir` instead of held in memory: their pages count as file
#: cache, which the kernel can write back and drop, not as the process's memory.
_SPILL_BYTES = 1 << 28
#: A float16 row counts as unit-norm when its norm is within this of 1 (float16 keeps
#: 11 significant bits: rounding a unit 512-d row moves its norm by about 1e-4).
_UNIT_TOL = 2e-3


def new_float16(n: int, d: int) -> np.ndarray:
    """An (n, d) float16 array: in memory when small, else on an unnamed temporary file.

    Above ``_SPILL_BYTES`` (256 MB) the array is memory-mapped on a file without a
    name in :func:`default_cache_dir` (gone when the array is), so 10M x 512 rows
    (10 GB) live in the page cache, not in the process's anonymous memory.
    """
    if n * d * 2 <= _SPILL_BYTES:
        return np.empty((n, d), dtype=np.float16)
    import tempfile

    folder = default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as fh:
        return np.memmap(fh, dtype=np.float16, mode="w+", shape=(n, d))


def _is_unit_float16(x: np.ndarray) -> bool:
    """True when ``x`` is C-ordered float16 whose rows are unit-norm or all-NaN."""
    if x.dtype != np.float16 or not x.flags.c_contiguous:
        return False
    for lo in range(0, x.shape[0], _ROWS):
        blk = np.asarray(x[lo : lo + _ROWS], dtype=np.float32)
        whole_nan = np.isnan(blk).all(axis=1)
        norms = np.linalg.norm(blk[~whole_nan], axis=1)
        if not (np.abs(norms - 1.0) <= _UNIT_TOL).all():  # False for NaN and inf too
            return False
    return True


def _normalise_rows(
    parts: np.ndarray | Sequence[np.ndarray], index: np.ndarray | None = None
) -> np.ndarray:
    """L2-normalised float16 rows; non-finite or zero-norm rows become NaN.

    ``parts`` is one (n, d) array or a sequence of arrays of one width, read as if
    concatenated (e.g. memory-mapped shards, which are never concatenated in memory).
    Row ``i`` of the result is row ``index[i]`` of that concatenation (NaN where
    ``index[i] < 0``); without ``index``, every row in order. An unindexed float16
    array whose rows are already unit-norm (or all-NaN) is returned as it is, so a
    memory-mapped file stays a memory map. Otherwise rows are normalised in float64
    ``_ROWS`` at a time into :func:`new_float16`: a million 512-d rows never get a
    full-size temporary.
    """
    arrays = [parts] if isinstance(parts, np.ndarray) else list(parts)
    if index is None and len(arrays) == 1 and _is_unit_float16(arrays[0]):
        return arrays[0]
    sizes = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    idx = np.arange(total) if index is None else np.asarray(index, dtype=np.int64)
    d = arrays[0].shape[1]
    out = new_float16(idx.size, d)
    for lo in range(0, idx.size, _ROWS):
        want = idx[lo : lo + _ROWS]
        blk = np.full((want.size, d), np.nan)
        part = np.searchsorted(starts, want, side="right") - 1
        for j in np.unique(part[want >= 0]).tolist():
            sel = np.flatnonzero((part == j) & (want >= 0))
            blk[sel] = arrays[j][want[sel] - starts[j]]
        finite = np.isfinite(blk).all(axis=1)
        norms = np.linalg.norm(np.where(finite[:, None], blk, 0.0), axis=1)
        good = finite & (norms > 0)
        res = np.full(blk.shape, np.nan, dtype=np.float16)
        res[good] = blk[good] / norms[good, None]
        out[lo : lo + _ROWS] = res
    return out


def _npz_memmap(path: Path, key: str) -> np.ndarray | None:
    """Array ``key`` of an uncompressed ``.npz`` as a read-only memory map (None if compressed).

    ``np.savez`` stores each array as an ``.npy`` member without compression, so the
    array's bytes lie in the file as they are: map them instead of reading them.
    """
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        head = fh.read(30)
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            return None
        offset = fh.tell()
    if dtype.hasobject:
        return None
    return np.memmap(
        path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def _parquet_column(frame: Any, column: str, path: Path) -> np.ndarray:
    cells = frame[column].tolist()
    lengths = {len(c) for c in cells if c is not None and not _is_nan_scalar(c)}
    if len(lengths) > 1:
        raise EmbeddingError(
            f"embeddings file {str(path)!r}: column {column!r} holds vectors of different "
            f"lengths ({', '.join(map(str, sorted(lengths)[:5]))}); every row needs a vector of "
            "the same dimension (NaN-filled for rows without one)."
        )
    if not lengths:
        raise EmbeddingError(
            f"embeddings file {str(path)!r}: column {column!r} holds no vectors; it needs one "
            "list/array of floats per row."
        )
    d = lengths.pop()
    out = np.full((len(cells), d), np.nan)
    for i, cell in enumerate(cells):
        if cell is None or _is_nan_scalar(cell):
            continue
        arr = np.asarray(cell)
        if arr.dtype.kind not in "fiu":
            raise EmbeddingError(
                f"embeddings file {str(path)!r}: column {column!r} row {i} holds "
                f"{arr.dtype} values, not floats; store one float vector per row."
            )
        out[i] = arr
    return out


def _is_nan_scalar(value: Any) -> bool:
    return isinstance(value, float) and np.isnan(value)


def load_embeddings(path: str | Path, n_rows: int) -> Embeddings:
    # long: numpydoc of 25 lines; body 76
    """Load precomputed, row-aligned embeddings and L2-normalise them.

    Parameters
    ----------
    path : str or Path
        ``.npz`` with float arrays ``image`` ``(n_rows, d_img)`` and ``text``
        ``(n_rows, d_txt)``, or a Parquet file (``.parquet``/``.pq``) with columns
        ``image`` and ``text`` holding one float list per row. ``d_img`` and ``d_txt``
        may differ (e.g. 128-d image and 10-d text features for the label audit).
    n_rows : int
        Number of rows in the manifest; row ``i`` of each array belongs to manifest row ``i``.

    Returns
    -------
    Embeddings
        float16, L2-normalised rows; NaN rows stay NaN, rows with a zero norm or any
        non-finite value become NaN. ``source="file:<abs path>"``. An ``.npz``
        saved without compression (``np.savez``) is memory-mapped, not read: when
        its arrays already hold float16 unit rows (as :func:`save_embeddings`
        writes them), they are used in place and the file is never copied.

    Raises
    ------
    EmbeddingError
        Naming the file: it does not exist; unsupported extension; an array is
        missing (the arrays present are listed); an array is not 2-D or not float;
        the row count differs from ``n_rows``.
    """
    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise EmbeddingError(
            f"embeddings file {str(p)!r} does not exist; pass an existing .npz or .parquet "
            "file with row-aligned 'image' and 'text' arrays."
        )
    suffix = p.suffix.lower()
    arrays: dict[str, np.ndarray] = {}
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as data:
                present = list(data.files)
                missing = [k for k in ("image", "text") if k not in present]
                if missing:
                    names = " or ".join(map(repr, missing))
                    held = ", ".join(map(repr, present)) or "nothing"
                    raise EmbeddingError(
                        f"embeddings file {str(p)!r} has no array {names}; "
                        f"it holds: {held}. Save float arrays "
                        "named 'image' and 'text' of shape (n_rows, d), e.g. "
                        "np.savez(path, image=img, text=txt)."
                    )
                for key in ("image", "text"):
                    mapped = _npz_memmap(p, key)
                    arrays[key] = data[key] if mapped is None else mapped
        except EmbeddingError:
            raise
        except (OSError, ValueError) as exc:
            raise EmbeddingError(
                f"cannot read embeddings file {str(p)!r} as .npz ({exc}); save it with "
                "np.savez(path, image=img, text=txt) (object arrays are not allowed)."
            ) from exc
    elif suffix in (".parquet", ".pq"):
        import pandas as pd

        try:
            frame = pd.read_parquet(p)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds
            raise EmbeddingError(
                f"cannot read embeddings file {str(p)!r} as Parquet ({exc})."
            ) from exc
        present = [str(c) for c in frame.columns]
        missing = [k for k in ("image", "text") if k not in present]
        if missing:
            raise EmbeddingError(
                f"embeddings file {str(p)!r} has no column {' or '.join(map(repr, missing))}; "
                f"it holds: {', '.join(map(repr, present)) or 'nothing'}. It needs columns "
                "'image' and 'text' with one float list per row."
            )
        for key in ("image", "text"):
            arrays[key] = _parquet_column(frame, key, p)
    else:
        raise EmbeddingError(
            f"unsupported embeddings file {str(p)!r} (suffix {p.suffix or 'none'!r}); use .npz "
            "(float arrays 'image' and 'text') or .parquet/.pq (list columns 'image' and 'text')."
        )

    out: dict[str, np.ndarray] = {}
    for key, arr in arrays.items():
        if arr.ndim != 2:
            raise EmbeddingError(
                f"embeddings file {str(p)!r}: array {key!r} has shape {arr.shape}, not 2-D; "
                "it must be (n_rows, d) with one vector per manifest row."
            )
        if arr.dtype.kind != "f":
            raise EmbeddingError(
                f"embeddings file {str(p)!r}: array {key!r} has dtype {arr.dtype}, not float; "
                "store float32 (or float16/float64) vectors."
            )
        if arr.shape[0] != n_rows:
            raise EmbeddingError(
                f"embeddings file {str(p)!r}: array {key!r} has {arr.shape[0]} rows but the "
                f"manifest has {n_rows} rows; embeddings must be row-aligned with the manifest."
            )
        out[key] = _normalise_rows(arr)
    return Embeddings(image=out["image"], text=out["text"], source=f"file:{p}")


def save_embeddings(path: str | Path, emb: Embeddings) -> Path:
    """Write embeddings to ``.npz`` (arrays ``image`` and ``text``), atomically.

    Arrays are written as float16 unit rows, uncompressed: :func:`load_embeddings`
    memory-maps such a file and uses it in place (also with ``--embeddings``).

    Raises
    ------
    EmbeddingError
        If ``path`` does not end in ``.npz``.
    """
    p = Path(path).expanduser()
    if p.suffix.lower() != ".npz":
        raise EmbeddingError(
            f"cannot save embeddings to {str(p)!r}: only .npz is written; use a path ending "
            "in .npz."
        )
    with atomic_path(p) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                image=_normalise_rows(emb.image),
                text=_normalise_rows(emb.text),
                source=np.asarray(emb.source),
            )
    return p


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Embedding cache folder: ``$PMPCLEAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pmpclean``,
    else ``~/.cache/pmpclean``."""
    env = os.environ.get("PMPCLEAN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "pmpclean"
    return Path.home() / ".cache" / "pmpclean"


# Cache key prefix of an image's vector. Bump the number when the decoder changes what a
# file decodes to, so that vectors of the old decoding are not reused (2: EXIF
# orientation applied, 16-bit and float images scaled, transparency onto white).
_IMAGE_KEY = "img2:"


class _VectorCache:
    """One SQLite file per (model, weights, precision): ``key -> (status, float32 vector)``.

    WAL mode lets several processes read while one writes; every batch is committed,
    so an interrupted run keeps what it finished.
    """

    def __init__(self, folder: Path, model_name: str, fingerprint: str, precision: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        ident = f"{model_name}\n{fingerprint}\n{precision}"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name)[-60:].strip("_") or "model"
        self.path = folder / f"{slug}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}.sqlite"
        try:
            self.conn = sqlite3.connect(self.path, timeout=60)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS items "
                "(key TEXT PRIMARY KEY, status TEXT NOT NULL, vec BLOB)"
            )
            self.conn.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
            self.conn.executemany(
                "INSERT OR IGNORE INTO meta VALUES (?, ?)",
                [("model", model_name), ("fingerprint", fingerprint), ("precision", precision)],
            )
            self.conn.commit()
        except sqlite3.Error as exc:
            raise EmbeddingError(
                f"cannot open the embedding cache {str(self.path)!r} ({exc}); pass another "
                "--cache-dir (cache_dir=...), or disable the cache with --no-cache "
                "(use_cache=False)."
            ) from exc

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, np.ndarray | None]]:
        out: dict[str, tuple[str, np.ndarray | None]] = {}
        chunk = 500
        for start in range(0, len(keys), chunk):
            part = list(keys[start : start + chunk])
            marks = ",".join("?" * len(part))
            rows = self.conn.execute(
                f"SELECT key, status, vec FROM items WHERE key IN ({marks})", part
            ).fetchall()
            for key, status, blob in rows:
                vec = None if blob is None else np.frombuffer(blob, dtype=np.float32)
                out[key] = (status, vec)
        return out

    def put_many(self, items: Sequence[tuple[str, str, np.ndarray | None]]) -> None:
        rows = [
            (key, status, None if vec is None else np.ascontiguousarray(vec, np.float32).tobytes())
            for key, status, vec in items
        ]
        self.conn.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?)", rows)
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


class _NoCache:
    path = None

    def get_many(self, keys: Sequence[str]) -> dict[str, tuple[str, np.ndarray | None]]:
        return {}

    def put_many(self, items: Sequence[tuple[str, str, np.ndarray | None]]) -> None:
        return None

    def close(self) -> None:
        return None


def _text_key(text: str) -> str:
    return "txt:" + hashlib.sha1(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- image loading


class _ImageDataset:
    """``i -> (i, status, tensor or None)``: decoding and preprocessing run in the worker."""

    def __init__(self, paths: Sequence[str | MemberRef], preprocess: Callable[[Any], Any]) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str, Any]:
        from .data import decode_image

        status, image = decode_image(self.paths[i])
        if image is None:
            return i, status, None
        try:
            return i, "ok", self.preprocess(image)
        except Exception:  # noqa: BLE001 - e.g. degenerate sizes: treat as undecodable
            return i, "unreadable_image", None


def _collate(batch: list[tuple[int, str, Any]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    import torch

    good = [(i, t) for i, s, t in batch if t is not None]
    bad = [(i, s) for i, s, t in batch if t is None]
    tensor = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], tensor, bad


def _encode(loaded: LoadedModel, fn: str, x: torch.Tensor) -> np.ndarray:
    import torch

    dev = torch.device(loaded.device)
    if x.is_floating_point():
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(loaded.precision, torch.float32)
        x = x.to(dev, dtype=dtype, non_blocking=True)
    else:
        x = x.to(dev, non_blocking=True)
    with torch.inference_mode():
        if dev.type == "cuda" and loaded.precision in ("fp16", "bf16"):
            amp = torch.float16 if loaded.precision == "fp16" else torch.bfloat16
            with torch.autocast("cuda", dtype=amp):
                out = getattr(loaded.model, fn)(x)
        else:
            out = getattr(loaded.model, fn)(x)
        out = torch.nn.functional.normalize(out.float(), dim=-1)
    return out.cpu().numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------- embed_manifest


def embed_manifest(  # noqa: C901 - see the comment below
    manifest: Manifest,
    *,
    model: str = "ViT-B-32",
    pretrained: str = "laion2b_s34b_b79k",
    device: str = "auto",
    batch_size: int = 64,
    workers: int = 2,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    loaded: LoadedModel | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Embeddings:
    # long: numpydoc of 47 lines; cache lookup, model load and both encode passes
    """Embed every usable image and caption of a manifest, each unique item once.

    Images are decoded and preprocessed in ``workers`` DataLoader processes while the
    model runs; captions are tokenised in batches. Vectors are cached on disk (see
    ``cache_dir``), so a repeated run does no model work and the model is loaded only
    when something is missing.

    Parameters
    ----------
    manifest : Manifest
        From :func:`pmpclean.data.read_manifest`. Images that fail to decode are
        marked with ``manifest.set_image_status(idx, "unreadable_image")`` (in place).
    model, pretrained : str
        As :func:`load_model`. Ignored when ``loaded`` is given.
    device : str, default "auto"
        As :func:`load_model`.
    batch_size : int, default 64
        Images or captions per forward pass.
    workers : int, default 2
        DataLoader worker processes decoding images (0: decode in this process).
    cache_dir : str or Path, optional
        Cache folder; default :func:`default_cache_dir`. One SQLite file per model,
        weights and precision, keyed by image file (path, size, mtime) and caption text.
    use_cache : bool, default True
        ``False`` neither reads nor writes the cache.
    loaded : LoadedModel, optional
        An already loaded model to use.
    progress : callable, optional
        ``progress(stage, done, total)`` with stage ``"Embedding images"`` then
        ``"Embedding captions"``; ``done`` counts unique items (cached ones included).

    Returns
    -------
    Embeddings
        ``image`` ``(n, d)`` and ``text`` ``(n, d)`` float16, L2-normalised, row-aligned
        with the manifest; rows whose status is not ``"ok"`` (after decoding) are NaN
        in both.

    Raises
    ------
    ModelLoadError
        When a model is needed and cannot be loaded (see :func:`load_model`).
    ConfigError
        ``batch_size < 1`` or ``workers < 0``.
    EmbeddingError
        The cache cannot be opened.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}; use e.g. --batch-size 64.")
    if int(workers) < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}; use 0 to decode in-process.")
    from .data import image_fingerprint

    if loaded is not None:
        model_name, fingerprint, precision = loaded.model_name, loaded.fingerprint, loaded.precision
        source = loaded.source
        spec = None
        dev = loaded.device
    else:
        spec = _resolve_spec(model, pretrained)  # validate before any work
        dev = resolve_device(device)
        precision = _resolve_precision(dev, None)
        model_name, fingerprint = spec.model_name, spec.fingerprint
        source = f"model:{spec.model_name}/{spec.pretrained}"

    state: dict[str, LoadedModel] = {}

    def get_model() -> LoadedModel:
        if loaded is not None:
            return loaded
        if "m" not in state:
            assert spec is not None
            state["m"] = _build(spec, dev, precision)
        return state["m"]

    cache: _VectorCache | _NoCache
    if use_cache:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache = _VectorCache(folder / "embeddings", model_name, fingerprint, precision)
    else:
        cache = _NoCache()

    n = len(manifest.status)
    try:
        # ---- images: unique images of ok rows
        ok_rows = np.asarray(manifest.status == "ok") & (manifest.image_index >= 0)
        needed = [int(i) for i in np.unique(manifest.image_index[ok_rows])]
        img_vecs: dict[int, np.ndarray] = {}
        keys: dict[int, str] = {}
        for idx in needed:
            try:
                keys[idx] = _IMAGE_KEY + image_fingerprint(manifest.image_source(idx))
            except Exception:  # noqa: BLE001 - the file vanished since read_manifest
                manifest.set_image_status(idx, "missing_image")
        hits = cache.get_many(list(keys.values()))
        todo: list[int] = []
        for idx, key in keys.items():
            hit = hits.get(key)
            if hit is None:
                todo.append(idx)
            elif hit[0] == "ok" and hit[1] is not None:
                img_vecs[idx] = hit[1]
            else:
                manifest.set_image_status(idx, hit[0])
        n_images = _embed_images(
            manifest,
            todo,
            keys,
            img_vecs,
            cache,
            get_model,
            batch_size,
            workers,
            progress,
            total=len(keys),
            done=len(keys) - len(todo),
        )

        # ---- captions: unique texts of rows still ok
        ok_rows = np.asarray(manifest.status == "ok")
        texts = list(dict.fromkeys(str(c) for c in manifest.captions[ok_rows]))
        tkeys = {t: _text_key(t) for t in texts}
        thits = cache.get_many(list(tkeys.values()))
        txt_vecs: dict[str, np.ndarray] = {}
        ttodo: list[str] = []
        for t in texts:
            hit = thits.get(tkeys[t])
            if hit is not None and hit[1] is not None:
                txt_vecs[t] = hit[1]
            else:
                ttodo.append(t)
        n_texts = _embed_texts(
            ttodo,
            tkeys,
            txt_vecs,
            cache,
            get_model,
            batch_size,
            progress,
            total=len(texts),
            done=len(texts) - len(ttodo),
        )
    finally:
        cache.close()

    # ---- broadcast to rows
    ok_rows = np.asarray(manifest.status == "ok")
    d_img = _dim(img_vecs, get_model, "image")
    d_txt = _dim(txt_vecs, get_model, "text")
    # Rows point at their unique image / caption vector (-1: no usable row); the float16
    # row arrays are filled chunk by chunk, never through a float32 (n, d) copy.
    rows = np.flatnonzero(ok_rows)
    img_at = np.full(n, -1, dtype=np.int64)
    txt_at = np.full(n, -1, dtype=np.int64)
    img_ids = sorted(img_vecs)
    img_unique = np.stack([img_vecs[i] for i in img_ids]) if img_ids else np.zeros((0, d_img))
    txt_unique = np.stack(list(txt_vecs.values())) if txt_vecs else np.zeros((0, d_txt))
    if len(rows):
        lookup = np.full(len(manifest.unique_images), -1, dtype=np.int64)
        lookup[img_ids] = np.arange(len(img_ids))
        img_at[rows] = lookup[manifest.image_index[rows]]
        txt_ids = {t: j for j, t in enumerate(txt_vecs)}
        txt_at[rows] = np.fromiter((txt_ids[str(c)] for c in manifest.captions[rows]), np.int64)
    image = _normalise_rows(img_unique, img_at)
    text = _normalise_rows(txt_unique, txt_at)
    return Embeddings(
        image=image, text=text, source=source, n_model_images=n_images, n_model_texts=n_texts
    )


def _dim(vecs: dict[Any, np.ndarray], get_model: Callable[[], LoadedModel], kind: str) -> int:
    """Embedding width: from any vector at hand, else from one dummy forward pass."""
    for v in vecs.values():
        return int(v.shape[0])
    # Nothing of this kind was usable (e.g. every image failed to decode): ask the model.
    import torch

    lm = get_model()
    if kind == "image":
        size = getattr(lm.model.visual, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        x = torch.zeros(1, 3, int(h), int(w))
        return int(_encode(lm, "encode_image", x).shape[1])
    return int(_encode(lm, "encode_text", lm.tokenizer(["a"])).shape[1])


def _batches(loader: Any, *, in_process: bool) -> Any:
    """Iterate a DataLoader; with ``workers=0`` decode with one torch thread.

    Preprocessing a single image with several intra-op threads costs ~10x the CPU of
    one thread (thread start-up and spinning on tiny tensors). DataLoader workers run
    with one thread anyway; in-process decoding gets the same, and the forward pass
    gets the caller's thread count back between batches.
    """
    if not in_process:
        yield from loader
        return
    import torch

    it = iter(loader)
    while True:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch


def _embed_images(
    manifest: Manifest,
    todo: list[int],
    keys: dict[int, str],
    img_vecs: dict[int, np.ndarray],
    cache: _VectorCache | _NoCache,
    get_model: Callable[[], LoadedModel],
    batch_size: int,
    workers: int,
    progress: Callable[[str, int, int], None] | None,
    *,
    total: int,
    done: int,
) -> int:
    if progress is not None:
        progress(_IMAGE_STAGE, done, total)
    if not todo:
        return 0
    from torch.utils.data import DataLoader

    lm = get_model()
    dataset = _ImageDataset([manifest.image_source(i) for i in todo], lm.preprocess)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=int(batch_size),
        shuffle=False,
        num_workers=int(workers),
        collate_fn=_collate,
        pin_memory=lm.device.startswith("cuda"),
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
    n_model = 0
    for positions, tensor, bad in _batches(loader, in_process=int(workers) == 0):
        items: list[tuple[str, str, np.ndarray | None]] = []
        if tensor is not None:
            vecs = _encode(lm, "encode_image", tensor)
            n_model += len(positions)
            for pos, vec in zip(positions, vecs, strict=True):
                idx = todo[pos]
                img_vecs[idx] = vec
                items.append((keys[idx], "ok", vec))
        for pos, status in bad:
            idx = todo[pos]
            manifest.set_image_status(idx, status)
            if status == "unreadable_image":  # a missing file may come back: do not cache it
                items.append((keys[idx], status, None))
        cache.put_many(items)
        done += len(positions) + len(bad)
        if progress is not None:
            progress(_IMAGE_STAGE, done, total)
    return n_model


def _embed_texts(
    todo: list[str],
    keys: dict[str, str],
    txt_vecs: dict[str, np.ndarray],
    cache: _VectorCache | _NoCache,
    get_model: Callable[[], LoadedModel],
    batch_size: int,
    progress: Callable[[str, int, int], None] | None,
    *,
    total: int,
    done: int,
) -> int:
    if progress is not None:
        progress(_TEXT_STAGE, done, total)
    if not todo:
        return 0
    lm = get_model()
    for start in range(0, len(todo), int(batch_size)):
        chunk = todo[start : start + int(batch_size)]
        vecs = _encode(lm, "encode_text", lm.tokenizer(chunk))
        for t, vec in zip(chunk, vecs, strict=True):
            txt_vecs[t] = vec
        cache.put_many([(keys[t], "ok", v) for t, v in zip(chunk, vecs, strict=True)])
        done += len(chunk)
        if progress is not None:
            progress(_TEXT_STAGE, done, total)
    return len(todo)
