"""SAELens and EleutherAI sparsify files: read and write, exactly.

Both libraries store a folder with ``cfg.json`` and one safetensors file; they differ in names and
layouts (ours follows sparsify's: one row per latent in both encoder and decoder).

=================  ===============================  ===============================  ==========================
                   topotorch (:class:`SparseCoder`)  SAELens 6 (``sae_weights``)      sparsify (``sae``)
=================  ===============================  ===============================  ==========================
encoder            ``W_enc`` [n, d_in]              ``W_enc`` [d_in, n]  (transposed)  ``encoder.weight`` [n, d_in]
encoder bias       ``b_enc`` [n]                    ``b_enc``                          ``encoder.bias``
decoder            ``W_dec`` [n, d_out]             ``W_dec`` [n, d_out]               ``W_dec`` [n, d_in]
decoder bias       ``b_dec`` [d_out]                ``b_dec``                          ``b_dec``
JumpReLU θ         ``threshold`` [n]                ``threshold`` [n]                  —
skip path          ``W_skip`` [d_out, d_in]         ``W_skip`` [d_out, d_in]           ``W_skip`` [d_in, d_in]
=================  ===============================  ===============================  ==========================

Architectures. SAELens ``standard`` = our ``relu``; ``topk`` = ``topk`` (``rescale_acts_by_decoder_norm``
is folded into the weights on read; we write unit-norm decoder rows, so false); ``jumprelu`` = our
``jumprelu`` (SAELens applies ReLU before the θ mask, so θ must be ≥ 0) and also our ``batchtopk`` at
inference (one θ for every latent — SAELens saves its own BatchTopK SAEs exactly this way);
``transcoder``/``skip_transcoder``/``jumprelu_transcoder`` = our ReLU/ReLU+skip/JumpReLU transcoders.
sparsify has only TopK (``activation: "topk"``) SAEs and transcoders with ``d_out = d_in``.
A coder a format cannot express (a TopK transcoder in SAELens, a JumpReLU in sparsify) is refused
with the reason, never silently changed.

Round trips are exact: the tensors are copied bit for bit and our whole :class:`SAEConfig` travels
in the file (SAELens: ``cfg.json`` ``metadata.topotorch``; sparsify: the safetensors metadata), so
ours → SAELens → ours and ours → sparsify → ours give back an identical coder, and sparsify's own
``SparseCoder.load_from_disk`` reads what we write. Two reads are exact only up to rounding:
SAELens files with ``apply_b_dec_to_input: false`` (the b_dec shift is folded into b_enc) and
``rescale_acts_by_decoder_norm: true``. Per-token input normalisation (``constant_norm_rescale``,
``layer_norm``) has no counterpart and is refused.

A bad file (missing file or key, wrong shape, truncated tensor data, unknown architecture) raises
:class:`InteropError` naming the file and the key.

    >>> save_saelens(sae, "out/saelens", hook_name="blocks.1.hook_resid_post")
    >>> sae2 = load_saelens("out/saelens")
    >>> save_sparsify(sae, "out/sparsify")
    ... load_sparsify("out/sparsify")
    >>> load_any("some/folder")  # ours, SAELens or sparsify, by its files
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from topotorch.checkpoint import atomic_write_bytes, atomic_write_json
from topotorch.sae.activations import CacheError, safetensors_header
from topotorch.sae.dictionary import SAEConfig, SparseCoder

SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, CFG = "sae_weights.safetensors", "sae.safetensors", "cfg.json"
SAELENS_VERSION = "6.54.12"  # layout read from sae_lens/saes/*.py (6.18); files checked with the 6.54.12 loader
DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class InteropError(ValueError):
    """A SAELens/sparsify file that cannot be read, or a coder a format cannot express."""


# -- shared helpers --------------------------------------------------------------------------------


def _folded(sae: SparseCoder) -> dict[str, torch.Tensor]:
    """The coder's tensors acting on raw data (data scale folded in, as :meth:`SparseCoder.save` writes them)."""
    if sae.data_scale == (1.0, 1.0):
        return {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    tmp = SparseCoder(sae.cfg, dtype=sae.W_enc.dtype, device="cpu")
    tmp.load_state_dict({k: v.detach().cpu() for k, v in sae.state_dict().items()})
    tmp.data_scale = sae.data_scale
    tmp.fold_data_scale_()
    return {k: v.contiguous() for k, v in tmp.state_dict().items()}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InteropError(f"{path.parent}: missing {path.name}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise InteropError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _key(cfg: dict, key: str, path: Path, kind: type | tuple = int) -> Any:
    if key not in cfg:
        raise InteropError(f"{path}: missing key {key!r}")
    v = cfg[key]
    if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise InteropError(f"{path}: key {key!r} must be a positive integer, got {v!r}")
    return v


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing, truncated or corrupt file names itself."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise InteropError(f"{path.parent}: missing {path.name}")
    try:
        safetensors_header(path)  # checks the header and that every tensor's bytes are present
        return load_file(str(path))
    except CacheError as e:
        raise InteropError(str(e)) from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InteropError(f"{path}: unreadable safetensors file ({' '.join(str(e).split())})") from None


def _metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (already checked readable)."""
    meta = safetensors_header(path)[0].get("__metadata__")
    return meta if isinstance(meta, dict) else {}


def _check(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path, cfg_name: str) -> None:
    """Every expected key present with its shape, nothing unexpected."""
    for k, shape in shapes.items():
        if k not in tensors:
            raise InteropError(f"{path}: missing tensor {k!r} (has {', '.join(sorted(tensors)) or 'none'})")
        if tuple(tensors[k].shape) != shape:
            raise InteropError(
                f"{path}: tensor {k!r} has shape {list(tensors[k].shape)}, {cfg_name} implies {list(shape)}"
            )
        if not tensors[k].is_floating_point():
            raise InteropError(f"{path}: tensor {k!r} has dtype {tensors[k].dtype}, expected a float type")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise InteropError(f"{path}: unexpected tensors {extra} for this {cfg_name}")


def _write(
    folder: str | Path, weights_name: str, tensors: dict[str, torch.Tensor], cfg: dict, metadata: dict[str, str]
) -> Path:
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / weights_name, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    atomic_write_json(folder / CFG, cfg)
    return folder


def _coder(cfg: SAEConfig, state: dict[str, torch.Tensor]) -> SparseCoder:
    dtype = state["W_enc"].dtype
    sae = SparseCoder(cfg, dtype=dtype)
    own = sae.state_dict()
    sae.load_state_dict({k: state[k].to(dtype) if k in state else own[k] for k in own})
    return sae


def _our_cfg(stored: Any, fallback: SAEConfig, path: Path) -> SAEConfig:
    """Our full config stored alongside a foreign one, if it agrees with what the file holds (else the fallback)."""
    if not isinstance(stored, dict):
        return fallback
    try:
        cfg = SAEConfig.from_dict(stored)
    except (TypeError, ValueError):
        return fallback
    same = (cfg.d_in, cfg.n_latents, cfg.out_dim, cfg.skip, cfg.transcoder) == (
        fallback.d_in,
        fallback.n_latents,
        fallback.out_dim,
        fallback.skip,
        fallback.transcoder,
    )
    compatible = cfg.architecture == fallback.architecture or (
        cfg.architecture == "batchtopk" and fallback.architecture == "jumprelu"
    )
    return cfg if same and compatible else fallback


# -- SAELens ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LensArch:
    ours: str
    transcoder: bool
    skip: bool = False
    threshold: bool = False


SAELENS_ARCHITECTURES: dict[str, _LensArch] = {
    "standard": _LensArch("relu", False),
    "topk": _LensArch("topk", False),
    "jumprelu": _LensArch("jumprelu", False, threshold=True),
    "transcoder": _LensArch("relu", True),
    "skip_transcoder": _LensArch("relu", True, skip=True),
    "jumprelu_transcoder": _LensArch("jumprelu", True, threshold=True),
}


def _saelens_name(cfg: SAEConfig) -> str:
    """The SAELens architecture that computes exactly what ``cfg`` does at inference."""
    inference = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
    for name, a in SAELENS_ARCHITECTURES.items():
        if (a.ours, a.transcoder, a.skip) == (inference, cfg.transcoder, cfg.skip):
            return name
    kind = ("skip-" if cfg.skip else "") + ("transcoder" if cfg.transcoder else "SAE")
    raise InteropError(
        f"SAELens has no {cfg.architecture} {kind}; it stores: "
        + ", ".join(
            f"{a.ours}{' skip' if a.skip else ''} {'transcoder' if a.transcoder else 'SAE'}"
            for a in SAELENS_ARCHITECTURES.values()
        )
    )


def save_saelens(
    sae: SparseCoder,
    folder: str | Path,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    **metadata: Any,
) -> Path:
    """Write ``folder/cfg.json`` + ``folder/sae_weights.safetensors`` that SAELens 6 loads with
    ``SAE.load_from_disk(folder)`` and that computes what ``sae`` computes. ``hook_name``/``model_name``
    (and any ``metadata``) go to ``cfg.metadata``.
    Usage: ``save_saelens(sae, "out", hook_name="blocks.1.hook_resid_post")``."""
    cfg = sae.cfg
    arch = _saelens_name(cfg)
    t = _folded(sae)
    if cfg.architecture == "batchtopk" and float(t["threshold"].min()) < 0:
        raise InteropError("this BatchTopK coder has no inference threshold yet (never trained); nothing to save")
    tensors = {"W_enc": t["W_enc"].t().contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if SAELENS_ARCHITECTURES[arch].threshold:
        th = t["threshold"].clamp(min=0) if cfg.architecture == "batchtopk" else t["threshold"]
        if float(th.min()) < 0:
            bad = int(th.argmin())
            raise InteropError(
                f"latent {bad} has a negative JumpReLU threshold {float(th[bad]):g}: SAELens applies a "
                "ReLU before the threshold, so it would compute something else"
            )
        tensors["threshold"] = th
    if cfg.skip:
        tensors["W_skip"] = t["W_skip"]
    out = {
        "d_in": cfg.d_in,
        "d_sae": cfg.n_latents,
        "dtype": DTYPE_NAMES.get(t["W_enc"].dtype, "float32"),
        "device": "cpu",
        "apply_b_dec_to_input": not cfg.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": arch,
        "metadata": {
            "sae_lens_version": SAELENS_VERSION,
            "sae_lens_training_version": SAELENS_VERSION,
            "hook_name": hook_name,
            "model_name": model_name,
            "topotorch": cfg.to_dict(),
            **metadata,
        },
    }
    if arch == "topk":
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    if cfg.transcoder:
        out["d_out"] = cfg.out_dim
    return _write(folder, SAELENS_WEIGHTS, tensors, out, {"format": "pt"})


def read_saelens_cfg(folder: str | Path) -> dict:
    """A SAELens ``cfg.json`` in the 6.x layout (older files — ``hook_point``, ``activation_fn: topk`` — converted),
    with ``hook_name`` at the top level. Usage: ``read_saelens_cfg("sae")["hook_name"]``."""
    path = Path(folder) / CFG
    cfg = _read_json(path)
    raw_meta = cfg.get("metadata")
    meta: dict = raw_meta if isinstance(raw_meta, dict) else {}
    cfg = {**cfg, "metadata": meta}
    cfg["hook_name"] = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if "architecture" not in cfg:  # SAELens < 6
        kw = cfg.get("activation_fn_kwargs") or {}
        topk = (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk" and kw.get("k") is not None
        cfg["architecture"] = "topk" if topk else "standard"
        if topk:
            cfg.setdefault("k", kw["k"])
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    return cfg


def load_saelens(folder: str | Path) -> SparseCoder:
    """Read a SAELens SAE/transcoder folder (``cfg.json`` + ``sae_weights.safetensors``) into a :class:`SparseCoder`.
    Usage: ``sae = load_saelens("gpt2-small-res-jb/blocks.8.hook_resid_pre")``."""
    folder = Path(folder)
    path = folder / CFG
    cfg = read_saelens_cfg(folder)
    name = cfg["architecture"]
    if name not in SAELENS_ARCHITECTURES:
        raise InteropError(
            f"{path}: key 'architecture' is {name!r}, which topotorch cannot represent; "
            f"supported: {', '.join(SAELENS_ARCHITECTURES)}"
        )
    arch = SAELENS_ARCHITECTURES[name]
    d_in, n = _key(cfg, "d_in", path), _key(cfg, "d_sae", path)
    d_out = _key(cfg, "d_out", path) if arch.transcoder else d_in
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in", None):
        raise InteropError(
            f"{path}: key 'normalize_activations' is {norm!r}: a per-token normalisation topotorch's "
            "coders do not apply; fold it into the weights first"
        )
    k = _key(cfg, "k", path) if arch.ours == "topk" else 32
    shapes = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    if arch.threshold:
        shapes["threshold"] = (n,)
    if arch.skip:
        shapes["W_skip"] = (d_out, d_in)
    wpath = folder / SAELENS_WEIGHTS
    t = _read_tensors(wpath)
    _check(t, shapes, wpath, f"{path.name} ({name}, d_in={d_in}, d_sae={n})")
    state = {"W_enc": t["W_enc"].t().contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if arch.threshold:
        state["threshold"] = t["threshold"]
    if arch.skip:
        state["W_skip"] = t["W_skip"]
    if not arch.transcoder and not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes W_enc x + b_enc; ours W_enc (x − b_dec) + b_enc': b_enc' = b_enc + W_enc b_dec
        state["b_enc"] = state["b_enc"] + state["W_enc"] @ state["b_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        norms = state["W_dec"].norm(dim=1)
        state.update(
            W_enc=state["W_enc"] * norms[:, None], b_enc=state["b_enc"] * norms, W_dec=state["W_dec"] / norms[:, None]
        )
    fallback = SAEConfig(
        d_in=d_in,
        n_latents=n,
        architecture=arch.ours,
        k=min(k, n),
        d_out=d_out if arch.transcoder else None,
        skip=arch.skip,
    )
    ours = _our_cfg(cfg["metadata"].get("topotorch"), fallback, path)
    if ours.architecture == "batchtopk":  # our BatchTopK's single θ, as SAELens stores it
        th = state["threshold"]
        if not bool((th == th[0]).all()):
            ours = fallback
    return _coder(ours, state)


# -- sparsify --------------------------------------------------------------------------------------


def save_sparsify(sae: SparseCoder, folder: str | Path) -> Path:
    """Write ``folder/cfg.json`` + ``folder/sae.safetensors`` that ``sparsify.SparseCoder.load_from_disk``
    loads and that computes what ``sae`` computes (TopK SAEs, and TopK transcoders with d_out = d_in).
    Usage: ``save_sparsify(sae, "out/layers.1")``."""
    cfg = sae.cfg
    if cfg.architecture != "topk":
        raise InteropError(f"sparsify stores TopK coders only; this one is {cfg.architecture!r}")
    if cfg.transcoder and cfg.out_dim != cfg.d_in:
        raise InteropError(f"sparsify transcoders map d_in to d_in; this one maps {cfg.d_in} to {cfg.out_dim}")
    t = _folded(sae)
    tensors = {"encoder.weight": t["W_enc"], "encoder.bias": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if cfg.skip:
        tensors["W_skip"] = t["W_skip"]
    out = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.n_latents // cfg.d_in),
        "normalize_decoder": True,
        "num_latents": cfg.n_latents,
        "k": cfg.k,
        "multi_topk": False,
        "skip_connection": cfg.skip,
        "transcode": cfg.transcoder,
        "d_in": cfg.d_in,
    }
    # our full config rides in the safetensors metadata: sparsify's loader ignores it (cfg.json extras it prints)
    return _write(folder, SPARSIFY_WEIGHTS, tensors, out, {"format": "pt", "topotorch": json.dumps(cfg.to_dict())})


def load_sparsify(folder: str | Path) -> SparseCoder:
    """Read a sparsify folder (``cfg.json`` + ``sae.safetensors``) into a :class:`SparseCoder`.
    Usage: ``sae = load_sparsify("EleutherAI/sae-llama-3-8b-32x/layers.10")`` (a local copy)."""
    folder = Path(folder)
    path = folder / CFG
    cfg = _read_json(path)
    d_in = _key(cfg, "d_in", path)
    n = cfg.get("num_latents") or d_in * _key(cfg, "expansion_factor", path)
    if not isinstance(n, int) or n < 1:
        raise InteropError(f"{path}: key 'num_latents' must be a positive integer, got {n!r}")
    k = _key(cfg, "k", path)
    act = cfg.get("activation", "topk")
    if act != "topk":
        raise InteropError(f"{path}: key 'activation' is {act!r}; topotorch reads sparsify's 'topk' coders only")
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    if skip and not transcode:
        raise InteropError(
            f"{path}: key 'skip_connection' is true on an SAE (transcode false): topotorch's skip path "
            "belongs to transcoders"
        )
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    if skip:
        shapes["W_skip"] = (d_in, d_in)
    wpath = folder / SPARSIFY_WEIGHTS
    t = _read_tensors(wpath)
    stored = _metadata(wpath).get("topotorch")
    _check(t, shapes, wpath, f"{path.name} (d_in={d_in}, num_latents={n})")
    state = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if skip:
        state["W_skip"] = t["W_skip"]
    fallback = SAEConfig(d_in=d_in, n_latents=n, architecture="topk", k=k, d_out=d_in if transcode else None, skip=skip)
    try:
        stored_cfg = json.loads(stored) if stored else None
    except json.JSONDecodeError:
        stored_cfg = None
    ours = _our_cfg(stored_cfg, fallback, path)
    if ours.k != k:
        ours = fallback
    return _coder(ours, state)


# -- any format ------------------------------------------------------------------------------------

FORMATS: dict[str, tuple[str, Callable[..., Path], Callable[[str | Path], SparseCoder]]] = {
    "saelens": (SAELENS_WEIGHTS, save_saelens, load_saelens),
    "sparsify": (SPARSIFY_WEIGHTS, save_sparsify, load_sparsify),
    "topotorch": ("weights.safetensors", lambda sae, folder, **kw: sae.save(folder), SparseCoder.load),
}


def detect_format(folder: str | Path) -> str:
    """Which format a coder folder is in, from its weights file name. Usage: ``detect_format("out")``."""
    folder = Path(folder)
    found = [name for name, (weights, _, _) in FORMATS.items() if (folder / weights).is_file()]
    if len(found) != 1:
        raise InteropError(
            f"{folder}: expected exactly one of {', '.join(w for w, _, _ in FORMATS.values())}, found {len(found)}"
        )
    return found[0]


def load_any(folder: str | Path) -> SparseCoder:
    """A coder from a folder in any known format (ours, SAELens, sparsify). Usage: ``load_any("out/saelens")``."""
    return FORMATS[detect_format(folder)][2](folder)


def export(sae: SparseCoder, folder: str | Path, fmt: str, **kwargs: Any) -> Path:
    """Write ``sae`` to ``folder`` in format ``fmt`` (``saelens``, ``sparsify``, ``topotorch``).
    Usage: ``export(sae, "out/saelens", "saelens", hook_name="blocks.1")``."""
    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt == "sparsify":
        kwargs = {}
    return FORMATS[fmt][1](sae, folder, **kwargs)
