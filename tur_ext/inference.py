"""Restore images with an exported model (``.pt``/``.pt2``) or a training checkpoint: padding, tiling, blending.

    from tur_ext.inference import load_restorer, restore_files
    restorer = load_restorer("model.pt2")                      # or model.pt, or a training checkpoint / run folder
    restored = restorer(x, tile=256, overlap=32)               # x: (B, 3, H, W) RGB in [0, 1], any H and W
    restore_files("model.pt", ["a.png", "b.jpg"], "out/")      # writes out/a.png, out/b.jpg

The procedure (the C++ runner ``tur-restore`` implements exactly the same; keep the two in step):

1. The image, float32 RGB in [0, 1], is mapped linearly onto the model's ``value_range`` (its input range) and put in
   its ``channel_order`` (metadata; :mod:`tur_ext.models.value_range`).
2. It is reflect-padded on the bottom and right to multiples of ``m = size_multiple``, and to at least ``min_size``
   (:func:`tur_ext.models.pad_to_multiple`: mirror without repeating the edge, mirroring back and forth where the
   pad is longer than the image, a side of 1 pixel is repeated).
3. Without ``tile`` the model runs once on the padded image. With ``tile = T`` and ``overlap = O``, along each padded
   side of length ``L`` separately:

   * ``t = min(floor(T / m) * m, L)`` is the tile length (``T >= max(m, min_size)`` is required);
     ``O`` defaults to ``min(32, floor(T / m) * m // 2)`` and must satisfy ``0 <= O < floor(T / m) * m``;
   * the tiles start at ``start_i = min(i * (t - O), L - t)`` for ``i = 0 .. n - 1``, where ``n = 1`` if
     ``L <= t``, else ``n = ceil((L - t) / (t - O)) + 1`` (the last tile is moved back to end at ``L``);
   * a tile pixel at offset ``i`` (0-based) along the side has weight ``w(i) = min(i + 1, t - i, O + 1) / (O + 1)``
     (a linear ramp over the overlap, 1 inside) when ``n > 1``, and ``w(i) = 1`` when ``n == 1``;
   * a tile's weight is ``w_y(i) * w_x(j)``; the result is ``sum(w * tile_output) / sum(w)`` over the tiles that
     cover a pixel, accumulated in float32, tiles visited row by row (top to bottom, then left to right).

   When one tile covers both sides (``n == 1`` for both) the model runs once on the whole padded image.
4. The result is cropped back to the input size, mapped back from the model's ``output_range`` (``value_range`` where
   the metadata has none) to RGB in [0, 1] and clamped to [0, 1].

Files: 8- and 16-bit PNG/JPEG/TIFF (and the other formats :mod:`tur_ext.data.io` reads), gray promoted to RGB. The
result is written as 16-bit when the input was 16-bit and the output format holds 16 bits (PNG, TIFF), else 8-bit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from .export import ExportedModel, artifact_kind, build_metadata, load_exported, prepare_for_export
from .models import crop_to, from_model_range, pad_to_multiple, to_model_range
from .models.value_range import check_value_range

__all__ = [
    "DEFAULT_OVERLAP",
    "Restorer",
    "blend_weights",
    "load_restorer",
    "output_bit_depth",
    "resolve_tiling",
    "restore_files",
    "run_tiled",
    "tile_starts",
]

PathLike = Union[str, os.PathLike]

#: The overlap when only ``tile`` is given (reduced to half the tile for tiles under 64 pixels).
DEFAULT_OVERLAP = 32
#: Output formats that hold 16-bit samples.
SIXTEEN_BIT_FORMATS = (".png", ".tif", ".tiff")


# --- the tiling rule ----------------------------------------------------------------------------------------------

def resolve_tiling(tile: Optional[int], overlap: Optional[int], multiple: int, min_size: int = 1
                   ) -> Optional[Tuple[int, int]]:
    """``(tile, overlap)`` after the rule's rounding and defaults, or ``None`` without tiling; ValueError if invalid.

    ``tile`` is rounded down to a multiple of ``multiple`` (it must be at least ``multiple`` and ``min_size``, the
    model's smallest input); ``overlap`` defaults to ``min(DEFAULT_OVERLAP, tile // 2)`` and must be in ``[0, tile)``.
    """
    for name, value in (("tile", tile), ("overlap", overlap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if tile is None:
        if overlap is not None:
            raise ValueError("overlap: only meaningful together with tile")
        return None
    if tile < multiple:
        raise ValueError(f"tile: {tile} is smaller than the model's size multiple {multiple}; expected a tile of at "
                         f"least {multiple} pixels")
    if tile < min_size:
        raise ValueError(f"tile: {tile} is smaller than the model's smallest input {min_size}; expected a tile of at "
                         f"least {min_size} pixels")
    t = tile // multiple * multiple
    if overlap is None:
        overlap = min(DEFAULT_OVERLAP, t // 2)
    if not 0 <= overlap < t:
        raise ValueError(f"overlap: expected 0 <= overlap < tile ({t} after rounding tile {tile} down to a multiple "
                         f"of {multiple}), got {overlap}")
    return t, overlap


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of the tiles along a side of ``length`` (see the module notes); the tile is ``min(tile, L)``."""
    t = min(tile, length)
    if length <= t:
        return [0]
    stride = t - overlap
    n = -(-(length - t) // stride) + 1
    return [min(i * stride, length - t) for i in range(n)]


def blend_weights(size: int, overlap: int, count: int) -> Tensor:
    """The float32 weights ``w(i)`` of one tile of ``size`` pixels along a side covered by ``count`` tiles."""
    if count == 1:
        return torch.ones(size, dtype=torch.float32)
    i = torch.arange(size, dtype=torch.int64)
    ramp = torch.minimum(torch.minimum(i + 1, size - i), torch.tensor(overlap + 1))
    return ramp.to(torch.float32) / float(overlap + 1)


def run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int) -> Tensor:
    """Run ``fn`` over tiles of the (already padded) ``x`` of shape (B, C, H, W) and blend (module notes, step 3).

    ``tile`` must be a multiple of the model's size multiple, as must H and W, so every tile is a valid input.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x)
    wy = blend_weights(th, overlap, len(ys)).to(x.device)
    wx = blend_weights(tw, overlap, len(xs)).to(x.device)
    weight = wy[:, None] * wx[None, :]
    acc: Optional[Tensor] = None
    wsum = torch.zeros(h, w, dtype=torch.float32, device=x.device)
    for y0 in ys:
        for x0 in xs:
            out = fn(x[..., y0:y0 + th, x0:x0 + tw]).float()
            if acc is None:
                acc = torch.zeros(out.shape[0], out.shape[1], h, w, dtype=torch.float32, device=x.device)
            acc[..., y0:y0 + th, x0:x0 + tw] += out * weight
            wsum[y0:y0 + th, x0:x0 + tw] += weight
    assert acc is not None
    return acc / wsum


# --- restorers ----------------------------------------------------------------------------------------------------

class _EagerModel:
    """A checkpoint's backbone behind the same call contract as :class:`~tur_ext.export.ExportedModel`."""

    def __init__(self, net: nn.Module):
        param = next(net.parameters())
        self.net = net
        self.device = param.device
        self.dtype = param.dtype
        self.size_multiple = int(net.size_multiple)

    def __call__(self, x: Tensor) -> Tensor:
        self.net.check_input(x)
        with torch.inference_mode():
            return self.net(x.to(device=self.device, dtype=self.dtype))


class Restorer:
    """A model plus its metadata: ``restorer(x, tile=..., overlap=...)`` restores RGB images in [0, 1]."""

    def __init__(self, model: Callable[[Tensor], Tensor], metadata: Dict[str, Any], device: torch.device):
        self.model = model
        self.metadata = metadata
        self.device = device
        self.size_multiple = int(metadata["size_multiple"])
        self.min_size = int(metadata.get("min_size", self.size_multiple))
        self.value_range = check_value_range(metadata.get("value_range", (0.0, 1.0)), "metadata: value_range")
        self.output_range = check_value_range(metadata.get("output_range", self.value_range),
                                              "metadata: output_range")
        order = str(metadata.get("channel_order", "RGB")).upper()
        if order not in ("RGB", "BGR"):
            raise ValueError(f"metadata: channel_order must be RGB or BGR, got {order!r}")
        self.channel_order = order

    def __repr__(self) -> str:
        return (f"Restorer({self.metadata.get('artifact')}, arch={self.metadata.get('arch')}, "
                f"size_multiple={self.size_multiple}, device={self.device})")

    def _to_model(self, x: Tensor) -> Tensor:
        x = to_model_range(x, self.value_range)
        return x.flip(1) if self.channel_order == "BGR" else x

    def _from_model(self, y: Tensor) -> Tensor:
        y = y.float()
        if self.channel_order == "BGR":
            y = y.flip(1)
        return from_model_range(y, self.output_range).clamp_(0.0, 1.0)

    def __call__(self, x: Tensor, *, tile: Optional[int] = None, overlap: Optional[int] = None) -> Tensor:
        """Restore ``x`` (B, 3, H, W), RGB float in [0, 1], any H and W; the result is float32 on ``self.device``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected shape (B, 3, H, W), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected float values in [0, 1], got {x.dtype}")
        tiling = resolve_tiling(tile, overlap, self.size_multiple, self.min_size)
        with torch.inference_mode():
            x = self._to_model(x.to(device=self.device, dtype=torch.float32))
            padded, size = pad_to_multiple(x, self.size_multiple, min_size=self.min_size)
            if tiling is None:
                out = self.model(padded)
            else:
                out = run_tiled(self.model, padded, *tiling)
            return self._from_model(crop_to(out, size))

    def restore_image(self, image: np.ndarray, *, tile: Optional[int] = None,
                      overlap: Optional[int] = None) -> np.ndarray:
        """Restore one (H, W, 3) float RGB image in [0, 1] (as :func:`tur_ext.data.io.read_image` returns)."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected an (H, W, 3) array, got {getattr(image, 'shape', type(image))}")
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        y = self(x, tile=tile, overlap=overlap)
        return y[0].permute(1, 2, 0).cpu().numpy()


    def restore_file_pixels(self, pixels: np.ndarray, depth: int, *, tile: int, overlap: Optional[int] = None,
                            source: PathLike = "image") -> np.ndarray:
        """Tiled restoration of decoded file samples (:func:`tur_ext.data.io.read_file_pixels`) straight to the
        samples of the output file ((H, W, 3) BGR, uint8 or uint16 for ``depth`` 8 or 16), in bounded memory.

        The result equals ``to_file_pixels(restore_image(read_image(file), tile=..), depth)`` bit for bit, but
        neither the float image nor its padding is ever built: each tile is gathered from ``pixels`` through the
        padding's index maps and converted alone, and the blend is accumulated one row of tiles at a time (a band of
        ``3 x tile x padded width`` floats), the rows no later tile touches being finished and written out. Memory:
        the input and output samples plus one band and one tile in float. Raises FloatingPointError on non-finite
        model outputs (``source`` names the image)."""
        from .data.io import to_float_rgb
        from .models.padding import padded_size, source_index

        tiling = resolve_tiling(tile, overlap, self.size_multiple, self.min_size)
        assert tiling is not None
        t, o = tiling
        h, w = int(pixels.shape[0]), int(pixels.shape[1])
        ph, pw = padded_size(h, w, self.size_multiple, min_size=self.min_size)
        rows, cols = source_index(h, ph).numpy(), source_index(w, pw).numpy()
        ys, xs = tile_starts(ph, t, o), tile_starts(pw, t, o)
        th, tw = min(t, ph), min(t, pw)
        weight = blend_weights(th, o, len(ys))[:, None] * blend_weights(tw, o, len(xs))[None, :]
        out = np.empty((h, w, 3), dtype=np.uint8 if depth == 8 else np.uint16)
        acc = torch.zeros(1, 3, th, pw, dtype=torch.float32)
        wsum = torch.zeros(th, pw, dtype=torch.float32)
        with torch.inference_mode():
            for k, y0 in enumerate(ys):
                for x0 in xs:
                    raw = pixels[rows[y0:y0 + th]][:, cols[x0:x0 + tw]]
                    x = torch.from_numpy(to_float_rgb(raw, source)).permute(2, 0, 1)[None]
                    y = self.model(self._to_model(x.to(self.device))).float().cpu()
                    acc[..., x0:x0 + tw] += y * weight
                    wsum[:, x0:x0 + tw] += weight
                # Rows above the next band's start are final; the rest carry over into the next band.
                done = (ys[k + 1] if k + 1 < len(ys) else y0 + th) - y0
                self._finish_rows(acc[..., :done, :] / wsum[:done], out, y0, source)
                keep = th - done
                acc[..., :keep, :] = acc[..., done:, :].clone()
                acc[..., keep:, :] = 0
                wsum[:keep] = wsum[done:].clone()
                wsum[keep:] = 0
        return out

    def non_finite_error(self, source: PathLike) -> FloatingPointError:
        """The error for a model output with NaN or inf (a damaged model: never write a silently black image)."""
        return FloatingPointError(f"model {self.metadata.get('arch')} ({self.metadata.get('artifact')}) produced "
                                  f"non-finite values for {str(source)!r}; nothing written for it")

    def _finish_rows(self, band: Tensor, out: np.ndarray, y0: int, source: PathLike) -> None:
        h, w = out.shape[:2]
        band = band[..., :max(0, min(band.shape[-2], h - y0)), :w]
        if band.shape[-2] == 0:
            return
        if not torch.isfinite(band).all():
            raise self.non_finite_error(source)
        rgb = self._from_model(band)[0].permute(1, 2, 0).numpy()
        out[y0:y0 + rgb.shape[0]] = to_file_pixels(rgb, 8 if out.dtype == np.uint8 else 16)[:, :, ::-1]


def load_restorer(path: PathLike, *, device: Union[str, torch.device] = "cpu", half: bool = False,
                  use_ema: bool = True) -> Restorer:
    """A :class:`Restorer` for a TorchScript ``.pt``, an AOTInductor ``.pt2``, a training checkpoint or a run folder.

    Checkpoints run eagerly (their uncertainty head stripped; ``params_ema`` unless ``use_ema=False``).
    """
    from .export import model_from_checkpoint

    p = Path(path)
    kind = "checkpoint" if p.is_dir() else artifact_kind(p)
    if kind == "checkpoint":
        model, tasks = model_from_checkpoint(p, use_ema=use_ema)
        net = prepare_for_export(model, device=device, half=half)
        meta = build_metadata(net, artifact="eager", tasks=tasks)
        return Restorer(_EagerModel(net), meta, next(net.parameters()).device)
    exported: ExportedModel = load_exported(p, device=device, half=half)
    return Restorer(exported, exported.metadata, exported.device)


# --- files --------------------------------------------------------------------------------------------------------

def _source_bit_depth(path: Path) -> int:
    """8 or 16: the sample depth of an image file (read from the PNG header, else by decoding)."""
    import cv2

    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 25:
        return 16 if head[24] == 16 else 8
    if head[:3] == b"\xff\xd8\xff":  # JPEG is 8-bit here
        return 8
    img = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    return 16 if img is not None and img.dtype == np.uint16 else 8


def output_bit_depth(source: PathLike, output: PathLike) -> int:
    """16 when ``source`` holds 16-bit samples and ``output``'s format can store them, else 8."""
    if Path(output).suffix.lower() not in SIXTEEN_BIT_FORMATS:
        return 8
    return _source_bit_depth(Path(source))


def to_file_pixels(image: np.ndarray, depth: int) -> np.ndarray:
    """Float RGB in [0, 1] -> uint8 or uint16 samples: ``round(clip(x, 0, 1) * (2**depth - 1))``, ties to even."""
    scale = np.float32(255.0 if depth == 8 else 65535.0)
    out = np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * scale)
    return out.astype(np.uint8 if depth == 8 else np.uint16)


def _is_allocation_failure(exc: BaseException) -> bool:
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


#: Output formats that keep an alpha channel (the input's is carried over unchanged).
ALPHA_FORMATS = (".png", ".tif", ".tiff", ".webp")


def _with_alpha(pixels: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """The restored BGR samples plus the input's alpha, rescaled to the output's sample depth (8 <-> 16 bit by 257,
    float alpha as the colour: ``round(clip(a, 0, 1) * max)``); the C++ runner does the same."""
    alpha = raw[:, :, -1]
    if alpha.dtype.kind == "f":
        alpha = to_file_pixels(alpha, 16 if pixels.dtype == np.uint16 else 8)
    elif alpha.dtype != pixels.dtype:
        alpha = (alpha.astype(np.uint32) * 257).astype(np.uint16) if pixels.dtype == np.uint16 else \
            np.round(alpha.astype(np.float64) / 257.0).astype(np.uint8)
    return np.dstack([pixels, alpha])


def restore_files(model: Union[PathLike, Restorer], images: Sequence[PathLike], out_dir: PathLike, *,
                  tile: Optional[int] = None, overlap: Optional[int] = None,
                  device: Union[str, torch.device] = "cpu", half: bool = False,
                  progress: Optional[Callable[[Path, Path], None]] = None, keep_going: bool = False,
                  log: Callable[[str], None] = print) -> List[Path]:
    """Restore each image file into ``out_dir/<its file name>``; returns the written paths.

    Refuses (before restoring anything) two inputs with the same file name and an output that would overwrite its
    input. ``progress(input, output)`` is called after each file. With ``tile``, memory stays bounded (see
    :meth:`Restorer.restore_file_pixels`). An alpha channel is kept where the output format holds one (the
    input's alpha, unchanged), else its drop is said once. ``keep_going``: an unreadable image is reported through
    ``log`` and skipped, and a summary error lists the skipped files at the end (nothing is lost of the others).
    """
    from .data.io import ImageReadError, read_file_pixels, to_float_rgb, write_file_pixels

    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        raise TypeError("images: expected a list of image paths")
    if not images:
        raise ValueError("images: expected at least one image path")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a folder")
    targets: Dict[str, Path] = {}
    for src in map(Path, images):
        if src.is_dir():
            raise ValueError(f"images: {str(src)!r} is a folder; pass image files (e.g. {str(src / '*.png')!r})")
        if not src.is_file():
            raise FileNotFoundError(f"images: no such file {str(src)!r}")
        if src.name in targets:
            raise ValueError(f"images: {str(targets[src.name])!r} and {str(src)!r} would both be written to "
                             f"{str(out / src.name)!r}")
        if (out / src.name).exists() and (out / src.name).resolve() == src.resolve():
            raise ValueError(f"out: writing {str(out / src.name)!r} would overwrite the input image")
        targets[src.name] = src
    restorer = model if isinstance(model, Restorer) else load_restorer(model, device=device, half=half)
    resolve_tiling(tile, overlap, restorer.size_multiple, restorer.min_size)  # a bad tile fails before any file is written
    written, failed, alpha_dropped = [], [], False
    for src in targets.values():
        dst = out / src.name
        depth = output_bit_depth(src, dst)
        try:
            raw = read_file_pixels(src)
        except ImageReadError as exc:
            if not keep_going:
                raise
            log(f"[tur] skipped {src}: {exc.reason}")
            failed.append(str(src))
            continue
        try:
            if tile is not None:  # bounded memory: uint samples in and out, one band of tiles in float
                pixels = restorer.restore_file_pixels(raw, depth, tile=tile, overlap=overlap, source=src)
            else:
                restored = restorer.restore_image(to_float_rgb(raw, src))
                if not np.isfinite(restored).all():
                    raise restorer.non_finite_error(src)
                pixels = np.ascontiguousarray(to_file_pixels(restored, depth)[:, :, ::-1])
        except (MemoryError, RuntimeError) as exc:  # numpy's MemoryError; torch's allocators raise RuntimeError
            if not isinstance(exc, MemoryError) and not _is_allocation_failure(exc):
                raise
            h, w = raw.shape[:2]
            hint = "; use a smaller --tile" if tile is not None else " whole; use --tile 512 (memory then grows " \
                                                                      "with the tile, not the image)"
            raise MemoryError(f"{src}: not enough memory to restore its {w}x{h} pixels{hint}") from None
        if raw.ndim == 3 and raw.shape[2] in (2, 4):  # gray + alpha, BGR + alpha
            if dst.suffix.lower() in ALPHA_FORMATS:
                pixels = _with_alpha(pixels, raw)
            elif not alpha_dropped:
                log(f"[tur] note: {src} has an alpha channel, which {dst.suffix} files cannot hold; written without "
                    f"it (use .png to keep it)")
                alpha_dropped = True
        del raw
        write_file_pixels(dst, pixels)
        written.append(dst)
        if progress is not None:
            progress(src, dst)
    if failed:
        raise ValueError(f"images: {len(failed)} of {len(targets)} could not be read and were skipped "
                         f"({', '.join(failed[:3])}{', ...' if len(failed) > 3 else ''}); the other {len(written)} "
                         f"were restored into {str(out)!r}")
    return written
