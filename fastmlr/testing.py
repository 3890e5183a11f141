"""Oracles for checking fastmlr — and a deployment of it — against the released MCAR code.

The released code's global-to-local step, rebuilt from ``shared/docs/mcar-localization.md`` with its
structure and therefore its cost: all C maps upsampled (bilinear, ``align_corners=True``), the
max-marginal profiles, then, in Python, per image and per selected class, the normalisation (§2)
and the interval search one profile at a time (§3: ``sign``, ``nonzero`` and a loop over the
candidate segments), and one ``F.interpolate`` per region (§4). The tests use it as the oracle of
:mod:`fastmlr.kernels` and of :class:`fastmlr.models.mcar.MCAR`; ``bench/bench_g2l.py`` times it as
the released code's step.

The released SSGRL and Deep-LIFT forwards (:func:`released_ssgrl_logits`,
:func:`released_deeplift_logits`), rewritten from their code in its layer order and run on a state
dict in their own key layout: the oracles of those models' released-checkpoint parity tests, with
:func:`random_resnet_state` for a random backbone whose BatchNorm statistics are non-trivial.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastmlr.graph import RANDOM_EMBEDDINGS


def normalise_profile(profile: torch.Tensor) -> torch.Tensor:
    """Doc §2 (MCAR eq. 6): min-max normalisation; a flat profile is divided by its maximum."""
    if profile.max() == profile.min():
        return profile / profile.max()
    return (profile - profile.min()) / (profile.max() - profile.min())


def interval_search_loop(score: torch.Tensor, threshold: float = 0.5) -> tuple[int, int]:
    """Doc §3 on one *normalised* 1-D profile, the released way: tensor ops on the profile, a Python
    loop over the candidate segments. Returns the half-open ``(start, end)``."""
    length = score.shape[0]
    minsize = math.ceil(length * 0.125)
    sign = (score - threshold).sign()
    crossings = ((sign[1:] - sign[:-1]).abs() == 2).nonzero()
    if len(crossings) == 0:
        return math.ceil(length * 0.125), math.ceil(length * 0.875)
    crossings = crossings[:, 0].tolist()
    candidates = ([(0, crossings[0])] if crossings[0] > 0 else []) + [(crossings[-1], length)]
    candidates += list(zip(crossings[:-1], crossings[1:], strict=True))
    best_peak, best_width, lo, hi = 0.0, 0, 0, 0
    for start, end in candidates:
        peak = float(score[start:end].max())
        if peak > best_peak or (peak == best_peak and end - start > best_width):
            best_peak, best_width, lo, hi = peak, end - start, start, end
    if hi - lo <= minsize:  # the three sequential minimum-size checks
        pad = minsize - (hi - lo)
        half = math.ceil(pad / 2.0)
        if lo > half and length - hi > pad:
            lo, hi = lo - half + 1, hi + half
        if lo < half:
            lo, hi = 0, minsize
        if length - hi < half:
            lo, hi = length - minsize + 1, length
    return lo, hi


def released_localize(
    cam_logits: torch.Tensor, global_scores: torch.Tensor, image_size: tuple[int, int], top_n: int,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Boxes ``[B, top_n, 4]`` (x1, y1, x2, y2), half-open, the released way: every map upsampled,
    classes ranked by score (descending, ties to the lower index), Python loops."""
    height, width = image_size
    cams = F.interpolate(torch.sigmoid(cam_logits), size=(height, width), mode="bilinear", align_corners=True)
    x_profiles = F.max_pool2d(cams, (height, 1)).squeeze(2)  # [B, C, W]: max over rows
    y_profiles = F.max_pool2d(cams, (1, width)).squeeze(3)  # [B, C, H]: max over columns
    boxes = torch.zeros(cam_logits.shape[0], top_n, 4, dtype=torch.long)
    for b in range(cam_logits.shape[0]):
        order = global_scores[b].sort(descending=True, stable=True).indices
        for n in range(top_n):
            x1, x2 = interval_search_loop(normalise_profile(x_profiles[b, order[n]]), threshold)
            y1, y2 = interval_search_loop(normalise_profile(y_profiles[b, order[n]]), threshold)
            boxes[b, n] = torch.tensor([x1, y1, x2, y2])
    return boxes


def released_crop_resize(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The released code's crops: a zeroed ``[B, N, 3, H, W]`` batch, each region resized to the input
    size by its own ``F.interpolate`` (bilinear, ``align_corners=True``) and copied in."""
    batch, channels, height, width = images.shape
    local_inputs = images.new_zeros(batch, boxes.shape[1], channels, height, width)
    for b in range(batch):
        for n in range(boxes.shape[1]):
            x1, y1, x2, y2 = boxes[b, n].tolist()
            local_inputs[b, n] = F.interpolate(
                images[b : b + 1, :, y1:y2, x1:x2], size=(height, width), mode="bilinear", align_corners=True
            )[0]
    return local_inputs


def released_global_to_local(
    images: torch.Tensor, cam_logits: torch.Tensor, global_scores: torch.Tensor, top_n: int,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole step: boxes ``[B, top_n, 4]`` and the local stream's inputs ``[B, top_n, 3, H, W]``
    (:func:`released_crop_resize`)."""
    boxes = released_localize(cam_logits, global_scores, tuple(images.shape[-2:]), top_n, threshold)
    return boxes, released_crop_resize(images, boxes)


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batch: torch.Tensor) -> nn.Module:
    """Set every backbone BatchNorm's running statistics to those of ``batch`` (one cumulative pass)
    and return the model in eval mode.

    A freshly initialised backbone in eval mode (running statistics 0 and 1) shrinks its features to
    ~1e-9 (mobilenet_v2), so every image scores the same and per-image bugs pass unseen; after this,
    random-weight outputs depend on the image.
    """
    norms = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.features.train()
    model.features(batch)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def stand_in_label_graph(name: str) -> dict[str, str]:
    """Options giving the model ``name`` seeded random stand-in word embeddings
    (``{"label_embeddings": "random"}``) when it takes word embeddings, else ``{}``: what a test of a
    label-graph model needs at a class count without a packaged graph (80 and 20 have one)."""
    from fastmlr import registry

    registry._import_models()
    if name not in registry._MODELS:
        raise ValueError(f"unknown model {name!r}")
    takes = "label_embeddings" in inspect.signature(registry._MODELS[name].__init__).parameters
    return {"label_embeddings": RANDOM_EMBEDDINGS} if takes else {}


_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def released_resnet_trunk(state_dict: dict[str, torch.Tensor]) -> nn.Sequential:
    """A torchvision ResNet-50 or -101 (depth read from the number of ``layer3`` blocks: 6 or 23) from a
    state dict keyed ``conv1.*`` … ``layer4.*`` (the released codes' backbones, ``fc`` absent), as the
    ``conv1 … layer4`` trunk in eval mode. Built on the meta device and assigned the tensors."""
    import torchvision

    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("layer3.")}
    depth = {6: "resnet50", 23: "resnet101"}.get(len(blocks))
    if depth is None:
        raise ValueError(f"not a ResNet-50/101 state dict: {len(blocks)} layer3 blocks")
    with torch.device("meta"):
        net = getattr(torchvision.models, depth)(weights=None)
    result = net.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"backbone state dict: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return nn.Sequential(*(getattr(net, name) for name in _RESNET_TRUNK)).eval()


def _linear(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state[name + ".weight"], state.get(name + ".bias"))


@torch.no_grad()
def released_ssgrl_logits(
    state: dict[str, torch.Tensor], images: torch.Tensor, word_features: torch.Tensor,
    adjacency: torch.Tensor, time_step: int = 3,
) -> torch.Tensor:
    """The released SSGRL forward (HCPLab-SYSU/SSGRL ``models.py``, ``semantic.py``, ``ggnn.py``,
    ``element_wise_layer.py``) on its own state-dict layout, ``[B, C]`` logits, in its layer order:

    ResNet ``conv1 … layer4`` then ``AvgPool2d(2, 2)``; per position and class
    ``fc_a(fc_3(tanh(fc_1(F_xy) * fc_2(x_c))))``, soft-maxed over the positions, weighting the
    positions' features; ``time_step`` GGNN steps with ``in = adjacency``, ``out = adjacencyᵀ`` whose
    reset gate adds ``fc_eq3_u(h)`` (not ``fc_eq4_u``); ``tanh(fc_output([h ‖ f]))`` and the
    element-wise classifier ``Σ_d x·W + b``. Square inputs only, as the released code.
    """
    trunk = released_resnet_trunk({k[len("resnet_101."):]: v for k, v in state.items() if k.startswith("resnet_101.")})
    fmap = F.avg_pool2d(trunk(images), 2, stride=2)
    batch, dim, size = fmap.shape[0], fmap.shape[1], fmap.shape[3]
    classes = word_features.shape[0]
    # semantic.py: every (position, class) pair, positions in (row, column) order
    positions = fmap.permute(0, 2, 3, 1).reshape(batch * size * size, dim)
    projected = _linear(state, "word_semantic.fc_1", positions)[:, None, :]
    words = _linear(state, "word_semantic.fc_2", word_features)[None, :, :]
    hidden = _linear(state, "word_semantic.fc_3", torch.tanh(projected * words).reshape(-1, projected.shape[-1]))
    coefficient = _linear(state, "word_semantic.fc_a", hidden).reshape(batch, size * size, classes)
    coefficient = torch.softmax(coefficient.transpose(1, 2), dim=2)  # [B, C, HW]
    semantic = (coefficient[..., None] * positions.reshape(batch, 1, size * size, dim)).sum(2)  # [B, C, D]
    # ggnn.py
    nodes = semantic
    for _ in range(time_step):
        av = torch.cat([adjacency @ nodes, adjacency.T @ nodes], dim=2)
        zv = torch.sigmoid(_linear(state, "graph_net.fc_eq3_w", av) + _linear(state, "graph_net.fc_eq3_u", nodes))
        rv = torch.sigmoid(_linear(state, "graph_net.fc_eq4_w", av) + _linear(state, "graph_net.fc_eq3_u", nodes))
        hv = torch.tanh(_linear(state, "graph_net.fc_eq5_w", av) + _linear(state, "graph_net.fc_eq5_u", rv * nodes))
        nodes = (1 - zv) * nodes + zv * hv
    output = torch.tanh(_linear(state, "fc_output", torch.cat([nodes, semantic], dim=2)))
    return (output * state["classifiers.weight"]).sum(2) + state["classifiers.bias"]


@torch.no_grad()
def released_deeplift_logits(
    state: dict[str, torch.Tensor], images: torch.Tensor, word_features: torch.Tensor
) -> torch.Tensor:
    """The released Deep-LIFT forward (yidaiqiushen/Deep-LIFT ``models.py``, ``GCNResnet`` in eval mode)
    on its own state-dict layout, ``[B, C]`` logits, in its layer order:

    ResNet ``features.0 … 7``; ``gen_adj(A)``; the word vectors (one copy per image) through
    ``bn0`` (running statistics); two ``GraphConv``s, each ``ReLU([x ‖ att x] W + b)`` with
    ``att = softmax_j(where(gen_adj(A) > 0, PReLU(f1(x)_i + f2(x)_j), -9e15))`` (``f1``, ``f2`` 1×1
    ``Conv1d``); ``LeakyReLU(0.2)``; ``(x₂ W) F`` viewed as 14×14 (so 448 px inputs only);
    ``AdaptiveAvgPool2d(1) + MaxPool2d(14, 14)``; ``mlp_2`` = Linear, LeakyReLU(0.2), Linear.
    """
    feature = released_features_trunk(state)(images)
    batch = feature.shape[0]
    feature = feature.reshape(batch, feature.shape[1], -1)
    labels = released_deeplift_label_features(state, word_features, batch)  # x₂ W
    classes = labels.shape[1]
    lift = torch.matmul(labels, feature).reshape(batch, classes, 14, 14)
    pooled = (F.adaptive_avg_pool2d(lift, 1) + F.max_pool2d(lift, 14, 14)).reshape(batch, -1)
    return _linear(state, "mlp_2.3", F.leaky_relu(_linear(state, "mlp_2.1", pooled), 0.2))


@torch.no_grad()
def released_deeplift_label_features(
    state: dict[str, torch.Tensor], word_features: torch.Tensor, batch: int = 1
) -> torch.Tensor:
    """The image-independent half of :func:`released_deeplift_logits`: ``x₂ W``, ``[batch, C, D]``
    (the released code computes it once per image, from ``batch`` copies of the word vectors)."""
    A = state["A"]
    D = torch.diag(A.sum(1).pow(-0.5))
    adj = torch.matmul(torch.matmul(A, D).t(), D)  # gen_adj
    classes, dim = word_features.shape
    x = F.batch_norm(word_features[None].expand(batch, classes, dim).reshape(-1, dim),
                     state["bn0.running_mean"], state["bn0.running_var"], training=False)
    x = x.reshape(batch, classes, dim)
    for gc in ("gc1", "gc2"):
        seq = x.transpose(1, 2)
        f1 = F.conv1d(seq, state[f"{gc}.agg.f1.weight"], state[f"{gc}.agg.f1.bias"])
        f2 = F.conv1d(seq, state[f"{gc}.agg.f2.weight"], state[f"{gc}.agg.f2.bias"])
        logits = f1.transpose(2, 1) + f2
        att = torch.where(adj > 0, F.prelu(logits, state[f"{gc}.agg.prelu.weight"]), -9e15 * torch.ones_like(adj))
        aggregated = torch.bmm(torch.softmax(att, dim=2), x)
        x = torch.einsum("bnd,df->bnf", torch.cat([x, aggregated], dim=2), state[f"{gc}.weight"])
        x = F.relu(x + state[f"{gc}.bias"])
    x2 = F.leaky_relu(x, 0.2)
    return torch.matmul(x2, state["W"])


@torch.no_grad()
def random_resnet_state(name: str, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict (``fc`` left out) of a torchvision ResNet ``name`` with random weights, random
    BatchNorm scales and shifts (``U(0.5, 1.5)``, ``N(0, 0.1)``) and, as running statistics, those of
    ``images`` (one cumulative train-mode pass, as :func:`calibrate_batchnorm`): the backbone of a
    random released-layout checkpoint whose features depend on the image."""
    import torchvision

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = getattr(torchvision.models, name)(weights=None)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
            module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            module.reset_running_stats()
            module.momentum = None
    trunk = nn.Sequential(*(getattr(net, stage) for stage in _RESNET_TRUNK)).train()
    trunk(images)
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}


def assert_key_map(
    model: nn.Module, shapes: dict[str, torch.Size], renamed: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Check ``model.remap_checkpoint_keys`` on a released state dict given by its key ``shapes`` (meta
    tensors): the remapped keys are exactly the model's, with its shapes, and each released key of
    ``renamed`` lands, as the same tensor, on the model key it names. Returns the remapped state."""
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    remapped = model.remap_checkpoint_keys(state)
    own = model.state_dict()
    assert remapped.keys() == own.keys(), sorted(set(remapped) ^ set(own))[:8]
    assert all(remapped[k].shape == own[k].shape for k in own)
    for released_key, own_key in renamed.items():
        assert remapped[own_key] is state[released_key], (released_key, own_key)
    return remapped


def released_features_trunk(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """The ResNet trunk of a released checkpoint whose backbone is ``features.0 … features.7``
    (``conv1, bn1, relu, maxpool, layer1 … layer4``: ML-GCN, Deep-LIFT, MCAR), in eval mode."""
    names = dict(enumerate(_RESNET_TRUNK))
    backbone = {}
    for key, value in state.items():
        if key.startswith("features."):
            _, index, rest = key.split(".", 2)
            backbone[f"{names[int(index)]}.{rest}"] = value
    return released_resnet_trunk(backbone)


@torch.no_grad()
def released_mlgcn_logits(
    state: dict[str, torch.Tensor], images: torch.Tensor, word_features: torch.Tensor
) -> torch.Tensor:
    """The released ML-GCN forward (Megvii-Nanjing/ML_GCN ``models.py``, ``GCNResnet``; ``gen_adj`` of
    ``util.py``) on its own state-dict layout, ``[B, C]`` logits, in its layer order:

    ResNet ``features.0 … 7``; ``MaxPool2d(14, 14)`` and flatten (defined for 448 to 864 px: a 14×14
    to 27×27 map, of which it pools the top-left 14×14 block); ``adj = (A D)ᵀ D`` with
    ``D = diag(rowsum(A))^-1/2``; ``x = LeakyReLU_0.2(adj (inp W₁))``, ``x = adj (x W₂)`` (``gc1``,
    ``gc2``: ``weight`` ``[in, out]``, no bias); ``logits = feature xᵀ``.
    """
    feature = F.max_pool2d(released_features_trunk(state)(images), 14, 14)
    feature = feature.reshape(feature.shape[0], -1)
    A = state["A"]
    D = torch.diag(A.sum(1).float().pow(-0.5))
    adj = torch.matmul(torch.matmul(A, D).t(), D)
    x = torch.matmul(adj, torch.matmul(word_features, state["gc1.weight"]))
    x = F.leaky_relu(x, 0.2)
    x = torch.matmul(adj, torch.matmul(x, state["gc2.weight"]))
    return torch.matmul(feature, x.transpose(0, 1))


def logit_layers(model: nn.Module) -> list[nn.Parameter]:
    """The parameters whose scale sets ``model``'s logits linearly: those of its final per-class
    layer(s) (``convclass``; the last layer of ``classifier``; LCE's ``ca_classifier`` and
    ``co_classifier``; ML-GCN's and P-GCN's last graph convolution ``gc2``, which generates or is the
    classifier, and P-GCN's ``bias``). Scaling them by ``s`` scales the logits by ``s`` (for LCE the
    label-wise spatial maximum, also a logit term, is not scaled)."""
    if hasattr(model, "co_classifier"):
        layers = [model.ca_classifier, model.co_classifier]
    elif hasattr(model, "classifier"):
        layers = [[m for m in model.classifier.modules() if getattr(m, "weight", None) is not None][-1]]
    elif hasattr(model, "convclass"):
        layers = [model.convclass]
    elif hasattr(model, "gc2"):
        layers = [model.gc2]
    else:
        raise ValueError(f"no known logit layer in {type(model).__name__}")
    params = [p for layer in layers for p in layer.parameters()]
    if isinstance(getattr(model, "bias", None), nn.Parameter):
        params.append(model.bias)
    return params


@torch.no_grad()
def scale_logits(model: nn.Module, batch: torch.Tensor, logit_std: float = 2.0, steps: int = 3) -> nn.Module:
    """Scale ``model``'s final per-class layer(s) (:func:`logit_layers`) so that its logits on ``batch``
    have standard deviation ``logit_std`` (over images and classes); returns the model in eval mode.

    Random heads give logits of arbitrary size: a random ML-GCN's classifiers are 1280-wide dot products
    (logit std ~10 on mobilenet_v2 at 64 px), so every rounding error of the features moves the
    probabilities by as much, while a random baseline's 1×1 classifier gives std ~0.3, which hides
    drift. Trained multi-label heads give logits of a few units."""
    model.eval()
    for _ in range(steps):
        probs = model(batch)
        probs = probs[0] if isinstance(probs, tuple) else probs
        std = torch.logit(probs.double().clamp(1e-12, 1 - 1e-12)).std().item()
        for param in logit_layers(model):
            param.mul_(logit_std / std)
    return model


#: How reduced-precision fixtures and benchmarks condition random weights
#: (:func:`condition_for_low_precision`): BatchNorm shifts from N(1.5, 0.5²), logits of std 2. With it
#: every registered model validates at int8 and fp16 (``tests/test_export_precision.py`` lists the
#: measured drift per model).
LOW_PRECISION_CONDITIONING = {"shift_mean": 1.5, "shift_std": 0.5, "logit_std": 2.0}


@torch.no_grad()
def condition_for_low_precision(
    model: nn.Module, batch: torch.Tensor, residual_gain: float = 0.2, shift_std: float = 0.0, seed: int = 0,
    logit_std: float | None = None, shift_mean: float = 0.0,
) -> nn.Module:
    """A random-weight model whose reduced-precision drift resembles a trained one's: the last
    BatchNorm of every residual block scaled by ``residual_gain`` (its gamma); with ``shift_mean`` or
    ``shift_std``, every backbone BatchNorm shift (beta) drawn from ``N(shift_mean, shift_std²)``
    (seeded by ``seed``); then :func:`calibrate_batchnorm` on ``batch`` (real images); with
    ``logit_std``, the final per-class layer scaled so the logits on ``batch`` have that standard
    deviation (:func:`scale_logits`). Returns the model in eval mode.

    A freshly initialised residual network adds branches of the same size as the trunk at every
    block, so rounding errors grow with depth far faster than in trained networks, whose residual
    branches are small; without ``residual_gain``, fp16 flips rankings a trained model keeps.

    A random network whose every layer is renormalised (BatchNorm calibrated on real images) is also
    chaotic (Poole et al. 2016, "Exponential expressivity in deep neural networks through transient
    chaos"), while a trained network is stable to small input perturbations (Novak et al. 2018,
    "Sensitivity and generalization in neural networks"). For a pre-activation ``h ~ N(beta, 1)``
    (BatchNorm output) into ReLU6 and a random convolution renormalised by the next BatchNorm, a
    perturbation grows relative to the signal by ``chi = P(0 < h < 6) / Var[relu6(h)]`` in variance
    per layer, because the next BatchNorm removes the mean that ReLU6 adds to the signal but not to
    the perturbation: ``chi`` = 1.51 for beta = 0 (×1.23 in amplitude), 1.20 for beta ~ N(0, 2²),
    1.09 for beta ~ N(1.5, 0.5²) (×1.04; 91% of the units active). Shifts centred at zero also leave
    channels nearly dead on the calibration photos (16% with beta < -2 for N(0, 2²)) that BatchNorm
    blows up on other inputs. Measured on mobilenet_v2 at 64 px, every model's head, 10 classes, the
    packaged photos (ONNX Runtime 1.32): the fp16 error of the last feature map is 1.05% of its
    magnitude unshifted (growing ×1.2 per ReLU6 layer outside the residual blocks, from 0.04% after
    the first convolution) and 0.25% with beta ~ N(1.5, 0.5²); with logits of standard deviation 2,
    the largest fp16 |Δprob| over the eight models falls from 0.028 (Deep-LIFT, unshifted) to 0.0033,
    and the largest INT8 |Δprob| on held-out photos from 0.22 (Deep-LIFT, beta ~ N(0, 2²)) to 0.085
    (ML-GCN).
    ``tests/test_export_precision.py`` (``FIXTURE_CONDITIONING``) lists the figures per model."""
    generator = torch.Generator().manual_seed(seed)
    for norm in model.features.modules():
        if isinstance(norm, nn.BatchNorm2d) and (shift_std or shift_mean):
            norm.bias.copy_(shift_mean + torch.randn(norm.bias.shape, generator=generator) * shift_std)
    for block in model.features.modules():
        residual = type(block).__name__ in ("Bottleneck", "BasicBlock") or getattr(block, "use_res_connect", False)
        if residual:
            norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
            norms[-1].weight.mul_(residual_gain)
    calibrate_batchnorm(model, batch)
    return model if logit_std is None else scale_logits(model, batch, logit_std)
