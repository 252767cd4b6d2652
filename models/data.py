"""Training data for every stage: clips from the ingest's dataset, frames, image-text pairs.

Video comes from `DATA_ROOT/datasets/NAME` (docs/dataset-format.md): the WebDataset
shards (streamed, shuffled per shard and in a buffer) or the manifest's clip files
(a new shuffled order every pass). Every source is an endless, reproducible stream
that a resumed run continues (`SampleStream`). PyAV decodes in the DataLoader's worker
processes. Each sample is a random window: `frames` frames at a random stride that
realises a target fps drawn from a Beta distribution over `fps_range`; the stride fps
is returned for conditioning. A window is decoded from the keyframe before it (read_window).
Image-mode stages get one random frame per clip. Resize: short side to `size`, then a
random (or centre) square crop.

Everything that can be wrong with the data (no dataset, no clips, clips shorter than
the window, no captions for the prior, a missing shard) raises DataError in `check()`, before
training. A sample that does not decode (a broken image among web-scraped pairs, a clip file
deleted or damaged) is named in a warning and an earlier one of its reader stands in for it; a
reader whose samples fail more often than BAD_SAMPLE_LIMIT stops the run with a DataError.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, IterableDataset

from models.config import StageConfig
from models.video_io import read_window

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
# a reader stops when more than this share of its samples (and more than 10) failed to decode: a
# few broken files are normal in scraped data, most of them is a wrong path or a broken disk
BAD_SAMPLE_LIMIT = 0.1
# what decoding a damaged file raises: PIL and PyAV errors are OSError or ValueError subclasses
SAMPLE_ERRORS = (OSError, ValueError, EOFError)
# how many of a reader's items next to a failed sample are tried as its stand-in
STAND_IN_TRIES = 8


class DataError(ValueError):
    pass


# -- sampling windows -----------------------------------------------------------------
def fps_beta_at(data, progress: float) -> tuple[float, float]:
    """The Beta of the target fps at this point of training (0 = start, 1 = max_steps): fixed, or
    moving linearly from fps_beta to fps_beta_end (the paper: from high fps to low)."""
    if data.fps_beta_end is None:
        return data.fps_beta
    p = min(max(progress, 0.0), 1.0)
    return tuple(a + (b - a) * p for a, b in zip(data.fps_beta, data.fps_beta_end))


def draw_stride(clip_fps: float, num_frames: int, frames: int, fps_range, fps_beta, rng: random.Random) -> int:
    """Frame stride realising a Beta-distributed target fps, capped so the window fits."""
    lo, hi = fps_range
    target = lo + (hi - lo) * rng.betavariate(*fps_beta)
    stride = max(1, round(clip_fps / max(target, 1e-3)))
    return min(stride, max(1, (num_frames - 1) // max(frames - 1, 1)))


def window_indices(num_frames: int, frames: int, stride: int, rng: random.Random) -> list[int]:
    span = (frames - 1) * stride + 1
    start = rng.randrange(0, num_frames - span + 1)
    return list(range(start, start + span, stride))


CLIP_CONDITIONED = ("decoder", "interpolation")  # stages conditioned on the CLIP embedding of a frame


def square_crop(video: np.ndarray, rng: random.Random | None) -> np.ndarray:
    """The largest square of uint8 [T,H,W,3] frames, at a random place along the long side (rng=None: centred)."""
    h, w = video.shape[1:3]
    side = min(h, w)
    top = rng.randint(0, h - side) if rng else (h - side) // 2
    left = rng.randint(0, w - side) if rng else (w - side) // 2
    return video[:, top : top + side, left : left + side]


def resized(video: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T,S,S,3] -> uint8 [3,T,size,size], antialiased bilinear. Torch's uint8 kernel (the layout
    it wants is the frames' own, channels last): 1.5 ms for 16 frames from 256 to 64 px where the float
    one took 17 (bench/RESULTS.md), and within one grey level of it."""
    frames = np.require(video, requirements=["C", "W"])  # PIL's arrays are read-only (torch warns): copied
    x = rearrange(torch.from_numpy(frames), "t h w c -> t c h w")
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return rearrange(x, "t c h w -> c t h w")


def resize(video: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T,S,S,3] -> float [3,T,size,size] in [-1,1]."""
    return resized(video, size).float() / 127.5 - 1


class ClipSampler:
    """Turns one clip (path or bytes + its manifest row) into a training sample."""

    def __init__(self, config: StageConfig):
        self.cfg = config.data
        self.frames = config.data.frames if config.video else 1
        self.captions = config.stage == "prior"
        self.clip_size = config.data.clip_size if config.stage in CLIP_CONDITIONED else None
        self.read = read_window  # (src, frame indices) -> uint8 [T,H,W,3]

    def __call__(self, src, row: dict, rng: random.Random, progress: float = 0.0) -> dict:
        n, fps = int(row["num_frames"]), float(row["fps"])
        if self.frames == 1:
            stride, idx = 1, [rng.randrange(n)]
        else:
            stride = draw_stride(fps, n, self.frames, self.cfg.fps_range, fps_beta_at(self.cfg, progress), rng)
            idx = window_indices(n, self.frames, stride, rng)
        video = self.read(src, idx)
        square = square_crop(video, rng if self.cfg.random_crop else None)
        x = resize(square, self.cfg.size)
        sample = {"fps": torch.tensor(fps / stride, dtype=torch.float32), "caption": row.get("caption") or "",
                  "clip_id": row["clip_id"]}
        sample["video" if self.frames > 1 else "image"] = x if self.frames > 1 else x[:, 0]
        if self.clip_size:  # [3,K,clip_size,clip_size] uint8, the same square as the target's
            sample["clip_image"] = resized(square[clip_frames(self.cfg.clip_frame, len(idx))], self.clip_size)
        return sample


def clip_frames(which: str, frames: int) -> slice:
    """The frames of a window whose CLIP embedding conditions the decoder (their mean for "mean")."""
    return {"first": slice(0, 1), "middle": slice(frames // 2, frames // 2 + 1), "mean": slice(0, frames)}[which]


def stream_seed(*parts) -> int:
    """A seed that depends on `parts` only (not on process, worker or hash randomisation)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


class SampleStream(IterableDataset):
    """An endless stream per reader (DDP rank x DataLoader worker) that can resume where it was.

    The order and each sample's randomness (window, stride, crop) follow from the seed, the
    reader and the sample's position only. A resumed run sets `resume_batches` (the batches
    its rank trained on) and every reader skips what it already gave, before decoding it: the
    run goes on with the samples, windows and crops the uninterrupted run would have drawn,
    instead of replaying the start of the stream. Subclasses give `items` (cheap: rows or
    undecoded samples) and `load` (the decode)."""

    seed, resume_batches, batch_size = 0, 0, 1
    # how far training is when a sample is drawn (its rank-level batch over batches_per_step and
    # total_steps): it moves the fps distribution (data.fps_beta_end)
    batches_per_step, total_steps = 1, 0
    # set by the data module from the trainer: a worker started by spawn or forkserver (macOS,
    # Python 3.14) has no process group to ask, and would read as rank 0 on every rank
    rank, world = 0, 1

    def items(self, part: int, parts: int):
        raise NotImplementedError

    def load(self, item, rng: random.Random, progress: float) -> dict:
        raise NotImplementedError

    def name(self, item) -> str:
        """Which file an item is, for a person."""
        raise NotImplementedError

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader takes batch i from worker i % workers, counting from 0 again after a resume:
        # so this worker plays the part of the one that would have made the next batch, and skips
        # the samples that part gave to the batches already trained on
        done = self.resume_batches
        role = (worker + done) % workers
        part, parts = self.rank * workers + role, self.world * workers
        skip = (done // workers + (role < done % workers)) * self.batch_size
        # the items before the current one, kept (undecoded) through a resume's skip too: a failed
        # sample's stand-in is chosen from them, so the skip leaves it as the uninterrupted run had it
        earlier = collections.deque(maxlen=STAND_IN_TRIES)
        items = iter(self.items(part, parts))
        ahead = collections.deque()  # items read ahead for a stand-in at the reader's start
        tried = failed = 0
        for position in itertools.count():
            item = ahead.popleft() if ahead else next(items, None)
            if item is None:
                return
            if position >= skip:
                batch = position // self.batch_size * workers + role  # this rank's batch, from the run's start
                progress = batch / self.batches_per_step / self.total_steps if self.total_steps else 0.0
                rng = random.Random(stream_seed(self.seed, part, position))
                tried += 1
                try:
                    sample = self.load(item, rng, progress)
                except SAMPLE_ERRORS as err:
                    failed += 1
                    self.say_failed(item, err, failed, tried)
                    candidates = reversed(earlier) if earlier else self._read_ahead(items, ahead)
                    sample = self.stand_in(candidates, rng, progress)
                if sample is not None:  # (None: nothing stands in, the stream moves on one sample)
                    yield sample
            earlier.append(item)

    @staticmethod
    def _read_ahead(items, ahead: collections.deque):
        """The next few items, each also kept in `ahead` for its own position."""
        for _ in range(STAND_IN_TRIES):
            if (item := next(items, None)) is None:
                return
            ahead.append(item)
            yield item

    def say_failed(self, item, err: Exception, failed: int, tried: int) -> None:
        """A warning naming the item (the first 10, then every 100th), or past BAD_SAMPLE_LIMIT a DataError."""
        what = f"{self.name(item)}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        if failed > 10 and failed > BAD_SAMPLE_LIMIT * tried:
            raise DataError(f"{failed} of {tried} samples did not decode, the last {what}")
        if failed <= 10 or failed % 100 == 0:
            warnings.warn(f"a training sample does not decode, another stands in ({failed} so far): {what}")

    def stand_in(self, candidates, rng: random.Random, progress: float) -> dict | None:
        """The first of `candidates` (the reader's items before the failed one, nearest first; at its
        start the items after it) that decodes at the failed one's position and randomness: so a
        resumed run still draws what this one does. None where none does: the stream then moves on
        one sample."""
        for item in candidates:
            try:
                return self.load(item, rng, progress)
            except SAMPLE_ERRORS:
                continue
        return None


class RowStream(SampleStream):
    """Rows in a new shuffled order every pass (the same order for every reader), each reader
    keeping every n-th: readers never share a sample, however few rows there are."""

    def __init__(self, rows: list):
        self.rows = rows

    def items(self, part: int, parts: int):
        return itertools.islice(self._passes(), part, None, parts)

    def _passes(self):
        for epoch in itertools.count():
            order = list(range(len(self.rows)))
            random.Random(stream_seed(self.seed, "epoch", epoch)).shuffle(order)
            yield from (self.rows[i] for i in order)


class ClipFiles(RowStream):
    """The manifest's clip files (data.source: clips)."""

    def __init__(self, rows: list[dict], sampler: ClipSampler):
        super().__init__(rows)
        self.sampler = sampler

    def load(self, row: dict, rng: random.Random, progress: float) -> dict:
        return self.sampler(row["clip_abspath"], row, rng, progress)

    def name(self, row: dict) -> str:
        return str(row["clip_abspath"])


class ShardStream(SampleStream):
    """WebDataset shards split over readers, pass after pass (the ingest's clips, image-text pairs).

    A reader's samples are drawn as often as its share of samples is small, and the DataLoader
    takes as many from every reader: so readers take whole shards only when the shards split
    into groups of near-equal sample counts (`balanced_groups`); otherwise (few shards, or a
    small shard added by a later dataset version) every reader streams all shards in the same
    order and keeps every n-th sample. Either way no reader idles and none sees another's
    samples. `counts`: how many samples each shard gives (`keep`); shards giving none are skipped."""

    what = "samples"
    exact_counts = True  # whether `counts` are what `keep` keeps (else no reader takes whole shards)

    def __init__(self, shards: list[str], counts: list[int], buffer: int):
        self.shards = [shard for shard, n in zip(shards, counts) if n]
        self.counts = [n for n in counts if n]
        self.buffer = buffer
        if not self.shards:
            raise DataError(f"no {self.what} in the shards {shards}")

    def keep(self, sample: dict) -> bool:
        raise NotImplementedError

    def name(self, sample: dict) -> str:
        return f"{sample['__key__']} in {sample['__url__']}"

    def items(self, part: int, parts: int):
        import webdataset as wds

        groups = balanced_groups(self.counts, parts) if self.exact_counts else None
        if groups is not None:
            own = [self.shards[i] for i in groups[part]]
            samples = self._passes(own, shuffle_seed=stream_seed(self.seed, part))
        else:
            samples = itertools.islice(self._passes(self.shards, shuffle_seed=None), part, None, parts)
        if self.buffer < 1:
            return samples
        return wds.filters.shuffle(self.buffer, rng=random.Random(stream_seed(self.seed, part, "buffer")))(samples)

    def _passes(self, shards: list[str], shuffle_seed: int | None):
        """The kept samples of `shards`, pass after pass (in a new shard order each, if seeded)."""
        import webdataset as wds

        for epoch in itertools.count():
            found = False
            shuffle = len(shards) if shuffle_seed is not None else False
            for sample in wds.WebDataset(shards, shardshuffle=shuffle, nodesplitter=None, workersplitter=None,
                                         empty_check=False, seed=stream_seed(shuffle_seed, epoch)):
                if self.keep(sample):
                    found = True
                    yield sample
            if not found:  # the headers promised samples (counts) that the data does not hold: do not spin
                raise DataError(f"no {self.what} in the shards {shards}")


def shard_keys(shard: str | Path) -> dict[str, set[str]]:
    """{sample key: its file extensions} of a WebDataset shard, from the tar headers only."""
    import tarfile

    keys: dict[str, set[str]] = {}
    with tarfile.open(shard) as tar:
        for name in tar.getnames():
            folder, _, base = name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if dot:
                keys.setdefault(f"{folder}/{stem}" if folder else stem, set()).add(ext.lower())
    return keys


def clip_owners(shards: list[str], rows: dict[str, dict]) -> dict[str, str]:
    """The shard (file name) each manifest clip is read from: the manifest's `shard` column, or
    for versions written before it the first shard whose tar headers hold the clip. A clip that
    left a version and came back sits in two listed shards; read from one, it is drawn as often
    as any other."""
    if rows and all(isinstance(row.get("shard"), str) for row in rows.values()):
        return {key: Path(row["shard"]).name for key, row in rows.items()}
    owners: dict[str, str] = {}
    for shard in shards:
        for key, exts in shard_keys(shard).items():
            if "mp4" in exts and key in rows:
                owners.setdefault(key, Path(shard).name)
    return owners


def clips_per_shard(shards: list[str], owners: dict[str, str]) -> list[int]:
    held = collections.Counter(owners.values())
    return [held[Path(shard).name] for shard in shards]


class ClipShards(ShardStream):
    """The ingest's shards of <clip_id>.mp4 + <clip_id>.json (data.source: shards)."""

    what = "manifest clips"

    def __init__(self, shards: list[str], sampler: ClipSampler, rows: dict[str, dict], buffer: int):
        # rows: the checked manifest by clip id (it wins over each shard's json: fallback captions,
        # clips filtered out); a shard sample whose id is not in it is skipped
        self.sampler, self.rows = sampler, rows
        self.owners = clip_owners(shards, rows)
        super().__init__(shards, clips_per_shard(shards, self.owners), buffer)

    def keep(self, sample: dict) -> bool:
        key = sample["__key__"]
        return key in self.rows and "mp4" in sample and Path(sample["__url__"]).name == self.owners.get(key)

    def load(self, sample: dict, rng: random.Random, progress: float) -> dict:
        return self.sampler(sample["mp4"], self.rows[sample["__key__"]], rng, progress)


def image_side(image) -> int:
    """The short side of an image (path or file object) in pixels, from its header."""
    from PIL import Image

    with Image.open(image) as im:
        return min(im.size)


class ImageSampler:
    """Turns one image (path or file object) and its caption into a training sample."""

    def __init__(self, config: StageConfig):
        self.size, self.random_crop = config.data.size, config.data.random_crop
        self.clip_size = config.data.clip_size if config.stage in CLIP_CONDITIONED else None
        # the U-Net stages learn the pixels: an image smaller than data.size would be upsampled into a
        # blurry target (fatal for super-resolution), so it is skipped, as a clip that small is. The
        # prior learns CLIP embeddings, which CLIP's own preprocessing makes from any size
        self.min_side = self.size if config.stage != "prior" else 0

    def __call__(self, image, caption: str, rng: random.Random) -> dict:
        from PIL import Image

        pixels = np.asarray(Image.open(image).convert("RGB"))[None]
        square = square_crop(pixels, rng if self.random_crop else None)
        sample = {"image": resize(square, self.size)[:, 0], "caption": caption, "fps": torch.tensor(0.0)}
        if self.clip_size:  # as ClipSampler's
            sample["clip_image"] = resized(square, self.clip_size)
        return sample


class ImageText(RowStream):
    """Folder of images with same-named .txt captions (image-text pairs)."""

    def __init__(self, pairs: list[tuple[Path, str]], sampler: ImageSampler):
        super().__init__(pairs)
        self.sampler = sampler

    def load(self, pair: tuple[Path, str], rng: random.Random, progress: float) -> dict:
        return self.sampler(pair[0], pair[1], rng)

    def name(self, pair: tuple[Path, str]) -> str:
        return str(pair[0])


class ImageTextShards(ShardStream):
    """WebDataset shards of <key>.jpg (or .png, .webp) + <key>.txt (image-text pairs)."""

    what = "captioned images (<key>.jpg + <key>.txt)"
    image_exts = tuple(ext.lstrip(".") for ext in IMAGE_EXTS)

    small = 0  # images skipped for their size, by this reader

    def __init__(self, shards: list[str], sampler: ImageSampler, buffer: int, presized: bool = False):
        self.sampler = sampler
        if sampler.min_side:
            self.what = f"captioned images (<key>.jpg + <key>.txt) of at least data.size={sampler.min_side} px"
            # the tar headers count the images too small to keep as well: a reader given whole shards could
            # get none it keeps (and stop the run), or few (and repeat them), unless the user says none is
            self.exact_counts = presized
            if presized:
                self.what += " (data.image_shards_presized: true says each shard holds only such images)"
        counts = [sum("txt" in exts and any(e in exts for e in self.image_exts) for exts in shard_keys(s).values())
                  for s in shards]
        super().__init__(shards, counts, buffer)
        if sampler.min_side and not self._one_large_enough():  # else the first batch raises, mid-training
            raise DataError(f"data.image_path: no captioned image in the shards {shards} is at least "
                            f"data.size={sampler.min_side} px on its short side; give larger images or lower data.size")

    def _one_large_enough(self) -> bool:
        """Whether any captioned image is at least data.size (the tar headers do not say: read until one is)."""
        import webdataset as wds

        with warnings.catch_warnings():  # keep() warns of the small ones: training will
            warnings.simplefilter("ignore")
            samples = wds.WebDataset(self.shards, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False)
            found = any(self.keep(sample) for sample in samples)
        self.small = 0
        return found

    def keep(self, sample: dict) -> bool:  # an empty caption counts as none
        import io

        image = next((sample[e] for e in self.image_exts if e in sample), None)
        if not sample.get("txt", b"").strip() or image is None:
            return False
        if self.sampler.min_side and image_side(io.BytesIO(image)) < self.sampler.min_side:
            self.small += 1
            if self.small in (1, 1000):  # (per reader; not per sample: a stream of them would bury the log)
                warnings.warn(f"skipping images smaller than data.size={self.sampler.min_side} px "
                              f"({'the first' if self.small == 1 else '1000 so far'} in {sample['__url__']})")
            return False
        return True

    def load(self, sample: dict, rng: random.Random, progress: float) -> dict:
        import io

        image = next(sample[e] for e in self.image_exts if e in sample)
        return self.sampler(io.BytesIO(image), sample["txt"].decode().strip(), rng)


def balanced_groups(counts: list[int], parts: int, tolerance: float = 0.1) -> list[list[int]] | None:
    """Shard indices in `parts` groups whose sample counts differ by at most `tolerance` (largest
    shard first, each to the group with the fewest samples), or None if they cannot."""
    if len(counts) < parts:
        return None
    groups, totals = [[] for _ in range(parts)], [0] * parts
    for index in sorted(range(len(counts)), key=lambda i: -counts[i]):
        lightest = totals.index(min(totals))
        groups[lightest].append(index)
        totals[lightest] += counts[index]
    return groups if max(totals) <= (1 + tolerance) * min(totals) else None


def image_text_pairs(path: Path) -> list[tuple[Path, str]]:
    pairs = []
    for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        txt = image.with_suffix(".txt")
        if txt.exists() and txt.read_text().strip():
            pairs.append((image, txt.read_text().strip()))
    return pairs


# -- the data module ---------------------------------------------------------------------
def read_manifest(data_root: Path, dataset: str, version: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The manifest and shards of one version (default: latest, resolved once for both)."""
    from data_prep.dataset import DatasetError, load_manifest, shard_paths

    try:
        manifest = load_manifest(data_root, dataset, version or "latest")
        shards = [str(p) for p in shard_paths(data_root, dataset, manifest.attrs["version"])]
    except DatasetError as err:  # (names the dataset and where it looked)
        raise DataError(str(err)) from None
    except (FileNotFoundError, KeyError) as err:
        raise DataError(f"dataset {dataset!r} under {data_root}: {err}") from None
    return manifest, shards


class StageDataModule(L.LightningDataModule):
    def __init__(self, config: StageConfig, data_root: str | Path | None = None, dataset: str | None = None,
                 version: str | None = None):
        super().__init__()
        self.config = config
        self.data_root = Path(data_root) if data_root else None
        self.dataset_name = dataset
        self.version = version
        self.train_set: SampleStream | None = None
        self.curriculum_steps: int | None = None  # a resumed run's, from its checkpoint

    def check(self) -> "StageDataModule":
        """Resolve and validate the data; every problem is a DataError raised here, before training."""
        cfg, data = self.config, self.config.data
        if data.source == "images":
            if cfg.video:
                raise DataError(f"data.source: images are for image-mode stages; a video-mode {cfg.stage} "
                                "trains on an ingested video dataset (source: auto, shards or clips)")
            self.train_set = self._image_text()
            return self
        if self.data_root is None or not self.dataset_name:
            raise DataError(f"stage {cfg.stage!r} needs --data-root and --dataset (an ingested video dataset)")
        manifest, shards = read_manifest(self.data_root, self.dataset_name, self.version)
        if manifest.empty:
            raise DataError(f"dataset {self.dataset_name!r} is empty: no clips to train on")
        window = data.frames if cfg.video else 1
        manifest = self._drop(manifest, manifest["num_frames"] < window, f"shorter than the {window}-frame window",
                              f"longest: {int(manifest['num_frames'].max())} frames); lower data.frames")
        # a clip smaller than the training size would be upsampled: blurry targets (fatal for super-resolution)
        short_side = manifest[["width", "height"]].min(axis=1)
        manifest = self._drop(manifest, short_side < data.size, f"smaller than data.size={data.size} px",
                              f"largest short side: {int(short_side.max())} px); ingest it with clips.short_side "
                              f">= {data.size} or lower data.size")
        if cfg.video and data.min_motion:
            manifest = self._moving(manifest, data.min_motion)
        if cfg.stage == "prior":
            manifest = self._captioned(manifest)
        rows = manifest.to_dict("records")
        sampler = ClipSampler(cfg)
        source = data.source if data.source != "auto" else ("shards" if shards else "clips")
        if source == "shards":
            if not shards:
                raise DataError(f"dataset {self.dataset_name!r} has no shards; use data.source: clips")
            missing = [shard for shard in shards if not Path(shard).is_file()]  # else a trace from a worker
            if missing:
                raise DataError(f"dataset {self.dataset_name!r}: {len(missing)} of its {len(shards)} shards are "
                                f"missing, e.g. {missing[0]}; ingest again, or use data.source: clips")
            self.train_set = ClipShards(shards, sampler, {r["clip_id"]: r for r in rows}, data.shuffle_buffer)
        else:
            self.train_set = ClipFiles(rows, sampler)
        return self

    def _image_text(self) -> SampleStream:
        """data.image_path: a folder of <name>.jpg + <name>.txt pairs, or WebDataset shards of them
        (a .tar, or a folder of .tar files)."""
        data = self.config.data
        if not data.image_path:
            raise DataError("data.image_path: source 'images' needs a folder of image + .txt pairs or .tar shards")
        path = Path(data.image_path).expanduser()
        if not path.exists():
            raise DataError(f"data.image_path: {path} does not exist")
        shards = [path] if path.is_file() else sorted(path.rglob("*.tar"))
        pairs = image_text_pairs(path) if path.is_dir() else []
        if shards and pairs:
            raise DataError(f"data.image_path: {path} holds both loose image + .txt pairs and .tar shards; "
                            "point it at one of them")
        if shards:
            if any(shard.suffix != ".tar" for shard in shards):
                raise DataError(f"data.image_path: {path} is neither a folder nor a .tar shard")
            return ImageTextShards([str(shard) for shard in shards], ImageSampler(self.config), data.shuffle_buffer,
                                   presized=data.image_shards_presized)
        if not pairs:
            raise DataError(f"data.image_path: no captioned images (<name>.jpg + <name>.txt) in {path}")
        sampler = ImageSampler(self.config)
        if sampler.min_side:
            sides = []
            for image, _ in pairs:
                try:
                    sides.append(image_side(image))
                except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                    raise DataError(f"data.image_path: {image} is not a readable image ({err})") from None
            small = [side < sampler.min_side for side in sides]
            if all(small):
                raise DataError(f"data.image_path: every image in {path} is smaller than data.size="
                                f"{sampler.min_side} px (largest short side: {max(sides)} px); give larger "
                                "images or lower data.size")
            if any(small):
                warnings.warn(f"skipping {sum(small)} images smaller than data.size={sampler.min_side} px")
                pairs = [pair for pair, too_small in zip(pairs, small) if not too_small]
        return ImageText(pairs, sampler)

    def _drop(self, manifest: pd.DataFrame, unfit: pd.Series, what: str, hint: str) -> pd.DataFrame:
        """Skip the clips that are `what` (with a warning); all of them is an error ending in `hint`."""
        if unfit.all():
            raise DataError(f"every clip of {self.dataset_name!r} is {what} ({hint}")
        if unfit.any():
            warnings.warn(f"skipping {int(unfit.sum())} clips {what}")
        return manifest[~unfit]

    def _moving(self, manifest: pd.DataFrame, least: float) -> pd.DataFrame:
        """The clips that move at least `least`; clips ingested before motion was measured are kept."""
        motion = manifest["motion"] if "motion" in manifest else pd.Series(float("nan"), index=manifest.index)
        if motion.isna().all():
            raise DataError(f"data.min_motion: dataset {self.dataset_name!r} was ingested before clips had a "
                            "motion score; ingest its sources into a new dataset, or set data.min_motion: 0")
        if motion.isna().any():
            warnings.warn(f"data.min_motion: {int(motion.isna().sum())} clips ingested before clips had a motion "
                          "score are kept unfiltered")
        return self._drop(manifest, motion < least, f"moving less than data.min_motion={least:g}",
                          f"most: {motion.max():.2f}); lower data.min_motion")

    def _captioned(self, manifest: pd.DataFrame) -> pd.DataFrame:
        captioned = manifest[manifest["caption"].fillna("").str.strip() != ""]
        if len(captioned):
            if len(captioned) < len(manifest):
                warnings.warn(f"prior: skipping {len(manifest) - len(captioned)} clips without a caption")
            return captioned
        if self.config.data.caption_fallback == "error":
            raise DataError(f"prior: no clip of {self.dataset_name!r} has a caption; give image-text pairs "
                            "(data.source: images) or set data.caption_fallback: source_name")
        warnings.warn("prior: no captions in the dataset; captioning frames with their source file names "
                      "(weak text conditioning, for demos only)")
        manifest = manifest.copy()
        manifest["caption"] = [Path(str(s)).stem.replace("_", " ").replace("-", " ") for s in manifest["source"]]
        return manifest

    def train_dataloader(self):
        if self.train_set is None:
            self.check()
        data, trainer = self.config.data, self.trainer
        self.train_set.seed, self.train_set.batch_size = self.config.trainer.seed, data.batch_size
        if trainer:
            self.train_set.rank, self.train_set.world = trainer.global_rank, trainer.world_size
        # on --resume Lightning has restored the step before it asks for the data
        self.train_set.resume_batches = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        self.train_set.batches_per_step = trainer.accumulate_grad_batches if trainer else 1
        # the configured run length, as the run started: neither --max-steps (a stop) nor a resume
        # with another trainer.max_steps re-times the curriculum (past its end it stays at the end)
        self.train_set.total_steps = self.curriculum_steps or self.config.trainer.max_steps
        return DataLoader(self.train_set, batch_size=data.batch_size, num_workers=data.num_workers,
                          persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available())

    # in every checkpoint: a checkpoint's recorded config holds the trainer.max_steps of the last (resumed)
    # leg, so a second resume after one that raised it would re-time the curriculum
    def state_dict(self) -> dict:
        return {"curriculum_steps": self.curriculum_steps or self.config.trainer.max_steps}

    def load_state_dict(self, state_dict: dict) -> None:  # (Lightning restores it before train_dataloader)
        self.curriculum_steps = state_dict.get("curriculum_steps") or self.curriculum_steps
