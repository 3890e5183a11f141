"""Checkpoints: fastmlr's own format and foreign layouts (the released MCAR code's).

fastmlr format: ``{"format": "fastmlr", "version": 1, "config": model.config, "state_dict": ...}``.
Foreign formats accepted by :func:`load_checkpoint`: ``{"state_dict": ...}`` (the released MCAR code
saves this, possibly from ``nn.DataParallel`` with a ``module.`` prefix on every key) and a bare
state dict. The model's ``remap_checkpoint_keys`` maps foreign key names onto its own.
"""

from __future__ import annotations

import os

import torch
from torch import nn

FORMAT = "fastmlr"
VERSION = 1


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights and ``model.config`` in fastmlr's format."""
    torch.save(
        {"format": FORMAT, "version": VERSION, "config": dict(getattr(model, "config", {})),
         "state_dict": model.state_dict()},
        os.fspath(path),
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, ``module.`` prefixes stripped.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file when it cannot
    be read or holds no state dict.
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
    return state


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint into ``model`` strictly.

    Every key must be present with the right shape: otherwise a ``ValueError`` lists the missing,
    unexpected and mismatching keys (with both shapes), e.g. for another ``num_classes`` or backbone.
    """
    state = model.remap_checkpoint_keys(read_state_dict(path))
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
        raise ValueError(f"checkpoint {os.fspath(path)} does not fit {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state)
    return model
