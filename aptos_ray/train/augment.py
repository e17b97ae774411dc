"""The device-side data path: uint8 batches to the device, then batched augmentation there.

The CPU only stacks a batch of stored uint8 images (``to_device``, ``prefetch_to_device``, which
readies the next batches in a background thread while the current one computes); crop, flips, rotation, zoom,
resize to the model size, brightness/contrast and normalisation run here as a few batched tensor
ops on whatever device the batch is on (the worker's GPU, or the CPU without one).

Why hand-written rather than torchvision.transforms.v2 or kornia (measured side by side in
benchmarks/bench_augment.py): v2 applied to a batch tensor draws ONE set of random parameters for
the whole batch (every image gets the same crop and rotation), so per-image randomness needs a
Python loop over the images, which is the path this replaces. kornia draws per-image parameters
but warps the batch once per geometric op. Here crop, flips, rotation and the resize to the model
size compose into one 2x3 matrix per image, applied by a single ``grid_sample``: one resampling
(sharper than several), one pass over the pixels, every image its own parameters.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's adjust_contrast uses
# data.colour=camera: the extra colour jitter for photographs from other cameras (another clinic's
# images lost grade-0 recall to a colour/exposure shift); ranges of common fundus cameras'
# differences in white balance and exposure curve, not tuned on a split
CAMERA = {"channel_gain": 0.1, "gamma": 0.3}


def to_device(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> the same uint8 tensor on ``device``; pinned and copied asynchronously to a GPU."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if device.type == "cuda":
        if not x.is_pinned():
            x = x.pin_memory()
        return x.to(device, non_blocking=True)
    return x.to(device)


def prefetch_to_device(batches: Iterable[tuple[np.ndarray, np.ndarray]], device: torch.device,
                       depth: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """(uint8 NHWC images, grades) -> (images on ``device``, grades on ``device``, grades as numpy).

    With ``depth`` > 0 a background thread pulls the next ``depth`` batches from ``batches`` (Parquet
    or Ray Data reads, decoding, resampling) and pins them while the caller computes; the copies to
    the GPU are issued here, non-blocking, so they queue behind the current step. The thread only
    runs numpy and pinning: the training thread keeps torch's random state and every CUDA call.
    """
    if depth <= 0:
        for images, grades in batches:
            yield _upload(_host(images, grades, device), device)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for images, grades in batches:
                if not put(_host(images, grades, device)):
                    return
            put(_DONE)
        except BaseException as error:  # raised again in the training thread
            put(error)

    threading.Thread(target=produce, name="prefetch_to_device", daemon=True).start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield _upload(item, device)
    finally:
        stop.set()  # the consumer stopped early (an error, a break): let the thread end


_DONE = object()


def _host(images: np.ndarray, grades: np.ndarray, device: torch.device):
    x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(np.asarray(grades, dtype=np.int64))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    return x, y, np.asarray(grades)


def _upload(item, device: torch.device):
    x, y, grades = item
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), grades


class GradeTransforms:
    """uint8 NHWC images (tensor on any device, or numpy) -> normalised float NCHW at the model size.

    Size, mean and std come from the model (``model.factory.model_data_config``). Augmentation is drawn
    per image: fundus photos have no canonical orientation, so any rotation and both flips are
    fair; a mild zoom/crop (RandomResizedCrop's scale and ratio) and brightness/contrast cover
    camera and exposure variation (``CAMERA`` adds colour response and white balance). Everything
    outside the rotated image is black, like the fundus background.
    """

    def __init__(self, size: int, mean, std, augment: bool = True, scale=(0.85, 1.0), ratio=(0.9, 1.1),
                 degrees: float = 180.0, brightness: float = 0.2, contrast: float = 0.2,
                 channel_gain: float = 0.0, gamma: float = 0.0):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.augment = augment
        self.scale, self.ratio, self.degrees = scale, ratio, degrees
        self.brightness, self.contrast = brightness, contrast
        self.channel_gain, self.gamma = channel_gain, gamma
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # --- the two entry points -----------------------------------------------------------------

    def train(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if not self.augment:
            return self.eval(images)
        x = self._shrink(as_float_nchw(images))
        n, _, h, w = x.shape
        theta, colour = self._to_device(x.device, self.random_affine(n, h, w), self.colour_factors(n))
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return self._normalise(self.apply_colour(x, colour))

    def eval(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = as_float_nchw(images)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self._normalise(x)

    # --- parts --------------------------------------------------------------------------------

    def random_affine(self, n: int, h: int, w: int) -> torch.Tensor:
        """(n, 2, 3) matrices mapping output to input coordinates (affine_grid's convention, [-1, 1]).

        input = centre + crop_scale @ flip @ rotation @ output: the output square shows a random
        crop (area fraction ``scale``, aspect ``ratio``, as RandomResizedCrop), flipped, rotated
        about its centre. Parameters come from torch's global generator, on the CPU (a few numbers).
        """
        area = torch.empty(n).uniform_(*self.scale)
        aspect = torch.empty(n).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).exp()
        # crop side as a fraction of the image side, from its area and pixel aspect ratio (w/h)
        crop_w = (area * aspect * h / w).sqrt().clamp(max=1.0)
        crop_h = (area / aspect * w / h).sqrt().clamp(max=1.0)
        centre_x = (1 - crop_w) * torch.empty(n).uniform_(-1, 1)
        centre_y = (1 - crop_h) * torch.empty(n).uniform_(-1, 1)
        flip_x = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        flip_y = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        angle = torch.empty(n).uniform_(-self.degrees, self.degrees) * (math.pi / 180)
        cos, sin = angle.cos(), angle.sin()
        sx, sy = crop_w * flip_x, crop_h * flip_y
        return torch.stack([
            torch.stack([sx * cos, -sx * sin, centre_x], dim=1),
            torch.stack([sy * sin, sy * cos, centre_y], dim=1),
        ], dim=1)

    def random_colour(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness then contrast, one factor each per image (ColorJitter's ranges), kept in [0, 255].
        With ``gamma`` / ``channel_gain`` (data.colour=camera) first another camera's response: an
        exposure curve 255 (x / 255) ** g, g log-uniform in [1 / (1 + gamma), 1 + gamma], and a gain
        per channel (white balance, sensor) in 1 +- channel_gain. Black stays black.
        """
        (colour,) = self._to_device(x.device, self.colour_factors(x.shape[0]))
        return self.apply_colour(x, colour)

    def colour_factors(self, n: int) -> dict[str, torch.Tensor]:
        """``random_colour``'s per-image factors, drawn on the CPU from torch's global generator."""
        factors = {}
        if self.gamma:
            log_g = math.log(1 + self.gamma)
            factors["gamma"] = torch.empty(n, 1, 1, 1).uniform_(-log_g, log_g).exp()
        if self.channel_gain:
            factors["gain"] = torch.empty(n, 3, 1, 1).uniform_(1 - self.channel_gain, 1 + self.channel_gain)
        factors["brightness"] = torch.empty(n, 1, 1, 1).uniform_(1 - self.brightness, 1 + self.brightness)
        factors["contrast"] = torch.empty(n, 1, 1, 1).uniform_(1 - self.contrast, 1 + self.contrast)
        return factors

    def apply_colour(self, x: torch.Tensor, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """In place: on the CPU every pass over a batch of 224 px floats costs as much as the warp."""
        if "gamma" in factors:
            x = x.div_(255).pow_(factors["gamma"]).mul_(255)
        if "gain" in factors:
            x = x.mul_(factors["gain"]).clamp_(0, 255)
        c = factors["contrast"]
        x = x.mul_(factors["brightness"]).clamp_(0, 255)
        # contrast blends with the image's mean grey level (the mean of the luma = luma of the means)
        grey = (x.mean((2, 3)) @ self._constants(x.device)[2]).view(-1, 1, 1, 1)
        return x.mul_(c).add_((1 - c) * grey).clamp_(0, 255)

    @staticmethod
    def _to_device(device: torch.device, *parts):
        """CPU tensors (or dicts of them) -> the same on ``device`` in ONE host-to-device copy: each small
        copy to a GPU is a separate transfer the training step waits behind."""
        if device.type == "cpu":
            return parts
        flat = [t for part in parts for t in (part.values() if isinstance(part, dict) else [part])]
        packed = torch.cat([t.reshape(-1) for t in flat]).to(device, non_blocking=True)
        pieces = iter(packed.split([t.numel() for t in flat]))
        out = []
        for part in parts:
            if isinstance(part, dict):
                out.append({k: next(pieces).view(v.shape) for k, v in part.items()})
            else:
                out.append(next(pieces).view(part.shape))
        return out

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """255 * mean, 255 * std and the luma weights on ``device``, copied there once."""
        if device not in self._on_device:
            self._on_device[device] = (255 * self.mean.to(device), 255 * self.std.to(device),
                                       torch.tensor(GRAY, device=device))
        return self._on_device[device]

    def _shrink(self, x: torch.Tensor) -> torch.Tensor:
        """Antialiased downscale of stored images much larger than the model size (grid_sample does
        not antialias): the short side to the model size, so a crop is resampled by at most ~1.1x."""
        if min(x.shape[-2:]) <= 1.25 * self.size:
            return x
        h, w = x.shape[-2:]
        factor = self.size / min(h, w)
        return F.interpolate(x, size=(round(h * factor), round(w * factor)), mode="bilinear",
                             align_corners=False, antialias=True)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 255] -> (x / 255 - mean) / std, in place: the 1/255 is folded into mean and std."""
        mean, std, _ = self._constants(x.device)
        return x.sub_(mean).div_(std)


def as_float_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> contiguous float32 NCHW in [0, 255], on the images' device.

    Reordered while still uint8 (a quarter of the bytes); grid_sample on the CPU is ~2x slower on a
    channels-last input.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return x.permute(0, 3, 1, 2).contiguous().float()
