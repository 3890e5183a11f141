"""Checkpoints: fastmlr's own format and foreign layouts (the released MCAR code's).

fastmlr format: ``{"format": "fastmlr", "version": 1, "config": model.config, "state_dict": ...}``.
The configuration travels with the weights: ``create_model(name, checkpoint=PATH)`` rebuilds the model
with the saved options (see :func:`fastmlr.registry.create_model`). Foreign formats accepted by
:func:`load_checkpoint`: ``{"state_dict": ...}`` (the released MCAR code saves this, possibly from
``nn.DataParallel`` with a ``module.`` prefix on every key) and a bare state dict; they carry no
configuration. The model's ``remap_checkpoint_keys`` maps foreign key names onto its own.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch
from torch import nn

from fastmlr.checks import check_finite

FORMAT = "fastmlr"
VERSION = 1


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights and ``model.config`` in fastmlr's format."""
    torch.save(
        {"format": FORMAT, "version": VERSION, "config": dict(getattr(model, "config", {})),
         "state_dict": model.state_dict()},
        os.fspath(path),
    )


class Checkpoint(NamedTuple):
    """A checkpoint file's content: its tensors (``module.`` prefixes stripped), the configuration
    fastmlr saved with them (``None`` for foreign layouts), and the file it came from."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    path: str


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file (fastmlr's format or a foreign one).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when it cannot
    be read, holds no state dict, has a malformed configuration, or holds a NaN or infinite weight.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ValueError(f"cannot read checkpoint {path} (corrupt or not a torch file): {err}") from err
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    for key, tensor in state.items():
        check_finite(tensor, f"checkpoint {path}: weight {key!r}")
    config = None
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        config = blob.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("name"), str):
            raise ValueError(f"checkpoint {path} is in fastmlr's format but its configuration is malformed")
    return Checkpoint(state, config, path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, ``module.`` prefixes stripped (see :func:`read_checkpoint`)."""
    return read_checkpoint(path).state_dict


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Checkpoint) -> nn.Module:
    """Load a checkpoint (a path or a :class:`Checkpoint` already read) into ``model`` strictly.

    A fastmlr checkpoint must come from the same registered model with the same configuration as
    ``model`` (:func:`check_config`). Every key must be present with the right shape: otherwise a
    ``ValueError`` lists the missing, unexpected and mismatching keys (with both shapes), e.g. for
    another ``num_classes`` or backbone.
    """
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    path = checkpoint.path
    if checkpoint.config is not None:
        check_config(checkpoint, getattr(model, "model_name", type(model).__name__), getattr(model, "config", {}))
    state = model.remap_checkpoint_keys(checkpoint.state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: " + "; ".join(mismatched[:8]))
        if missing:
            parts.append(f"{len(missing)} keys missing from the checkpoint: {missing[:8]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {unexpected[:8]}")
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state)
    return model


#: Options whose content the state dict holds (as buffers) or that only seed the weights: neither
#: applied from a checkpoint's configuration nor compared with it.
STATE_OPTIONS = frozenset({"backbone_weights", "label_embeddings", "adjacency"})


def _same(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    return (os.fspath(a) if isinstance(a, os.PathLike) else a) == (os.fspath(b) if isinstance(b, os.PathLike) else b)


def check_config(checkpoint: Checkpoint, name: str, options: dict[str, Any]) -> None:
    """``ValueError`` when a fastmlr ``checkpoint`` was saved from another registered model than
    ``name``, or when one of ``options`` (a model's configuration or a caller's explicit arguments)
    contradicts the saved value of the same option; the message names both values."""
    saved = checkpoint.config or {}
    if saved.get("name") != name:
        raise ValueError(
            f"checkpoint {checkpoint.path} was saved from model {saved.get('name')!r}, not {name!r}: "
            f"build it with create_model({saved.get('name')!r}, checkpoint=...)"
        )
    for key, value in options.items():
        if key in saved and key != "name" and key not in STATE_OPTIONS and not _same(value, saved[key]):
            raise ValueError(
                f"{key}={value!r} contradicts checkpoint {checkpoint.path}, saved with {key}={saved[key]!r}: "
                f"leave {key} out to use the saved value"
            )


def rename_keys(state_dict: dict[str, torch.Tensor], key_map: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state_dict`` with its keys renamed by ``key_map`` (a released layout's names -> a model's): an
    entry ending in ``"."`` replaces that prefix, any other entry renames one exact key; the first
    matching entry wins, and keys that match none are kept as they are."""
    out = {}
    for key, value in state_dict.items():
        for old, new in key_map.items():
            if key == old or (old.endswith(".") and key.startswith(old)):
                key = new + key[len(old):]
                break
        out[key] = value
    return out
