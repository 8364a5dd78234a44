"""The paper authors' released mask format: pickles of ``{HF parameter name: numpy bool
array}`` in each HF parameter's own layout (plus an ``orig_model_name`` string), read through a
restricted unpickler that refuses anything else (:func:`load_author_pickle`), and converted to
and from canonical weight masks (:func:`author_dict_to_weight_masks`,
:func:`weight_masks_to_author_dict`)."""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool

from bigram_circuits.errors import MaskError, UnsafeFileError
from bigram_circuits.masks.geometry import ModelGeometry, _matrix_shapes
from bigram_circuits.masks.vocabulary import MaskKey

__all__ = [
    "AUTHOR_NAME_KEY",
    "author_dict_to_weight_masks",
    "author_parameter_names",
    "load_author_pickle",
    "weight_masks_to_author_dict",
]

# The string entry of an authors' mask dict naming the model the masks were made for.
AUTHOR_NAME_KEY = "orig_model_name"

# Fused QKV matrices map to our split q/k/v masks following the layout HF's forward actually uses:
#   GPT-NeoX query_key_value.weight [3*d_model, d_model]: rows grouped per head, (q, k, v) each
#   d_head rows inside a head; GPT-2 c_attn.weight (Conv1D, [d_model, 3*d_model]): columns
#   [q | k | v].


_NEOX = "GPTNeoXForCausalLM"
_GPT2 = "GPT2LMHeadModel"
_LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def author_parameter_names(geometry: ModelGeometry) -> dict[str, str]:
    """HF parameter name per weight mask key (fused QKV: q, k and v map to the same name)."""
    arch = geometry.architecture
    names: dict[str, str] = {}
    for layer in range(geometry.n_layers):
        if arch == _NEOX:
            p = f"gpt_neox.layers.{layer}"
            table = {
                "q": f"{p}.attention.query_key_value.weight",
                "k": f"{p}.attention.query_key_value.weight",
                "v": f"{p}.attention.query_key_value.weight",
                "o": f"{p}.attention.dense.weight",
                "in": f"{p}.mlp.dense_h_to_4h.weight",
                "out": f"{p}.mlp.dense_4h_to_h.weight",
            }
        elif arch == _GPT2:
            p = f"transformer.h.{layer}"
            table = {
                "q": f"{p}.attn.c_attn.weight",
                "k": f"{p}.attn.c_attn.weight",
                "v": f"{p}.attn.c_attn.weight",
                "o": f"{p}.attn.c_proj.weight",
                "in": f"{p}.mlp.c_fc.weight",
                "out": f"{p}.mlp.c_proj.weight",
            }
        elif arch in _LLAMA_LIKE:
            p = f"model.layers.{layer}"
            table = {k: f"{p}.self_attn.{k}_proj.weight" for k in ("q", "k", "v", "o")}
            table.update(
                {
                    "in": f"{p}.mlp.up_proj.weight",
                    "gate": f"{p}.mlp.gate_proj.weight",
                    "out": f"{p}.mlp.down_proj.weight",
                }
            )
        else:
            raise MaskError(
                f"no HF parameter-name mapping for {arch}; authors' mask dicts are supported for "
                "GPT-NeoX, GPT-2 and LLaMA-style models"
            )
        for kind, name in table.items():
            names[str(MaskKey.weight(layer, kind))] = name
    return names


def weight_masks_to_author_dict(
    geometry: ModelGeometry, weight_masks: Mapping[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Canonical weight masks -> ``{HF parameter name: numpy bool array in HF layout}``."""
    g = geometry
    out: dict[str, np.ndarray] = {}
    for key, name in author_parameter_names(g).items():
        mask_key = MaskKey.parse(key)
        kind = mask_key.kind
        mask = weight_masks[key].to(torch.bool).cpu().numpy()
        fused = g.architecture in (_NEOX, _GPT2) and kind in ("q", "k", "v")
        if fused and kind != "q":
            continue  # written together with q
        if fused:
            qkv = [weight_masks[str(MaskKey.weight(mask_key.layer, x))].to(torch.bool).cpu().numpy() for x in "qkv"]
            if g.architecture == _NEOX:
                per_head = np.stack([m.reshape(g.n_heads, g.d_head, g.d_model) for m in qkv], axis=1)
                out[name] = per_head.reshape(3 * g.n_heads * g.d_head, g.d_model)
            else:
                out[name] = np.ascontiguousarray(np.concatenate(qkv, axis=0).T)
        elif g.architecture == _GPT2:
            out[name] = np.ascontiguousarray(mask.T)  # Conv1D stores [in, out]
        else:
            out[name] = mask.copy()
    return out


def author_dict_to_weight_masks(
    geometry: ModelGeometry, author: Mapping[str, np.ndarray]
) -> dict[str, Bool[torch.Tensor, "out in"]]:
    """``{HF parameter name: bool array}`` -> canonical weight masks (inverse of the above)."""
    g = geometry
    names = author_parameter_names(g)
    missing = sorted({n for n in names.values() if n not in author})
    if missing:
        raise MaskError(
            f"mask dict lacks {len(missing)} parameters of this model (e.g. {missing[0]}); "
            "was it made for another model?"
        )

    def fetch(name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.asarray(author[name])
        if arr.shape != shape:
            raise MaskError(f"mask {name} has shape {arr.shape}, expected {shape}; was it made for another model?")
        return arr.astype(bool)

    d_q = g.n_heads * g.d_head
    out: dict[str, torch.Tensor] = {}
    for key, name in names.items():
        kind = MaskKey.parse(key).kind
        if g.architecture == _NEOX and kind in ("q", "k", "v"):
            fused = fetch(name, (3 * d_q, g.d_model)).reshape(g.n_heads, 3, g.d_head, g.d_model)
            arr = fused[:, "qkv".index(kind)].reshape(d_q, g.d_model)
        elif g.architecture == _GPT2 and kind in ("q", "k", "v"):
            i = "qkv".index(kind)
            arr = fetch(name, (g.d_model, 3 * d_q))[:, i * d_q : (i + 1) * d_q].T
        elif g.architecture == _GPT2:
            shape = {"o": (d_q, g.d_model), "in": (g.d_model, g.d_mlp), "out": (g.d_mlp, g.d_model)}[kind]
            arr = fetch(name, shape).T
        else:
            arr = fetch(name, _matrix_shapes(g)[kind])
        out[key] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


# Globals a pickle of plain numpy arrays needs; everything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: np._core.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): lambda: np._core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: np._core.numeric._frombuffer,
}


class _MaskDictUnpickler(pickle.Unpickler):
    """Unpickler that can build only builtin containers/strings and numpy arrays."""

    def __init__(self, handle, label: str):
        super().__init__(handle)
        self._label = label

    def find_class(self, module: str, name: str):
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise UnsafeFileError(
                f"{self._label} asks to load {module}.{name}, which could run code; only mask dicts of "
                "numpy arrays are accepted (re-save it as a dict of numpy bool arrays)"
            )
        return resolve()

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self._label} uses persistent ids; only plain mask dicts are accepted")


def load_author_pickle(path: str | os.PathLike) -> dict:
    """Read an authors'-format mask pickle: a dict of strings to numpy arrays (and the
    ``orig_model_name`` string). Anything else raises ``UnsafeFileError``."""
    path = Path(path)
    if not path.exists():
        raise MaskError(f"mask file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            data = _MaskDictUnpickler(io.BufferedReader(handle), str(path)).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise MaskError(f"{path} is not a readable mask pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise UnsafeFileError(f"{path} holds a {type(data).__name__}, not a dict of masks")
    for key, value in data.items():
        if not isinstance(key, str) or not isinstance(value, (np.ndarray, str)):
            raise UnsafeFileError(
                f"{path} holds {type(value).__name__} under {key!r}; only numpy arrays and strings are accepted"
            )
        if isinstance(value, np.ndarray) and value.dtype == object:
            raise UnsafeFileError(f"{path} holds an object array under {key!r}; only numeric masks are accepted")
    return data
