"""Checks shared by every boundary: model inputs and options, weights, and the output paths of every
command. Each failure is a ``ValueError`` (or ``FileNotFoundError``) naming the problem in one line."""

from __future__ import annotations

import numbers
import os
import pathlib
import tempfile

import torch

#: The backbones' total stride: image heights and widths are positive multiples of it.
BACKBONE_STRIDE = 32


def is_exporting() -> bool:
    """True while torch.jit / dynamo / torch.export traces the code (a value check would break tracing)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def check_image_size(image_size: object, name: str = "image size") -> int:
    """``image_size`` as an int, which must be a positive multiple of :data:`BACKBONE_STRIDE`;
    ``ValueError`` naming ``name`` otherwise (a bool, float or string is not an image size)."""
    valid = isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool)
    if not valid or image_size < BACKBONE_STRIDE or image_size % BACKBONE_STRIDE:
        raise ValueError(
            f"{name} must be a positive multiple of {BACKBONE_STRIDE} (the backbones' stride), got {image_size!r}"
        )
    return int(image_size)


def check_images(
    images: torch.Tensor, image_size: int | None = None, weight_dtype: torch.dtype | None = None
) -> None:
    """Validate a batch of images ``[B, 3, H, W]``.

    Requires a floating tensor with 4 dimensions, 3 channels, a non-empty batch, H and W multiples
    of 32 (the backbones' stride) and finite values (not checked while
    tracing for export or compile). When ``image_size`` is given (models whose
    layer widths depend on it, e.g. LCE), H and W must equal it. When ``weight_dtype`` is given (the
    model's parameters), the images must have that dtype, unless autocast is on for their device
    (which casts inside every op).
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor, got dtype {images.dtype}")
    autocast = torch.is_autocast_enabled(images.device.type)
    if weight_dtype is not None and images.dtype != weight_dtype and not autocast:
        raise ValueError(
            f"images are {images.dtype} but the model's weights are {weight_dtype}: convert the images "
            f"(images.to({weight_dtype})) or the model (model.to({images.dtype}))"
        )
    b, c, h, w = images.shape
    if b == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if c != 3:
        raise ValueError(f"images must have 3 channels, got {c} (shape {tuple(images.shape)})")
    if h % BACKBONE_STRIDE or w % BACKBONE_STRIDE or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of {BACKBONE_STRIDE}, got {h}x{w}")
    if image_size is not None and (h, w) != (image_size, image_size):
        raise ValueError(f"this model is built for {image_size}x{image_size} images, got {h}x{w}")
    if not is_exporting() and not torch.isfinite(images).all():  # a value check cannot be traced or exported
        raise ValueError("images contain NaN or infinite values")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """``ValueError`` naming ``what`` when a floating ``tensor`` holds NaN or infinite values (skipped
    while tracing for export or compile, where a value check cannot run)."""
    if is_exporting() or not tensor.is_floating_point():
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{what} contains {bad} NaN or infinite value{'s' * (bad != 1)}")


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int, which it must be (a Python or numpy integer, not a bool, string or float
    with a fraction), at least ``minimum``; ``ValueError`` naming ``name`` otherwise."""
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_threshold(threshold: float, name: str = "threshold") -> float:
    """``threshold`` must be a real number in the open interval (0, 1)."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"{name} must be a number in (0, 1), got {threshold!r} ({type(threshold).__name__})")
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {threshold}")
    return threshold


def check_topn(topn: int, num_classes: int) -> int:
    """``topn`` must be an integer in 1..num_classes."""
    if isinstance(topn, bool) or not isinstance(topn, numbers.Real) or int(topn) != topn \
            or not 1 <= int(topn) <= num_classes:
        raise ValueError(f"topn must be an integer in 1..{num_classes} (num_classes), got {topn}")
    return int(topn)


def _first_existing(path: pathlib.Path) -> pathlib.Path:
    """``path`` or its nearest existing ancestor (where a missing directory would be created)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(directory: pathlib.Path, option: str, path: pathlib.Path) -> None:
    """A file can be created in ``directory`` (tried, not inferred from permission bits: root ignores
    them, read-only mounts and pseudo file systems do not)."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot write in {directory} ({err.strerror or err})") from None


def _check_creatable(path: pathlib.Path, option: str, create_dirs: bool = True) -> None:
    """``path`` can be created: its nearest existing ancestor is a writable directory (the missing
    directories between are created by the command); without ``create_dirs`` its directory must exist
    (``FileNotFoundError``)."""
    anchor = _first_existing(path.parent)
    if not anchor.is_dir():
        raise ValueError(f"{option} {path}: {anchor} is not a directory")
    if not create_dirs and anchor != path.parent.absolute():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    _check_writable_dir(anchor, option, path)


def check_output_file(
    path: str | os.PathLike, option: str = "--out", overwrite: bool = False, create_dirs: bool = True
) -> pathlib.Path:
    """Check, before any work, that a command can write the file ``path``: it is not a directory, it
    does not exist unless ``overwrite`` (then it must be writable), and its directory exists or (with
    ``create_dirs``) can be created in a writable directory. Returns the path; ``ValueError`` (or
    ``FileNotFoundError`` for a missing directory) naming ``option`` otherwise."""
    out = pathlib.Path(path)
    if out.is_dir():
        raise ValueError(f"{option} {out} is a directory; give a file name")
    if out.exists():
        if not overwrite:
            raise ValueError(f"{option} {out} exists; pass --overwrite to replace it")
        try:
            with open(out, "ab"):  # opened for writing, nothing written
                pass
        except OSError as err:
            raise ValueError(f"{option} {out} exists and cannot be written ({err.strerror or err})") from None
    _check_creatable(out, option, create_dirs)
    return out


def check_output_dir(
    path: str | os.PathLike, option: str = "--out", files: tuple[str, ...] = (), overwrite: bool = False
) -> pathlib.Path:
    """Check, before any work, that a command can write ``files`` (names relative to the directory
    ``path``) into ``path``: it is a writable directory or can be created in one, and none of those
    files exists unless ``overwrite``. Returns the path; ``ValueError`` naming ``option`` otherwise."""
    out = pathlib.Path(path)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{option} {out} is a file; give a directory")
        _check_writable_dir(out, option, out)
    else:
        _check_creatable(out, option)
    for name in files:
        target = out / name
        if target.is_dir():
            raise ValueError(f"{option}: {target} is a directory where a file goes")
        if target.exists() and not overwrite:
            raise ValueError(f"{option}: {target} exists; pass --overwrite to replace it")
    return out


#: Environment variable overriding the memory limit of :func:`check_memory`: bytes, optionally with a
#: K, M, G or T suffix (powers of 1024), or ``none`` for no limit.
MEMORY_LIMIT_ENV = "FASTMLR_MEMORY_LIMIT"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def machine_memory(device: torch.device | str = "cpu") -> int:
    """Total memory of ``device``: the machine's physical memory for CPU tensors, the GPU's for CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_limit(device: torch.device | str = "cpu") -> float:
    """The most bytes one forward may be expected to need on ``device``: ``$FASTMLR_MEMORY_LIMIT`` when
    set (``inf`` for ``none``), else :func:`machine_memory`."""
    text = os.environ.get(MEMORY_LIMIT_ENV, "").strip().upper()
    if not text:
        return float(machine_memory(device))
    if text == "NONE":
        return float("inf")
    number, unit = (text[:-1], text[-1]) if text[-1] in _UNITS else (text, "")
    try:
        return float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{MEMORY_LIMIT_ENV}={text!r}: give bytes with an optional K/M/G/T suffix, or none") from None


def check_memory(needed: float, what: str, device: torch.device | str = "cpu", limit: float | None = None) -> None:
    """``ValueError`` before ``what`` allocates about ``needed`` bytes when that exceeds ``limit``
    (default :func:`memory_limit`): the message gives both and how to override the limit."""
    limit = memory_limit(device) if limit is None else limit
    if needed > limit:
        raise ValueError(
            f"{what} would need about {needed / 2**30:.1f} GiB, more than the {limit / 2**30:.1f} GiB limit "
            f"(this machine's {torch.device(device).type} memory unless {MEMORY_LIMIT_ENV} is set): use a smaller "
            f"batch or image, or raise the limit ({MEMORY_LIMIT_ENV}=64G, or none)"
        )
