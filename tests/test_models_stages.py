"""Data, the five stages, train_stage (errors before training, resume) and the sampling chain.

A module-scoped fixture trains the whole tiny chain for a few steps on a synthetic
moving-shapes dataset written to tmp (data_prep/synthetic.py); later tests reuse it.
"""
import copy
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from data_prep.synthetic import write_synthetic_dataset
from models.config import ConfigError, load_config, parse_config
from models.data import DataError, StageDataModule, draw_stride
from models.stages import CheckpointError, build_stage, load_stage, read_checkpoint
from models.train import train_stage

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def tiny(stage, **overrides):
    return load_config(ROOT / "configs" / "tiny" / f"{stage}.yaml", overrides)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root, "shapes", num_clips=8, frames=20, size=64, fps=12)
    return root


@pytest.fixture(scope="module")
def chain(data_root, tmp_path_factory):
    """Train every stage (image stages first, then their inflated video versions) for a few steps."""
    out = tmp_path_factory.mktemp("runs")

    def train(stage, name, init=None, **overrides):
        return train_stage(stage, tiny(stage, **overrides), data_root=data_root, dataset="shapes", init=init,
                           out_dir=out / name, max_steps=STEPS)

    results = {"prior": train("prior", "prior")}
    results["decoder_image"] = train("decoder", "decoder_image", mode="image")
    results["decoder"] = train("decoder", "decoder", init=results["decoder_image"].checkpoint)
    results["interpolation"] = train("interpolation", "interpolation", init=results["decoder"].checkpoint)
    results["sr_low_image"] = train("sr_low", "sr_low_image", mode="image")
    results["sr_low"] = train("sr_low", "sr_low", init=results["sr_low_image"].checkpoint)
    results["sr_high"] = train("sr_high", "sr_high")
    return results


def test_data_module_batches(data_root):
    dm = StageDataModule(tiny("decoder", **{"data.batch_size": 2}), data_root, "shapes").check()
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 3, 8, 16, 16)
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert batch["fps"].shape == (2,) and (batch["fps"] > 0).all()
    dm = StageDataModule(tiny("sr_high", **{"data.source": "clips"}), data_root, "shapes").check()
    assert next(iter(dm.train_dataloader()))["image"].shape == (4, 3, 64, 64)


def test_a_sample_holds_the_clips_frames_at_the_stride_its_fps_says(tmp_path):
    """A lossless grey ramp (frame i at level 8 i): each training window is frames i, i+s, i+2s...
    of the clip, in order, and its fps conditioning is the clip's fps / s."""
    import random

    import numpy as np

    from models.data import ClipSampler
    from models.video_io import write_mp4

    levels = np.arange(0, 240, 8, dtype=np.uint8)  # 30 frames
    ramp = write_mp4(np.broadcast_to(levels[:, None, None, None], (30, 32, 32, 3)), tmp_path / "ramp.mp4",
                     fps=30, crf=0)
    sampler = ClipSampler(tiny("decoder", **{"data.size": 16, "data.frames": 6}))
    strides = set()
    for seed in range(12):
        sample = sampler(ramp, {"num_frames": 30, "fps": 30.0, "clip_id": "ramp"}, random.Random(seed))
        frames = ((sample["video"].mean(dim=(0, 2, 3)) + 1) * 127.5 / 8).round().long().tolist()  # frame numbers
        stride = frames[1] - frames[0]
        assert stride >= 1 and frames == list(range(frames[0], frames[0] + 6 * stride, stride)) and frames[-1] < 30
        assert float(sample["fps"]) == pytest.approx(30.0 / stride)
        strides.add(stride)
    assert len(strides) > 1  # the stride is drawn


def test_the_decoder_is_conditioned_on_its_frame_cut_at_clips_size(tmp_path):
    """The CLIP embedding that conditions the decoder is of the window's middle frame cut from the
    clip at data.clip_size over the target's own square (sampling gives it the prior's embeddings,
    which are of full-size images), not of the data.size target upsampled."""
    import random

    import numpy as np

    from models.data import ClipSampler
    from models.video_io import write_mp4

    levels = np.arange(0, 240, 8, dtype=np.uint8)  # frame i at level 8 i
    ramp = write_mp4(np.broadcast_to(levels[:, None, None, None], (30, 32, 32, 3)), tmp_path / "ramp.mp4",
                     fps=30, crf=0)
    config = tiny("decoder", **{"data.size": 8, "data.frames": 5, "data.clip_size": 24, "cond_dropout": 0.0})
    sampler = ClipSampler(config)
    for seed in range(4):
        sample = sampler(ramp, {"num_frames": 30, "fps": 30.0, "clip_id": "ramp"}, random.Random(seed))
        frames = ((sample["video"].mean(dim=(0, 2, 3)) + 1) * 127.5 / 8).round().long().tolist()
        assert sample["clip_image"].shape == (3, 1, 24, 24) and sample["clip_image"].dtype == torch.uint8
        assert round(sample["clip_image"].float().mean().item() / 8) == frames[2]  # the middle frame

    # over the target's square: a horizontal gradient, cropped at random places along the long side
    gradient = np.broadcast_to(np.linspace(0, 240, 64).astype(np.uint8)[None, None, :, None], (6, 32, 64, 3))
    wide = write_mp4(gradient, tmp_path / "wide.mp4", fps=30, crf=0)
    means = []
    for seed in range(6):
        sample = sampler(wide, {"num_frames": 6, "fps": 30.0, "clip_id": "wide"}, random.Random(seed))
        target = (sample["video"][:, 2].mean().item() + 1) * 127.5
        assert sample["clip_image"].float().mean().item() == pytest.approx(target, abs=2)
        means.append(target)
    assert max(means) - min(means) > 20  # the squares differ

    stage = build_stage(config)
    batch = {"video": sample["video"][None], "clip_image": sample["clip_image"][None], "fps": sample["fps"][None]}
    _, cond = stage.conditioning(batch)
    pixels = sample["clip_image"][None].float() / 127.5 - 1
    assert torch.allclose(cond["image_emb"], stage.image_embedding(pixels))
    assert not torch.allclose(cond["image_emb"], stage.image_embedding(sample["video"][None, :, 2:3]), atol=1e-3)


def test_readers_split_one_shard_without_overlap(data_root):
    """Two DataLoader workers (readers, like two DDP ranks) over a one-shard dataset: each reads its
    own half, in shard order, so one pass over both covers every clip exactly once."""
    cfg = tiny("decoder", **{"data.batch_size": 1, "data.num_workers": 2, "data.shuffle_buffer": 0})
    dm = StageDataModule(cfg, data_root, "shapes").check()
    assert len(dm.train_set.shards) == 1
    loader = iter(dm.train_dataloader())
    seen = [next(loader)["clip_id"][0] for _ in range(8)]
    assert sorted(seen) == sorted(dm.train_set.rows)  # 8 clips, 8 distinct


def test_ranks_read_their_own_part_in_spawned_workers(data_root):
    """A worker started by spawn (macOS) or forkserver (Python 3.14) has no process group to ask
    its rank: the stream carries the rank the data module took from the trainer."""
    from torch.utils.data import DataLoader

    cfg = tiny("decoder", **{"data.shuffle_buffer": 0, "data.source": "clips"})
    dm = StageDataModule(cfg, data_root, "shapes").check()
    seen = []
    for rank in (0, 1):
        dm.train_set.rank, dm.train_set.world = rank, 2  # train_dataloader sets them from the trainer
        loader = iter(DataLoader(dm.train_set, batch_size=2, num_workers=1, multiprocessing_context="spawn"))
        seen.append([clip for _ in range(2) for clip in next(loader)["clip_id"]])
    assert len(set(seen[0] + seen[1])) == 8  # 8 clips, 4 per rank: as rank 0 (the old fallback), both read the same


def test_shards_without_any_manifest_clip_are_an_error_not_a_hang(data_root):
    from models.data import ClipShards

    dm = StageDataModule(tiny("decoder"), data_root, "shapes").check()
    with pytest.raises(DataError, match="no manifest clips in the shards"):
        ClipShards(dm.train_set.shards, dm.train_set.sampler, {"not-a-clip": {}}, buffer=0)


def test_clips_per_shard_come_from_the_manifest_or_else_the_tar_headers(tmp_path):
    from data_prep.dataset import shard_paths
    from models.data import clip_owners, clips_per_shard, read_manifest

    write_synthetic_dataset(tmp_path, "uneven", num_clips=9, frames=4, size=16, fps=12, clips_per_shard=8)
    manifest, shards = read_manifest(tmp_path, "uneven")
    rows = {r["clip_id"]: r for r in manifest.to_dict("records")}
    from_headers = clips_per_shard(shards, clip_owners(shards, {k: {**r, "shard": None} for k, r in rows.items()}))
    assert sorted(from_headers) == [1, 8]
    moved = [str(tmp_path / "elsewhere" / Path(s).name) for s in shards]  # no file there: the manifest alone
    assert clips_per_shard(moved, clip_owners(moved, rows)) == from_headers
    del rows[manifest["clip_id"][0]]  # a clip the data check dropped
    assert sum(clips_per_shard(moved, clip_owners(moved, rows))) == 8
    assert sum(clips_per_shard(shards, clip_owners(shards, {k: {} for k in rows}))) == 8
    assert [Path(p).name for p in shard_paths(tmp_path, "uneven")] == [Path(s).name for s in shards]


@pytest.mark.parametrize("with_column", [True, False])
def test_a_clip_that_left_a_version_and_came_back_is_read_once_per_pass(tmp_path, with_column):
    """Source A re-cut with other settings (its clip leaves the version), then cut as before: its
    clip is in the first shard (still listed for B's) and in a new one. Read from one owner only."""
    import json

    import pandas as pd

    from data_prep.dataset import commit_version
    from models.data import ClipSampler, ClipShards, read_manifest

    ds = write_synthetic_dataset(tmp_path, "d", num_clips=2, frames=4, size=16, fps=12)
    first, _ = read_manifest(tmp_path, "d")
    a, b = first.drop(columns=["clip_abspath", "shard"]).to_dict("records")
    recut = {**a, "clip_id": "recut" + a["clip_id"][5:], "clip_path": "clips/recut.mp4"}
    new = {**b, "clip_id": "new" + b["clip_id"][3:], "source_sha256": "c" * 64, "clip_path": "clips/new.mp4"}
    for row, like in ((recut, a), (new, b)):
        (ds / row["clip_path"]).write_bytes((ds / like["clip_path"]).read_bytes())
    commit_version(ds, [recut], [], {}, shard_max_clips=8)  # A's clip leaves, B keeps the first shard
    commit_version(ds, [a, new], [], {}, shard_max_clips=8)  # A's comes back with a new source's: a new shard
    manifest, shards = read_manifest(tmp_path, "d")
    ids = [a["clip_id"], b["clip_id"], new["clip_id"]]
    assert sorted(manifest["clip_id"]) == sorted(ids) and len(shards) == 2
    if not with_column:  # a version written before the column: the tar headers decide
        version = json.loads((ds / "versions" / manifest.attrs["version"] / "dataset.json").read_text())["version"]
        path = ds / "versions" / version / "manifest.parquet"
        pd.read_parquet(path).drop(columns=["shard"]).to_parquet(path, index=False)
        manifest, shards = read_manifest(tmp_path, "d")
    rows = {r["clip_id"]: r for r in manifest.to_dict("records")}
    stream = ClipShards(shards, ClipSampler(tiny("decoder", mode="image")), rows, buffer=0)
    two_passes = [sample["clip_id"] for sample, _ in zip(iter(stream), range(6))]
    assert sorted(two_passes) == sorted(2 * ids)  # each clip once a pass


def test_weight_decay_spares_biases_norms_and_learned_positions():
    prior = build_stage(tiny("prior", **{"trainer.weight_decay": 0.1}))
    decayed, kept = prior.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in prior.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"])
    kept_names = {names[id(p)] for p in kept["params"]}
    assert {"net.pos", "net.query"} <= kept_names and any(n.endswith(".bias") for n in kept_names)
    assert len(decayed["params"]) + len(kept["params"]) == sum(p.requires_grad for p in prior.parameters())
    (single,) = build_stage(tiny("prior")).configure_optimizers()["optimizer"].param_groups  # no decay: one group
    # the video decoder's trained layers: the temporal convolutions start as the identity, which decay
    # would shrink towards zero; the temporal attention's projections decay as any weight matrix
    decoder = build_stage(tiny("decoder", **{"trainer.weight_decay": 0.1}))
    decayed, kept = decoder.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in decoder.named_parameters()}
    decayed_names, kept_names = ({names[id(p)] for p in group["params"]} for group in (decayed, kept))
    assert "net.conv_in.temporal.weight" in kept_names and all("temporal.weight" not in n for n in decayed_names)
    assert any(n.endswith(".temporal.attn.to_q.weight") for n in decayed_names)


def test_fsdp_reduces_gradients_in_float32_under_bf16():
    from models.train import fsdp_strategy

    mixed = fsdp_strategy(bf16=True).mixed_precision
    assert (mixed.param_dtype, mixed.reduce_dtype, mixed.buffer_dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert fsdp_strategy().mixed_precision is None  # float32 runs: no casts at all


def test_fsdp_under_bf16_keeps_the_batch_in_float32():
    """FSDP casts its root module's inputs by default, which here is the whole batch: the noising
    would then be built from bf16 clips (before the noising computed in float32 itself, x_t = x0
    for the cosine schedule's first 21 timesteps)."""
    import json
    import subprocess
    import sys

    from tests.servers import free_port

    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_bf16_probe.py"), str(free_port())],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"x0": "torch.float32", "finite": True}
    from models.diffusion import Diffusion

    alphas = Diffusion(timesteps=1000).schedule.alphas_cumprod
    assert ((1 - alphas.bfloat16()) == 0).sum() > 0 and ((1 - alphas) == 0).sum() == 0  # why it matters


def test_the_gpu_run_imports_without_the_ingests_packages():
    """bench/gpu_run.sh brings a GPU host only what training needs: its tests and benchmark must
    import without OpenCV, ffmpeg-python, PySceneDetect, imageio-ffmpeg, Prefect or MLflow (the
    FSDP GPU test once could not: data_prep.synthetic imported the ingest's clip cutter)."""
    import subprocess
    import sys

    script = (
        "import importlib.abc, sys\n"
        "BLOCKED = {'cv2', 'ffmpeg', 'scenedetect', 'imageio_ffmpeg', 'prefect', 'mlflow'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not on the GPU host)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import tests.test_models_gpu, bench.train_step\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_shard_groups_are_balanced_or_not_used():
    from models.data import balanced_groups

    assert balanced_groups([256] * 16, 8) == [[i, i + 8] for i in range(8)]
    assert balanced_groups([200, 100, 95], 2) == [[0], [1, 2]]  # 200 and 195 clips: within 10 %
    assert balanced_groups([8, 1], 2) is None  # a one-clip shard would be half of every batch
    assert balanced_groups([256] * 9, 8) is None  # one reader with two shards: its clips half as often
    assert balanced_groups([256] * 3, 4) is None  # fewer shards than readers


def test_clips_are_drawn_evenly_from_uneven_shards(tmp_path):
    """9 clips in shards of 8 and 1, read by two workers: every clip about 1/9 of the samples
    (whole shards per worker made the lone clip half of all samples), and a worker whose shard
    holds only dropped clips would have no clip at all."""
    from collections import Counter

    write_synthetic_dataset(tmp_path, "uneven", num_clips=9, frames=20, size=32, fps=12, clips_per_shard=8)
    cfg = tiny("decoder", **{"mode": "image", "data.num_workers": 2, "data.batch_size": 3, "data.source": "shards",
                             "data.size": 32, "data.shuffle_buffer": 0})
    dm = StageDataModule(cfg, tmp_path, "uneven").check()
    assert sorted(dm.train_set.counts) == [1, 8]
    counts, loader = Counter(), iter(dm.train_dataloader())
    for _ in range(12):  # 36 samples: 4 passes over the 9 clips
        counts.update(next(loader)["clip_id"])
    assert sorted(counts.values()) == [4] * 9


def _image_text_pairs(folder: Path, count: int, width: int = 48, height: int = 32) -> list[str]:
    """Loose <i>.png + <i>.txt pairs (random pixels), plus an image without a caption and a
    caption without an image, which are skipped."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = [f"picture number {i}" for i in range(count)]
    for i, caption in enumerate(captions + ["no caption"]):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
        if i < count:
            (folder / f"{i:03d}.txt").write_text(caption)
    (folder / "lonely.txt").write_text("a caption without its image")
    return captions


def test_the_prior_attends_to_the_captions_own_tokens_only():
    """CLIP pads every caption to 77 tokens. What stands in the padding places must not change the
    prior's prediction, while its real tokens do; the unconditional input (sampling's and CFG
    dropout's) attends to no token at all."""
    prior = build_stage(tiny("prior")).eval()
    cond = prior.text_condition(["a person playing guitar", "a cat"])
    mask = cond["token_mask"]
    assert mask[:, 0].all() and not mask[:, -1].any() and mask.sum(1)[0] > mask.sum(1)[1]
    x_t = torch.randn(2, prior.net.kwargs["embed_dim"], generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    predicted = prior.denoise(x_t, t, cond)

    def with_tokens(c, tokens):
        return prior.denoise(x_t, t, {**c, "tokens": tokens})

    junk = 10 * torch.randn_like(cond["tokens"])
    padded_with_junk = torch.where(mask[..., None], cond["tokens"], junk)
    torch.testing.assert_close(with_tokens(cond, padded_with_junk), predicted)
    with torch.no_grad():  # sampling's path: torch's fused encoder kernel takes the mask its own way
        torch.testing.assert_close(with_tokens(cond, padded_with_junk), predicted)
    changed = cond["tokens"].clone()
    changed[:, 1] += 1.0  # the first word
    assert (with_tokens(cond, changed) - predicted).abs().amax(-1).min() > 1e-4

    null = prior.null_condition(cond)
    assert not null["token_mask"].any()
    torch.testing.assert_close(with_tokens(null, junk), prior.denoise(x_t, t, null))

    # training's CFG dropout gives a dropped caption that same unconditional input
    prior.config.cond_dropout = 0.5
    torch.manual_seed(3)
    _, dropped = prior.conditioning({"image": torch.rand(16, 3, 32, 32) * 2 - 1, "caption": ["a cat"] * 16})
    kept = dropped["text_emb"].abs().sum(-1) > 0
    assert 0 < kept.sum() < 16
    assert dropped["token_mask"].any(-1).tolist() == kept.tolist()


def test_the_prior_reads_image_text_folders_and_webdataset_shards(tmp_path):
    import tarfile

    captions = _image_text_pairs(tmp_path / "loose", 5)
    with tarfile.open(tmp_path / "pairs.tar", "w") as tar:  # a WebDataset shard of the same pairs
        for file in sorted((tmp_path / "loose").iterdir()):
            tar.add(file, arcname=file.name)
    (tmp_path / "shards").mkdir()
    (tmp_path / "pairs.tar").rename(tmp_path / "shards" / "pairs-000.tar")

    def first_pass(image_path, **overrides):
        cfg = tiny("prior", **{"data.source": "images", "data.image_path": str(image_path), "data.batch_size": 5,
                               "data.num_workers": 0, "data.shuffle_buffer": 0, "data.size": 16, **overrides})
        batch = next(iter(StageDataModule(cfg).check().train_dataloader()))
        assert batch["image"].shape == (5, 3, 16, 16)
        return batch

    for source in (tmp_path / "loose", tmp_path / "shards", tmp_path / "shards" / "pairs-000.tar"):
        batch = first_pass(source)
        assert sorted(batch["caption"]) == captions, source  # one pass: each captioned image once
    # random_crop: false gives the centre crop every time
    still = [first_pass(tmp_path / "shards", **{"data.random_crop": False, "trainer.seed": seed}) for seed in (0, 1)]
    order = [sorted(range(5), key=lambda i: b["caption"][i]) for b in still]
    assert torch.equal(still[0]["image"][order[0]], still[1]["image"][order[1]])

    # the image decoder (the paper trains its spatial layers on image-text pairs) also gets each image's
    # square at CLIP's input size: here 32, the images' height, so the square itself
    import numpy as np
    from PIL import Image

    from models.data import resize

    cfg = tiny("decoder", mode="image", **{"data.source": "images", "data.image_path": str(tmp_path / "loose"),
                                           "data.batch_size": 5, "data.size": 16, "data.clip_size": 32})
    batch = next(iter(StageDataModule(cfg).check().train_dataloader()))
    originals = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "loose").glob("*.png"))]
    for square, image in zip(batch["clip_image"][:, :, 0], batch["image"]):
        hwc = square.permute(1, 2, 0).numpy()
        assert any((hwc == o[:, left:left + 32]).all() for o in originals for left in range(17))
        assert torch.allclose(resize(hwc[None], 16)[:, 0], image)

    cfg = tiny("prior", **{"data.source": "images", "data.image_path": str(tmp_path / "shards"), "data.size": 16,
                           "data.batch_size": 2})
    result = train_stage("prior", cfg, out_dir=tmp_path / "prior", max_steps=2)  # trains from the shard
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.train_loss))

    (tmp_path / "shards" / "000.png").write_bytes((tmp_path / "loose" / "000.png").read_bytes())
    (tmp_path / "shards" / "000.txt").write_text("a loose pair beside the shards")
    with pytest.raises(DataError, match="holds both loose image"):
        first_pass(tmp_path / "shards")
    with pytest.raises(DataError, match="does not exist"):
        first_pass(tmp_path / "nowhere")


def test_unet_stages_skip_images_smaller_than_their_size_as_they_skip_such_clips(tmp_path):
    """sr_high (768 px in the base configs) learns from image-text pairs: an image below data.size was
    upsampled into a blurry target, silently. The U-Net stages skip such images, from folders and
    shards alike, and stop where none is large enough; the prior, which learns CLIP embeddings,
    keeps them."""
    import tarfile

    import numpy as np
    from PIL import Image

    big = _image_text_pairs(tmp_path / "mixed", 3)  # 48 x 32
    (tmp_path / "small").mkdir()
    for folder in (tmp_path / "mixed", tmp_path / "small"):
        for i in range(2):  # 48 x 31: one pixel short of data.size
            Image.fromarray(np.zeros((31, 48, 3), np.uint8)).save(folder / f"small{i}.png")
            (folder / f"small{i}.txt").write_text(f"small picture {i}")
    for name in ("mixed", "small"):
        with tarfile.open(tmp_path / f"{name}.tar", "w") as tar:  # the small ones first: read before a batch is full
            for file in sorted((tmp_path / name).iterdir(), key=lambda f: (not f.name.startswith("small"), f.name)):
                tar.add(file, arcname=file.name)

    def first_batch(stage, image_path, batch_size, **overrides):
        cfg = tiny(stage, **{"data.source": "images", "data.image_path": str(image_path), "data.size": 32,
                             "data.batch_size": batch_size, "data.num_workers": 0, "data.shuffle_buffer": 0,
                             **overrides})
        return next(iter(StageDataModule(cfg).check().train_dataloader()))

    for source in ("mixed", "mixed.tar"):
        with pytest.warns(UserWarning, match="skipping .*images smaller than data.size=32 px"):
            batch = first_batch("sr_high", tmp_path / source, 3, **{"data.lowres_size": 16})
        assert sorted(batch["caption"]) == big, source  # one pass: the large images only
    with pytest.warns(UserWarning, match="skipping 2 images smaller"):  # the image decoder too
        assert sorted(first_batch("decoder", tmp_path / "mixed", 3, mode="image")["caption"]) == big
    with pytest.raises(DataError, match="every image in .*small is smaller than data.size=32 px"):
        first_batch("sr_high", tmp_path / "small", 2, **{"data.lowres_size": 16})
    small = tiny("sr_high", **{"data.source": "images", "data.image_path": str(tmp_path / "small.tar"),
                               "data.size": 32, "data.lowres_size": 16})
    with pytest.raises(DataError, match=r"no captioned image in the shards .*small.tar.* is at least data.size=32"):
        StageDataModule(small).check()  # before training (its first batch raised it, in a worker: mid-training)
    for source in ("mixed", "mixed.tar"):  # the prior keeps every captioned image
        assert len(first_batch("prior", tmp_path / source, 5)["caption"]) == 5


def test_a_reader_whose_shards_hold_only_small_images_reads_the_others(tmp_path):
    """A shard of large images beside one of images below data.size: the tar headers count both alike,
    so each of two readers took one whole shard, and the one with the small images stopped the run
    ("no captioned images ... of at least data.size") though half the data fits. Each reader gets its
    share of the large images instead, none twice."""
    import tarfile

    import numpy as np
    from PIL import Image

    big = _image_text_pairs(tmp_path / "big", 4)  # 48 x 32
    (tmp_path / "small").mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((31, 48, 3), np.uint8)).save(tmp_path / "small" / f"small{i}.png")
        (tmp_path / "small" / f"small{i}.txt").write_text(f"small picture {i}")
    (tmp_path / "shards").mkdir()
    for name in ("big", "small"):
        with tarfile.open(tmp_path / "shards" / f"{name}.tar", "w") as tar:
            for file in sorted((tmp_path / name).iterdir()):
                tar.add(file, arcname=file.name)
    settings = {"data.source": "images", "data.image_path": str(tmp_path / "shards"), "data.size": 32,
                "data.lowres_size": 16, "data.shuffle_buffer": 0}
    stream = StageDataModule(tiny("sr_high", **settings)).check().train_set
    seen = []
    for rank in (0, 1):  # two readers (DDP ranks), a pass of the 4 large images between them
        stream.rank, stream.world = rank, 2
        seen += [sample["caption"] for sample, _ in zip(iter(stream), range(2))]
    assert sorted(seen) == big

    # shards said to be presized: each reader reads its own whole shard (I/O flat in the readers), so
    # the first reads a whole pass of the large images alone, and the second, given small ones, says why
    stream = StageDataModule(tiny("sr_high", **settings, **{"data.image_shards_presized": True})).check().train_set
    stream.rank, stream.world = 0, 2
    assert sorted(sample["caption"] for sample, _ in zip(iter(stream), range(4))) == big
    stream.rank = 1
    with pytest.warns(UserWarning, match="skipping images smaller"), \
            pytest.raises(DataError, match=r"no captioned images .* \(data.image_shards_presized: true says"):
        next(iter(stream))


def test_min_motion_trains_video_stages_on_the_clips_that_move(tmp_path):
    """An ingested still shot (colour bars) beside a moving one: data.min_motion keeps the moving clip
    for the video decoder, the image decoder keeps both, and a dataset without motion scores (written
    before the ingest measured them) is a data error, not a silently unfiltered run."""
    from data_prep.config import IngestConfig
    from data_prep.dataset import commit_version
    from data_prep.ingest import process_source
    from data_prep.sources import SourceRef
    from tests.test_ingest_clips import _concat_shots

    source = _concat_shots(tmp_path / "still-then-moving.mp4", [("smptebars", 50), ("testsrc2", 50)])
    ds = tmp_path / "root" / "datasets" / "shots"
    outcome = process_source(SourceRef(str(source), "file"), tmp_path / "root", ds, IngestConfig())
    commit_version(ds, outcome.clips, [], {}, 8)

    def train_set(stage_config, dataset="shots"):
        return StageDataModule(stage_config, tmp_path / "root", dataset).check().train_set

    moving = tiny("decoder", **{"data.min_motion": 1.0})
    with pytest.warns(UserWarning, match="skipping 1 clips moving less than data.min_motion=1"):
        kept = train_set(moving).rows.values()
    assert [row["start_frame"] for row in kept] == [50]
    assert len(train_set(tiny("decoder", mode="image", **{"data.min_motion": 1.0})).rows) == 2
    with pytest.raises(DataError, match=r"every clip of 'shots' is moving less than .*=50 \(most: 2\.\d\d\)"):
        train_set(tiny("decoder", **{"data.min_motion": 50.0}))
    write_synthetic_dataset(tmp_path / "root", "old", num_clips=2, frames=8, size=32)
    with pytest.raises(DataError, match="'old' was ingested before clips had a motion score"):
        train_set(moving, "old")


def test_a_prior_on_uncaptioned_clips_falls_back_to_source_names_only_where_configured(tmp_path):
    """tiny (the demo): a warning, and each clip captioned with its source's name; base/large
    (caption_fallback: error): a data error that says what to give instead."""
    write_synthetic_dataset(tmp_path, "plain", num_clips=3, frames=20, size=32, captions=False)
    with pytest.warns(UserWarning, match="captioning frames with their source file names"):
        dm = StageDataModule(tiny("prior"), tmp_path, "plain").check()
    assert {row["caption"] for row in dm.train_set.rows.values()} == {"0", "1", "2"}  # synthetic://plain/0/<i>
    for size in ("base", "large"):
        cfg = load_config(ROOT / "configs" / size / "prior.yaml", {"clip": "tiny", "data.size": 32})
        assert cfg.data.caption_fallback == "error"
        with pytest.raises(DataError, match="no clip of 'plain' has a caption; give image-text pairs"):
            StageDataModule(cfg, tmp_path, "plain").check()


def test_stride_realises_fps_and_fits_the_clip():
    import random

    from scipy.stats import beta

    rng = random.Random(0)
    strides = [draw_stride(30.0, 100, 16, (1.0, 30.0), (2.0, 1.0), rng) for _ in range(200)]
    assert min(strides) >= 1 and max(strides) <= 99 // 15
    assert len(set(strides)) > 1
    # a long clip (no cap): stride k is drawn as often as the target fps rounds to 30 / k, with the
    # target = 2 + 10 * Beta(1.5, 3) fps (P(stride = k) = P(30 / (k + 1/2) < target <= 30 / (k - 1/2)))
    n = 4000
    strides = [draw_stride(30.0, 10_000, 16, (2.0, 12.0), (1.5, 3.0), rng) for _ in range(n)]
    target = beta(1.5, 3.0, loc=2.0, scale=10.0)
    for k in range(2, 16):
        expected = target.cdf(30 / (k - 0.5)) - target.cdf(30 / (k + 0.5))
        assert strides.count(k) / n == pytest.approx(expected, abs=0.025), k


def test_the_fps_distribution_moves_from_high_to_low_over_training(tmp_path):
    """data.fps_beta -> fps_beta_end by max_steps (the paper's curriculum), decided by each sample's
    batch, so a resumed stream draws what the uninterrupted one would have."""
    from models.data import fps_beta_at

    cfg = tiny("decoder", **{"data.fps_beta": [8.0, 1.0], "data.fps_beta_end": [1.0, 8.0], "data.source": "clips",
                             "data.batch_size": 4})
    assert fps_beta_at(cfg.data, 0.0) == (8.0, 1.0) and fps_beta_at(cfg.data, 0.5) == (4.5, 4.5)
    assert fps_beta_at(cfg.data, 2.0) == (1.0, 8.0)
    write_synthetic_dataset(tmp_path, "long", num_clips=4, frames=120, size=16, fps=12)
    stream = StageDataModule(cfg, tmp_path, "long").check().train_set
    stream.batch_size, stream.batches_per_step, stream.total_steps = 4, 1, 20
    fps = [float(sample["fps"]) for sample, _ in zip(iter(stream), range(80))]  # 20 batches of 4
    first, last = sum(fps[:16]) / 16, sum(fps[-16:]) / 16
    assert first > 9 and last < 4, (first, last)  # 12 fps clips: strides 1 early, 3 and more late
    stream.resume_batches = 10  # resumed halfway: the same samples as the second half above
    assert [float(sample["fps"]) for sample, _ in zip(iter(stream), range(40))] == fps[40:]


def test_a_sample_that_does_not_decode_is_named_and_the_run_goes_on(tmp_path):
    """One broken image among scraped pairs stopped training with a trace, and --resume stopped at
    the same step again. It is named in a warning and the reader's last good sample stands in at
    the same position, so a resumed stream still draws what the uninterrupted one does; a reader
    whose samples mostly fail stops with a DataError naming the last."""
    from models.data import DataError

    _image_text_pairs(tmp_path / "pairs", 12)
    broken = tmp_path / "pairs" / "005.png"
    broken.write_bytes(b"not a png")
    cfg = tiny("prior", **{"data.source": "images", "data.image_path": str(tmp_path / "pairs"), "data.batch_size": 4})
    stream = StageDataModule(cfg).check().train_set
    stream.batch_size = 4
    with pytest.warns(UserWarning, match=rf"does not decode, another stands in \(1 so far\): {broken}"):
        captions = [sample["caption"] for sample, _ in zip(iter(stream), range(24))]  # two passes
    assert len(captions) == 24 and "picture number 5" not in captions
    assert all(captions.count(f"picture number {i}") >= 2 for i in range(12) if i != 5)
    stream.resume_batches = 3  # the second half, alone: the same samples
    with pytest.warns(UserWarning, match="does not decode"):
        assert [sample["caption"] for sample, _ in zip(iter(stream), range(12))] == captions[12:]

    for i in range(12):
        (tmp_path / "pairs" / f"{i:03d}.png").write_bytes(b"")  # every image gone to zero bytes
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"11 of 11 samples did not decode, the last "):
        next(iter(StageDataModule(cfg).check().train_set))


@pytest.mark.parametrize("broken_at", [0, 8], ids=["the readers first", "the first after the resume"])
def test_a_resumed_stream_draws_the_same_stand_in_wherever_the_sample_that_fails_is(tmp_path, broken_at):
    """The stand-in came from the last sample that decoded: at a reader's start there was none, and
    after a resume's skip neither (skipped samples are not decoded), so the stream moved on one
    sample there and every later sample was one off from the uninterrupted run's (a repeat, or one
    left out). Now it is an earlier item that decodes (at the start, a later one): the same in both."""
    _image_text_pairs(tmp_path / "pairs", 12)
    cfg = tiny("prior", **{"data.source": "images", "data.image_path": str(tmp_path / "pairs"), "data.batch_size": 4})
    stream = StageDataModule(cfg).check().train_set
    stream.batch_size = 4
    number = [sample["caption"] for sample, _ in zip(iter(stream), range(broken_at + 1))][-1].split()[-1]
    (tmp_path / "pairs" / f"{int(number):03d}.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="does not decode"):
        straight = [sample["caption"] for sample, _ in zip(iter(stream), range(24))]
    assert f"picture number {number}" not in straight
    stream.resume_batches = 2  # resumed after 8 samples
    with pytest.warns(UserWarning, match="does not decode"):  # (the second pass meets it too)
        assert [sample["caption"] for sample, _ in zip(iter(stream), range(16))] == straight[8:]


def test_a_missing_shard_is_found_before_training(tmp_path):
    from models.data import DataError

    write_synthetic_dataset(tmp_path, "shapes", num_clips=4, frames=12, size=32, fps=12)
    shard = next((tmp_path / "datasets" / "shapes" / "shards").glob("*.tar"))
    shard.unlink()  # a trace from a DataLoader worker, mid-run
    with pytest.raises(DataError, match=rf"1 of its 1 shards are missing, e.g. {shard}"):
        StageDataModule(tiny("decoder", **{"data.source": "shards"}), tmp_path, "shapes").check()


def test_every_stage_trains_with_finite_loss(chain):
    for name, result in chain.items():
        assert result.global_step == STEPS, name
        assert torch.isfinite(torch.tensor(result.train_loss)), name
        assert result.checkpoint.exists(), name
    ckpt = read_checkpoint(chain["interpolation"].checkpoint)
    assert ckpt["hyper_parameters"]["stage"] == "interpolation"
    assert ckpt["state_dict"]["net.conv_in.spatial.weight"].shape[1] == 7  # 3 + masked frames + mask


def test_weights_holding_nan_are_refused_for_init_and_sampling(chain, tmp_path):
    """Corrupt bytes in a checkpoint that still reads: --init trained to loss nan and sampling gave a
    black video, both exiting 0."""
    from models.stages import init_from_checkpoint

    ckpt = torch.load(chain["decoder_image"].checkpoint, map_location="cpu", weights_only=False)
    ckpt["state_dict"]["net.conv_out.spatial.weight"][0, 0, 0, 0] = float("nan")
    broken = tmp_path / "broken.ckpt"
    torch.save(ckpt, broken)
    message = rf"{broken}: weight conv_out.spatial.weight holds NaN or infinity"
    with pytest.raises(CheckpointError, match=message):
        load_stage(broken)
    with pytest.raises(CheckpointError, match=message):
        init_from_checkpoint(build_stage(tiny("decoder", mode="image")), broken)
    assert load_stage(chain["decoder_image"].checkpoint) is not None  # the file it came from loads


def test_video_decoder_trains_only_temporal_layers(chain):
    image = load_stage(chain["decoder_image"].checkpoint)
    video = load_stage(chain["decoder"].checkpoint)
    for name, p in image.net.state_dict().items():
        assert torch.equal(p, video.net.state_dict()[name]), name  # spatial frozen (freeze_spatial)
    temporal = [p for n, p in video.net.named_parameters() if "temporal.attn.to_out" in n]
    assert any(p.abs().sum() > 0 for p in temporal)  # zero-init output projections moved


def test_interpolation_with_frozen_spatial_layers_still_learns_its_new_input_channels():
    """The 4 input channels for the known frames start at zero: they train even with freeze_spatial."""
    stage = build_stage(tiny("interpolation", freeze_spatial=True))
    trained = {n for n, p in stage.net.named_parameters() if p.requires_grad}
    assert "conv_in.spatial.weight" in trained
    assert not any(n.startswith(("down", "up", "mid")) and "temporal" not in n for n in trained)


def test_loss_decreases(data_root, tmp_path):
    """Loss on a fixed batch, fixed noise and timesteps: before vs after 60 steps.

    30 steps left the ratio at 0.67-0.73 across seeds (flaky against 0.7); 60 give 0.50-0.58."""
    cfg = tiny("decoder", mode="image", **{"trainer.max_steps": 60, "data.batch_size": 8})
    torch.manual_seed(0)  # the batch's random windows
    batch = next(iter(StageDataModule(cfg, data_root, "shapes").check().train_dataloader()))
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(batch["image"].shape, generator=gen)
    t = torch.linspace(50, 950, batch["image"].shape[0]).long()

    def fixed_loss(module):
        module.config.cond_dropout = 0.0
        with torch.no_grad():
            x0, cond = module.conditioning(batch)
            return module.diffusion.loss(lambda x, tt: module.denoise(x, tt, cond), x0, noise, t).item()

    from models.stages import build_stage
    torch.manual_seed(0)
    before = fixed_loss(build_stage(cfg).eval())
    result = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path)
    after = fixed_loss(load_stage(result.checkpoint))
    assert after < 0.7 * before, (before, after)


def test_training_logs_its_speed_and_how_long_it_waited_for_data(data_root, tmp_path):
    """train/samples_per_s and train/data_wait in the run's metrics, and over the whole run (what `mav
    train` prints): a loader that takes 0.3 s more per batch shows as that wait (the share of each
    batch's time, times that time, is >= 0.3 s), and the same training without it waits for a
    smaller share."""
    import time

    import pandas as pd

    from models.train import TrainingSpeed, build_trainer

    cfg = tiny("decoder", mode="image", **{"trainer.log_every": 2, "data.num_workers": 0, "trainer.ema_decay": 0})

    def logged(delay: float, out: Path) -> tuple[pd.DataFrame, tuple]:
        datamodule = StageDataModule(cfg, data_root, "shapes").check()

        def batches():
            for batch in datamodule.train_dataloader():
                time.sleep(delay)
                yield batch

        trainer = build_trainer(cfg, out, max_steps=7)
        trainer.fit(build_stage(cfg), train_dataloaders=batches())
        metrics = pd.read_csv(out / "logs" / "version_0" / "metrics.csv")
        run = next(cb for cb in trainer.callbacks if isinstance(cb, TrainingSpeed)).run_speed()
        return pd.concat([metrics.dropna(subset=["train/data_wait"]),
                          pd.DataFrame([{"step": "run", "train/samples_per_s": run[0], "train/data_wait": run[1]}])])

    slow, fast = logged(0.3, tmp_path / "slow"), logged(0.0, tmp_path / "fast")
    # logged after steps 2, 4 and 6 (the CSV counts from 0), then the whole run's
    assert slow["step"].tolist() == fast["step"].tolist() == [1, 3, 5, "run"]
    seconds_per_batch = cfg.data.batch_size / slow["train/samples_per_s"]
    assert (slow["train/data_wait"] * seconds_per_batch >= 0.29).all() and (slow["train/data_wait"] < 1).all()
    assert (fast["train/data_wait"] < slow["train/data_wait"] - 0.1).all(), (fast, slow)
    assert (fast["train/samples_per_s"] > slow["train/samples_per_s"]).all()


@pytest.mark.parametrize("stage", ["prior", "decoder", "sr_high"])
def test_each_kind_of_stage_trains_and_counts_its_flops_at_every_precision_the_config_takes(
        stage, data_root, tmp_path):
    """The meta-device copy was built in float32 while a *-true precision's inputs are float64,
    float16 or bfloat16: the count raised after the first step and stopped the run. Later the
    U-Net's norms asked torch whether autocast was on for the meta device, which raised: no
    train/tflops for a U-Net at a *-true precision. The same step costs the same FLOPs in any dtype.
    Super-resolution at bf16-true stopped at its first step: the CPU has no bf16 antialiased resize."""
    per_sample = {}
    for precision in ("32-true", "64-true", "bf16-true"):
        cfg = tiny(stage, **({"mode": "image"} if stage == "decoder" else {}),
                   **{"trainer.precision": precision, "trainer.ema_decay": 0})
        result = train_stage(stage, cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / precision,
                             max_steps=2)
        assert result.tflops is not None, precision
        per_sample[precision] = result.tflops * 1e12 / result.samples_per_s
    assert per_sample["32-true"] > 0
    assert per_sample["64-true"] == pytest.approx(per_sample["32-true"])
    assert per_sample["bf16-true"] == pytest.approx(per_sample["32-true"])


@pytest.mark.parametrize("stage", ["decoder", "prior"])
def test_training_logs_model_tflops_counted_from_the_real_step(stage, data_root, tmp_path):
    """train/tflops = samples/s x the model FLOPs of one sample's step. The FLOPs, counted on the meta
    device from the first batch's shapes, equal a count of a real step's net forward and backward on
    the CPU (attention as matmuls); the video decoder's frozen spatial layers compute no weight
    gradients, so it costs less than the same net with every layer trained. No train/mfu on a CPU."""
    import pandas as pd
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from models.flops import math_attention

    common = {"trainer.log_every": 1, "trainer.ema_decay": 0}
    init = None
    if stage == "decoder":  # video mode with frozen spatial layers starts from an image-mode checkpoint
        init = train_stage(stage, tiny(stage, mode="image", **common), data_root=data_root, dataset="shapes",
                           out_dir=tmp_path / "image", max_steps=1).checkpoint
    cfg = tiny(stage, **common)
    result = train_stage(stage, cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / "run", init=init,
                         max_steps=3)
    metrics = pd.read_csv(tmp_path / "run" / "logs" / "version_0" / "metrics.csv").dropna(
        subset=["train/samples_per_s"])
    assert "train/mfu" not in metrics and result.mfu is None

    module = build_stage(cfg).train()  # a step on a batch of the config's shapes, counted for real
    batch = next(iter(StageDataModule(cfg, data_root, "shapes").check().train_dataloader()))
    x0, cond = module.conditioning(batch)
    counter = FlopCounterMode(display=False)
    with counter, math_attention(module), sdpa_kernel(SDPBackend.MATH):  # (the prior's torch attention)
        module.diffusion.loss(lambda x, t: module.denoise(x, t, cond), x0).backward()
    per_sample = counter.get_total_flops() / x0.shape[0]
    assert per_sample > 0
    expected = metrics["train/samples_per_s"] * per_sample / 1e12
    assert metrics["train/tflops"].tolist() == pytest.approx(expected.tolist())
    assert result.tflops == pytest.approx(result.samples_per_s * per_sample / 1e12)
    if stage == "decoder":  # video mode, spatial layers frozen
        every_layer = FlopCounterMode(display=False)
        for p in module.parameters():
            p.requires_grad_(True)
        with every_layer, math_attention(module):
            module.diffusion.loss(lambda x, t: module.denoise(x, t, cond), x0).backward()
        assert per_sample < 0.9 * every_layer.get_total_flops() / x0.shape[0]


def test_training_logs_the_learning_rate_of_each_step(data_root, tmp_path):
    """train/lr: the rate each step trained with, rising linearly over trainer.warmup_steps, then flat."""
    import pandas as pd

    cfg = tiny("decoder", mode="image", **{"trainer.log_every": 1, "trainer.warmup_steps": 4, "trainer.lr": 1e-3,
                                           "trainer.ema_decay": 0})
    train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path, max_steps=6)
    metrics = pd.read_csv(tmp_path / "logs" / "version_0" / "metrics.csv").dropna(subset=["train/lr"])
    assert metrics["train/lr"].tolist() == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


class RecordStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())  # live tensors otherwise
        self.weights = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_resume_continues_at_same_step_with_same_optimizer_state(data_root, tmp_path):
    """Also after the run folder moved (another mount point, a copy): the checkpoint names its
    old path, and the new `last.ckpt` must still replace the one resumed from."""
    cfg = tiny("prior", **{"trainer.ema_decay": 0.9})
    first = train_stage("prior", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / "run", max_steps=3)
    assert first.global_step == 3
    saved = read_checkpoint(first.checkpoint)
    (tmp_path / "run").rename(tmp_path / "moved")
    record = RecordStart()
    second = train_stage("prior", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / "moved",
                         resume=True, max_steps=5, callbacks=[record])
    assert record.step == 3 and second.global_step == 5
    assert read_checkpoint(second.checkpoint)["global_step"] == 5
    assert not list((tmp_path / "moved" / "checkpoints").glob("last-v*"))
    saved_opt = saved["optimizer_states"][0]
    assert record.optimizer["state"].keys() == saved_opt["state"].keys()
    for k, state in saved_opt["state"].items():
        assert torch.equal(record.optimizer["state"][k]["exp_avg"], state["exp_avg"])
        assert int(record.optimizer["state"][k]["step"]) == 3
    for k, v in saved["current_model_state"].items():  # raw (not EMA) weights are what training continues
        assert torch.equal(record.weights[k], v), k
    # more loader workers (as the speed log suggests when training waits for data): the stream's order
    # changes with them, which is said (it went on silently)
    faster = cfg.model_copy(update={"data": cfg.data.model_copy(update={"num_workers": 3})})
    with pytest.warns(UserWarning, match=r"other data-stream settings \(data.num_workers: checkpoint 0, config 3\)"):
        third = train_stage("prior", faster, data_root=data_root, dataset="shapes", out_dir=tmp_path / "moved",
                            resume=True, max_steps=6)
    assert third.global_step == 6


@pytest.mark.parametrize("stage,source,workers,precision", [
    ("decoder", "shards", 0, "32-true"), ("decoder", "clips", 2, "32-true"), ("sr_high", "shards", 0, "32-true"),
    ("decoder", "shards", 0, "64-true")])
def test_resumed_training_is_the_uninterrupted_training(data_root, tmp_path, stage, source, workers, precision):
    """--resume goes on with the samples, windows, crops, noise and timesteps that the uninterrupted
    run drew (it replayed the start of the data stream and of the random numbers): the same weights
    and EMA, bit for bit, from the shards and from the clip files, in one process or two workers
    (sr_high: with the low-res input's noise augmentation drawn every step too). At 64-true the
    resumed weights had passed through float32 (Lightning restored them before doubling the module)."""
    cfg = tiny(stage, mode="image", **{"data.source": source, "data.num_workers": workers,
                                       "data.batch_size": 3, "trainer.ema_decay": 0.5,
                                       "trainer.precision": precision})

    def train(name, steps, resume=False):
        return train_stage(stage, cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / name,
                           max_steps=steps, resume=resume)

    straight = train("straight", 5)
    train("resumed", 3)
    resumed = train("resumed", 5, resume=True)
    a, b = read_checkpoint(straight.checkpoint), read_checkpoint(resumed.checkpoint)
    for key in ("current_model_state", "state_dict"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), (key, name)


def test_a_resume_with_a_longer_trainer_max_steps_keeps_the_fps_curriculum_as_it_started(data_root, tmp_path):
    """The curriculum runs over the run length the run started with: raising trainer.max_steps for a
    resume trains on past it (at its end distribution) instead of re-timing the steps to come; also
    at a second resume, whose checkpoint's recorded config holds the raised trainer.max_steps."""
    cfg = tiny("decoder", freeze_spatial=False, **{"data.fps_beta": [8.0, 1.0], "data.fps_beta_end": [1.0, 8.0],
                                                   "data.batch_size": 3, "trainer.max_steps": 6})

    def train(name, config, steps, resume=False):
        return train_stage("decoder", config, data_root=data_root, dataset="shapes", out_dir=tmp_path / name,
                           max_steps=steps, resume=resume)

    straight = train("straight", cfg, 5)
    train("resumed", cfg, 2)
    longer = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_steps": 60})})
    train("resumed", longer, 3, resume=True)
    resumed = train("resumed", longer, 5, resume=True)
    a, b = read_checkpoint(straight.checkpoint), read_checkpoint(resumed.checkpoint)
    for name, value in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], value), name


class RecordWeights(Callback):
    """The trainable weights at the start and after every optimizer step."""

    def on_train_start(self, trainer, pl_module):
        self.names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        self.steps, self.first = [self.weights(pl_module)], trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.first + len(self.steps):  # batches that stepped the optimizer
            self.steps.append(self.weights(pl_module))

    def weights(self, pl_module):
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_averages_every_step_and_resumes_from_the_saved_average(data_root, tmp_path, accumulate):
    """One EMA update per optimizer step (with accumulate=2, two batches make one step), with the
    warm-up's decay min(0.5, (1+n)/(10+n)) at step n, counted on across the resume."""
    decay = 0.5
    cfg = tiny("decoder", mode="image", **{"trainer.ema_decay": decay, "trainer.accumulate_grad_batches": accumulate})
    first, second = RecordWeights(), RecordWeights()
    result = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path, max_steps=3,
                         callbacks=[first])
    saved = read_checkpoint(result.checkpoint)
    train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path, resume=True, max_steps=5,
                callbacks=[second])
    def average(ema, steps, first_step):
        for n, weights in enumerate(steps, start=first_step):
            d = min(decay, (1 + n) / (10 + n))
            ema = {k: d * ema[k] + (1 - d) * weights[k] for k in ema}
        return ema

    ema = average(dict(first.steps[0]), first.steps[1:], 0)
    for n in first.names:
        assert torch.allclose(saved["state_dict"][n], ema[n], atol=1e-6), n
        assert torch.equal(saved["current_model_state"][n], first.steps[-1][n]), n
    assert any(not torch.equal(ema[n], first.steps[-1][n]) for n in first.names)  # the average is not the last step
    for n in first.names:  # the second run continues the average, not a fresh one from the raw weights
        assert torch.equal(second.steps[0][n], first.steps[-1][n]), n
    ema = average(ema, second.steps[1:], 3)
    last = read_checkpoint(result.checkpoint)
    for n in first.names:
        assert torch.allclose(last["state_dict"][n], ema[n], atol=1e-6), n


def test_ema_of_16_bit_weights_is_averaged_in_float32(data_root, tmp_path):
    """At bf16-true the average was kept in bf16, where (1 - decay) times a step's change rounds
    away: after 4 steps it was 97 % off the exact average's move from the start (26 % of it done)."""
    decay = 0.99
    cfg = tiny("decoder", mode="image", **{"trainer.precision": "bf16-true", "trainer.ema_decay": decay,
                                           "trainer.ema_warmup": False})
    record = RecordWeights()
    result = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path, max_steps=4,
                         callbacks=[record])
    saved = read_checkpoint(result.checkpoint)["state_dict"]
    start = {n: w.double() for n, w in record.steps[0].items()}
    exact = dict(start)
    for weights in record.steps[1:]:
        exact = {n: decay * exact[n] + (1 - decay) * weights[n].double() for n in exact}

    def norm(diffs):
        return sum(d.norm() ** 2 for d in diffs) ** 0.5

    moved = norm(exact[n] - start[n] for n in record.names)
    assert moved > 0
    assert norm(saved[n].double() - exact[n] for n in record.names) < 1e-3 * moved


def test_ema_warmup_reaches_the_configured_decay_and_can_be_turned_off():
    from models.ema import ShardedEMA

    warm, plain = ShardedEMA(0.9999), ShardedEMA(0.9999, warmup=False)
    assert warm.decay_at(0) == 0.1 and warm.decay_at(90) == 0.91 and warm.decay_at(10**6) == 0.9999
    assert plain.decay_at(0) == plain.decay_at(10**6) == 0.9999
    assert tiny("prior", **{"trainer.ema_warmup": False}).trainer.ema_warmup is False


def test_bad_input_fails_before_training(data_root, tmp_path, chain):
    def run(stage, cfg, **kw):
        return train_stage(stage, cfg, data_root=kw.pop("data_root", data_root), dataset=kw.pop("dataset", "shapes"),
                           out_dir=tmp_path / "bad", **kw)

    with pytest.raises(ValueError, match="unknown stage"):
        run("upscaler", tiny("decoder"))
    with pytest.raises(ConfigError, match="config is for 'prior'"):
        run("decoder", tiny("prior"))
    with pytest.raises(CheckpointError, match="'prior' checkpoint"):
        run("decoder", tiny("decoder"), init=chain["prior"].checkpoint)
    # another shape: the message names the setting, then the weights
    with pytest.raises(CheckpointError, match=r"do not fit this decoder model \(unet.channels: checkpoint 16, "
                                              r"config 32; .*weight"):
        run("decoder", tiny("decoder", **{"unet.channels": 32}), init=chain["decoder"].checkpoint)
    with pytest.raises(CheckpointError, match=r"do not fit this sr_high model \(unet.attn_levels: checkpoint \[1\], "
                                              r"config \[\]; unexpected"):
        run("sr_high", tiny("sr_high"), init=chain["sr_low"].checkpoint)  # the tiny configs' attention differs
    with pytest.raises(DataError, match="shorter than the 40-frame window"):
        run("decoder", tiny("decoder", freeze_spatial=False, **{"data.frames": 40}))
    with pytest.raises(DataError, match=r"smaller than data.size=128 px \(largest short side: 64 px\)"):
        run("sr_high", tiny("sr_high", **{"data.size": 128}))
    write_synthetic_dataset(tmp_path / "empty", "none", num_clips=0)  # no version at all
    with pytest.raises(DataError, match=r"^dataset 'none' has no version yet under \S+empty/datasets$"):
        run("decoder", tiny("decoder", freeze_spatial=False), data_root=tmp_path / "empty", dataset="none")
    with pytest.raises(FileNotFoundError, match="resume"):
        run("decoder", tiny("decoder"), resume=True)
    with pytest.raises(ValueError, match="--init only starts a new run"):  # --init would be ignored
        run("decoder", tiny("decoder"), resume=True, init=chain["decoder_image"].checkpoint)
    with pytest.raises(ConfigError, match="frozen cannot learn"):  # trained a constant, without a word
        run("decoder", tiny("decoder"))
    with pytest.raises(ConfigError, match="frozen cannot learn"):  # a config mistake: found before the data is read
        run("decoder", tiny("decoder"), data_root=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="trained for other settings .*diffusion.prediction: checkpoint"):
        run("decoder", tiny("decoder", **{"diffusion.prediction": "sample"}), init=chain["decoder_image"].checkpoint)
    resumable = tmp_path / "resumable"
    shutil.copytree(chain["decoder"].checkpoint.parent.parent, resumable)
    with pytest.raises(CheckpointError, match=r"config changed \(trainer.lr: checkpoint"):
        train_stage("decoder", tiny("decoder", **{"trainer.lr": 0.5}), data_root=data_root, dataset="shapes",
                    out_dir=resumable, resume=True)
    with pytest.raises(CheckpointError, match=r"config changed \(data.batch_size: checkpoint 4, config 2"):
        train_stage("decoder", tiny("decoder", **{"data.batch_size": 2}), data_root=data_root, dataset="shapes",
                    out_dir=resumable, resume=True)  # the data stream would skip the wrong number of samples
    with pytest.raises(CheckpointError, match=r"config changed \(trainer.ema_warmup: checkpoint True, config False"):
        train_stage("decoder", tiny("decoder", **{"trainer.ema_warmup": False}), data_root=data_root,
                    dataset="shapes", out_dir=resumable, resume=True)  # the average's schedule would change midway
    with pytest.raises(ValueError, match="unet.groups: 5 groups do not divide a layer's 16 channels"):
        run("decoder", tiny("decoder", freeze_spatial=False, **{"unet.groups": 5}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer: accelerator gpu, devices auto"):
            run("decoder", tiny("decoder", freeze_spatial=False, **{"trainer.accelerator": "gpu"}))
    with pytest.raises(DataError, match="images are for image-mode stages"):
        run("decoder", tiny("decoder", freeze_spatial=False, **{"data.source": "images", "data.image_path": "x"}))
    done = chain["decoder"].checkpoint
    with pytest.raises(FileExistsError, match="earlier run's: pass --resume"):  # would hide that run's last.ckpt
        train_stage("decoder", tiny("decoder"), data_root=data_root, dataset="shapes", out_dir=done.parent.parent)
    assert read_checkpoint(done)["global_step"] == STEPS
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_trainer_settings_lightning_refuses_are_config_errors_naming_them(data_root, tmp_path):
    """README: an accelerator, device count or precision Lightning refuses stops `mav train` with an
    error naming the key. GPU ids on the CPU accelerator (Lightning's TypeError) and a precision whose
    package is missing (ModuleNotFoundError) came out as a traceback instead."""
    import importlib.util
    import re

    cases = [({"trainer.accelerator": "cpu", "trainer.devices": [0]}, "devices [0]")]
    if importlib.util.find_spec("transformer_engine") is None:
        cases.append(({"trainer.precision": "transformer-engine"}, "precision transformer-engine"))
    for overrides, named in cases:
        cfg = tiny("decoder", freeze_spatial=False, mode="image", **overrides)
        with pytest.raises(ConfigError, match=rf"^trainer: accelerator .*{re.escape(named)}"):
            train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path / "run")
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_several_samples_name_their_prompts_for_evaluation(chain, tmp_path):
    """prompts.json beside the videos ({file: prompt}, what `mav evaluate --fake` reads) and
    samples.json (prompt, seed: seed + i, what sampled it); a later run into the same folder
    overwrites some videos, and every video there keeps its own entries."""
    import json
    import re

    from flows.eval_sources import resolve_source
    from models.sampling import sample_videos

    ckpts = {s: chain[s].checkpoint for s in ("prior", "decoder")}
    made = sample_videos(["a", "b", "c"], ckpts, tmp_path, steps=1, gif=False, seed=7, batch_size=2)
    assert [r.seed for r in made] == [7, 8, 9]
    sample_videos(["d"], ckpts, tmp_path, steps=2, gif=False, seed=3)
    assert json.loads((tmp_path / "prompts.json").read_text()) == \
        {"sample-0000.mp4": "d", "sample-0001.mp4": "b", "sample-0002.mp4": "c"}
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["sample-0000.mp4", "sample-0001.mp4", "sample-0002.mp4"]
    records = json.loads((tmp_path / "samples.json").read_text())
    assert {name: (r["prompt"], r["seed"], r["sampled_with"]["steps"]) for name, r in records.items()} == \
        {"sample-0000.mp4": ("d", 3, 2), "sample-0001.mp4": ("b", 8, 1), "sample-0002.mp4": ("c", 9, 1)}
    decoder = records["sample-0001.mp4"]["sampled_with"]["checkpoints"]["decoder"]
    assert decoder["path"] == str(chain["decoder"].checkpoint.resolve())
    assert decoder["size"] == chain["decoder"].checkpoint.stat().st_size
    # scored as one set, the two runs' videos (other --steps) are refused before any decoding
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}: its videos come from 2 sampling runs with different "
                                                   "steps (sample-0000.mp4 and sample-0001.mp4; see")):
        resolve_source(str(tmp_path))
    # the third video, sampled in the second batch, is the one its seed gives alone
    alone = sample_videos(["c"], ckpts, tmp_path / "alone", steps=1, gif=False, seed=9)[0]
    assert (alone.frames.int() - made[2].frames.int()).abs().max() <= 1  # uint8 rounding of float noise
    assert (made[1].frames.int() - made[2].frames.int()).abs().max() > 1


def test_evaluate_from_checkpoints_logs_the_videos_it_scored(chain, prefect_server, tmp_path, capsys):
    """`mav evaluate --checkpoints` logs its samples (and their prompts) to the run's samples/ and
    leaves no temporary folder behind; scoring that run again gives the same CLIPSIM. With
    --sample-dir the videos also stay there."""
    import json
    import re
    import tempfile

    import mlflow
    import numpy as np

    from flows.cli import main
    from models.video_io import write_mp4

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for stage in ("prior", "decoder"):
        (ckpts / f"{stage}.ckpt").symlink_to(chain[stage].checkpoint)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    common = ["--metrics", "clipsim", "--clip", "tiny", "--tracking-uri", uri, "--bootstrap", "0"]
    temp_before = set(Path(tempfile.gettempdir()).glob("mav-samples-*"))

    assert main(["evaluate", "--checkpoints", str(ckpts), "--prompts", str(tmp_path / "prompts.txt"),
                 "--sample-steps", "1", *common]) == 0
    first = capsys.readouterr()
    run_id = first.err.split("mlflow run: ")[1].split()[0]
    assert set(Path(tempfile.gettempdir()).glob("mav-samples-*")) == temp_before
    client = mlflow.MlflowClient(uri)
    logged = sorted(a.path for a in client.list_artifacts(run_id, "samples"))
    assert logged == ["samples/prompts.json", "samples/sample-0000.mp4", "samples/sample-0001.mp4",
                      "samples/samples.json"]
    prompts = json.loads(Path(client.download_artifacts(run_id, "samples/prompts.json", str(tmp_path))).read_text())
    assert prompts == {"sample-0000.mp4": "a red circle", "sample-0001.mp4": "a blue square"}
    records = json.loads(Path(client.download_artifacts(run_id, "samples/samples.json", str(tmp_path))).read_text())
    assert {name: r["seed"] for name, r in records.items()} == {"sample-0000.mp4": 0, "sample-0001.mp4": 1}
    params = client.get_run(run_id).data.params
    prior, decoder = (chain[stage].checkpoint.resolve() for stage in ("prior", "decoder"))
    assert params["checkpoints"] == f"prior={prior},decoder={decoder}"  # what the links pointed at
    assert params["fake_kind"] == "sampled" and params["sample_steps"] == "1"

    assert main(["evaluate", "--fake", f"runs:/{run_id}", *common]) == 0  # the logged videos, their prompts
    again = capsys.readouterr()
    clipsim = [line for line in first.out.splitlines() if "clipsim" in line]
    assert clipsim and clipsim == [line for line in again.out.splitlines() if "clipsim" in line]

    kept = tmp_path / "kept"
    assert main(["evaluate", "--checkpoints", str(ckpts), "--prompts", str(tmp_path / "prompts.txt"),
                 "--sample-steps", "1", "--sample-dir", str(kept), *common]) == 0
    assert sorted(p.name for p in kept.iterdir()) == ["prompts.json", "sample-0000.mp4", "sample-0001.mp4",
                                                      "samples.json"]
    assert main(["evaluate", "--fake", str(kept), "--sample-dir", str(kept), *common]) == 2
    assert "--sample-dir is where videos sampled from --checkpoints or --registry go" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoints", str(ckpts), "--prompts", str(tmp_path / "prompts.txt"),
                 "--sample-dir", str(kept), *common]) == 2  # the kept samples are not overwritten
    assert f"--sample-dir {kept}: holds videos already" in capsys.readouterr().err

    # scoring fails after sampling (sampled videos shorter than the clip, known only once they are):
    # the samples stay
    real = tmp_path / "real"
    real.mkdir()
    write_mp4(np.zeros((64, 16, 16, 3), np.uint8), real / "a.mp4", fps=4)
    write_mp4(np.zeros((64, 16, 16, 3), np.uint8), real / "b.mp4", fps=4)
    assert main(["evaluate", "--checkpoints", str(ckpts), "--prompts", str(tmp_path / "prompts.txt"),
                 "--sample-steps", "1", "--real", str(real), *common, "--metrics", "fvd", "--clip-length", "64"]) == 2
    err = capsys.readouterr().err
    kept_in = re.search(r"the sampled videos are kept in (\S+)", err)
    assert kept_in and sorted(p.name for p in Path(kept_in.group(1)).glob("*.mp4")) == ["sample-0000.mp4",
                                                                                        "sample-0001.mp4"]
    shutil.rmtree(kept_in.group(1))


def test_mav_sample_writes_what_it_says_and_is_seeded(chain, tmp_path, capsys):
    """`mav sample` from the layout the pipeline links (DIR/<stage>/checkpoints/last.ckpt): several
    prompts go to the folder named by --out, with GIF previews and prompts.json; the same --seed
    gives the same videos, another seed others."""
    import json

    import numpy as np

    from flows.cli import main
    from models.video_io import read_frames

    ckpts = tmp_path / "ckpts"
    for stage in ("prior", "decoder"):
        (ckpts / stage / "checkpoints").mkdir(parents=True)
        (ckpts / stage / "checkpoints" / "last.ckpt").symlink_to(chain[stage].checkpoint)

    def sample(name, seed):
        assert main(["sample", "--checkpoints", str(ckpts), "--steps", "1", "--device", "cpu", "--seed", str(seed),
                     "--prompt", "a red circle", "--prompt", "a blue square", "--out", str(tmp_path / name)]) == 0
        return capsys.readouterr().out

    said = sample("video.mp4", 3)
    folder = tmp_path / "video"
    assert sorted(p.name for p in folder.iterdir()) == ["prompts.json", "sample-0000.gif", "sample-0000.mp4",
                                                        "sample-0001.gif", "sample-0001.mp4", "samples.json"]
    assert json.loads((folder / "prompts.json").read_text()) == {"sample-0000.mp4": "a red circle",
                                                                 "sample-0001.mp4": "a blue square"}
    records = json.loads((folder / "samples.json").read_text())
    assert {name: (r["prompt"], r["seed"]) for name, r in records.items()} == \
        {"sample-0000.mp4": ("a red circle", 3), "sample-0001.mp4": ("a blue square", 4)}
    for i, prompt in enumerate(("a red circle", "a blue square")):
        frames, fps = read_frames(folder / f"sample-{i:04d}.mp4")
        t, h, w, _ = frames.shape
        assert f"{prompt!r}: {t} frames {w}x{h} @ {fps:g} fps, seed {3 + i} -> {folder / f'sample-{i:04d}.mp4'}" in said
    sample("same.mp4", 3)
    sample("other.mp4", 4)
    first, same, other = (read_frames(tmp_path / name / "sample-0001.mp4")[0] for name in ("video", "same", "other"))
    assert np.array_equal(first, same) and not np.array_equal(first, other)
    # the second prompt alone, with the seed it had in the batch: the same video
    assert main(["sample", "--checkpoints", str(ckpts), "--steps", "1", "--device", "cpu", "--seed", "4",
                 "--prompt", "a blue square", "--out", str(tmp_path / "alone.mp4")]) == 0
    assert "seed 4 -> " in capsys.readouterr().out
    alone = read_frames(tmp_path / "alone.mp4")[0]
    assert np.abs(alone.astype(int) - first).max() <= 1 < np.abs(other.astype(int) - first).max()


def test_mav_sample_that_cannot_write_its_video_says_so_in_one_line(chain, tmp_path, capsys):
    """A full disk while ffmpeg writes (here a file size limit: the kernel stops ffmpeg as a full disk
    would) is the one-line write error of `mav sample`, exit 1, and leaves no file; it was a
    RuntimeError and a traceback."""
    import resource

    from flows.cli import main

    out = tmp_path / "out"
    args = ["sample", "--prior", str(chain["prior"].checkpoint), "--decoder", str(chain["decoder"].checkpoint),
            "--steps", "1", "--device", "cpu", "--prompt", "a red circle", "--out", str(out / "video.mp4")]
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, limits[1]))  # inherited by ffmpeg; far below a 16-frame mp4
    try:
        code = main(args)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(f"error: writing the video under {out / 'video.mp4'}: ")
    assert "ffmpeg failed: killed by SIGXFSZ" in err[-1]
    assert list(out.iterdir()) == []  # neither the video nor ffmpeg's temp file


def test_mav_sample_names_a_link_in_checkpoints_whose_checkpoint_is_gone(chain, tmp_path, capsys):
    """--checkpoints DIR of links (as the pipeline's mav-runs/checkpoints) where a stage's run was
    deleted: the dangling link is an error naming it; it was skipped, so an optional stage was
    silently left out of the chain (a smaller video) and a required one was said to be missing."""
    from flows.cli import main

    links = tmp_path / "links"
    links.mkdir()
    for stage in ("prior", "decoder", "interpolation"):
        (links / f"{stage}.ckpt").symlink_to(chain[stage].checkpoint)
    gone = tmp_path / "deleted-run" / "last.ckpt"
    args = ["sample", "--checkpoints", str(links), "--steps", "1", "--device", "cpu", "--prompt", "a red circle",
            "--out", str(tmp_path / "video.mp4")]
    for stage in ("interpolation", "prior"):
        (links / f"{stage}.ckpt").unlink()
        (links / f"{stage}.ckpt").symlink_to(gone)
        assert main(args) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == \
            f"error: checkpoint not found: {links / f'{stage}.ckpt'} (a link to {gone}, which does not exist)"
    assert not (tmp_path / "video.mp4").exists()


def test_checkpoints_recorded_before_a_config_rule_still_load_for_sampling(chain, tmp_path):
    """Training now refuses an interpolation skip the net never trained on and attention levels the
    U-Net lacks; checkpoints that recorded such configs (and Lightning's precision aliases, device
    strings) load as they did."""
    ckpt = read_checkpoint(chain["interpolation"].checkpoint)
    recorded = ckpt["hyper_parameters"]["config"]
    recorded["data"]["max_skip"] = 3  # below sampling.skip = 5
    recorded["unet"]["attn_levels"] = [*recorded["unet"]["attn_levels"], 7]
    recorded["trainer"] |= {"precision": "bf16", "devices": "0,1"}
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(ConfigError, match=r"unet.attn_levels: levels are 0 to 1 .*, got \[1, 7\]"):
        parse_config(recorded)
    with pytest.raises(ConfigError, match="sampling.skip: the net trains on skips 2 to data.max_skip = 3"):
        parse_config(recorded | {"unet": {**recorded["unet"], "attn_levels": [1]}})
    loaded = load_stage(old, "interpolation")
    assert loaded.config.sampling.skip == 5 and loaded.config.trainer.precision == "bf16"
    reference = load_stage(chain["interpolation"].checkpoint, "interpolation")
    assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), reference.net.state_dict().values()))
    ckpt["hyper_parameters"]["config"]["unet"]["heads"] = 0  # no such net ever trained: named with its file
    torch.save(ckpt, old)
    with pytest.raises(ConfigError, match=f"{old}: its recorded config: unet.heads"):
        load_stage(old, "interpolation")


def test_the_chain_refuses_or_warns_of_checkpoints_that_do_not_fit_together(chain, tmp_path):
    """An image decoder or stages of different CLIPs: errors; an image-mode sr_low or an interpolation
    net trained at another size than the decoder's: warnings (they run, worse)."""
    import warnings

    from models.sampling import load_chain

    ckpts = {s: chain[s].checkpoint for s in ("prior", "decoder")}
    with pytest.raises(ValueError, match="decoder checkpoint .* is an image decoder"):
        load_chain({**ckpts, "decoder": chain["decoder_image"].checkpoint})
    with pytest.warns(UserWarning, match="sr_low checkpoint .* is an image-mode one: it super-resolves frame by"):
        load_chain({**ckpts, "sr_low": chain["sr_low_image"].checkpoint})
    other = torch.load(chain["decoder"].checkpoint, map_location="cpu", weights_only=False)
    from models.clip import build_tiny_clip

    # another tiny CLIP: the same embedding width, another embedding space
    other["hyper_parameters"]["config"]["clip"] = str(build_tiny_clip(tmp_path / "clip", seed=1))
    torch.save(other, tmp_path / "decoder.ckpt")
    with pytest.raises(ValueError, match="different CLIP models"):
        load_chain({**ckpts, "decoder": tmp_path / "decoder.ckpt"})
    larger = torch.load(chain["interpolation"].checkpoint, map_location="cpu", weights_only=False)
    larger["hyper_parameters"]["config"]["data"]["size"] = 32  # the same weights, said to be trained at 32 px
    torch.save(larger, tmp_path / "interpolation.ckpt")
    with pytest.warns(UserWarning, match=r"interpolation checkpoint \(\S+\) trained on 32 px frames and the decoder "
                                         "makes 16 px ones"):
        load_chain({**ckpts, "interpolation": tmp_path / "interpolation.ckpt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_chain({**ckpts, "interpolation": chain["interpolation"].checkpoint})


def test_interpolation_of_very_short_decoder_outputs(chain):
    """Fewer decoder frames than one window's known frames: windows shrink to what there is."""
    from models.sampling import interpolate_frames, load_chain, seeded

    loaded = load_chain({s: chain[s].checkpoint for s in ("prior", "decoder", "interpolation")})
    net, generators, size = loaded["interpolation"], seeded(0, 1), loaded["interpolation"].config.data.size
    image_emb = loaded["prior"].sample(["a red circle"], generators, steps=1)
    for t in (2, 3):
        video = torch.rand(1, 3, t, size, size) * 2 - 1
        out = interpolate_frames(net, video, image_emb, 4.0, 5, generators, steps=1)
        assert out.shape == (1, 3, (t - 1) * 5 + 1, size, size)
        assert torch.equal(out[:, :, ::5], video)  # the decoder's frames are kept exactly
    with pytest.raises(ValueError, match="at least 2 frames"):
        interpolate_frames(net, video[:, :, :1], image_emb, 4.0, 5, generators)
    # the frames in between are generated from the known ones (the same noise, other known frames);
    # a few training steps leave the zero-initialised input weights small, hence the small bound
    a, b = (interpolate_frames(net, v, image_emb, 4.0, 5, seeded(1, 1), steps=1)
            for v in (video, -video))
    assert (a[:, :, 1:5] - b[:, :, 1:5]).abs().max() > 1e-6


def test_known_frames_and_mask_are_the_interpolation_nets_extra_channels():
    from models.stages import InterpolationStage

    video = torch.rand(2, 3, 6, 4, 4) * 2 - 1
    mask = torch.zeros(1, 1, 6, 1, 1)
    mask[:, :, ::5] = 1
    extra = InterpolationStage.extra(video, mask)
    assert extra.shape == (2, 4, 6, 4, 4)
    assert torch.equal(extra[:, :3, ::5], video[:, :, ::5]) and not extra[:, :3, 1:5].any()
    assert torch.equal(extra[:, 3], mask.expand(2, 1, 6, 4, 4)[:, 0])


def test_sr_high_starts_every_frame_of_a_clip_from_the_same_noise(chain):
    """A clip of identical frames comes out as identical frames (per-frame noise would differ),
    and two clips of a batch get different noise, each from its own generator."""
    from models.sampling import seeded, super_resolve_frames

    net = load_stage(chain["sr_high"].checkpoint, "sr_high")
    low = net.config.data.lowres_size
    still = (torch.rand(1, 3, 1, low, low) * 2 - 1).expand(2, 3, 3, low, low).contiguous()
    out = super_resolve_frames(net, still, seeded(0, 2), steps=1, frames_per_batch=2)
    assert out.shape == (2, 3, 3, net.config.data.size, net.config.data.size)
    assert torch.allclose(out[:, :, 1:], out[:, :, :1].expand_as(out[:, :, 1:]), atol=1e-6)
    assert (out[0] - out[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="1 generators for 2 videos: give one per video"):
        super_resolve_frames(net, still, seeded(0, 1), steps=1)


def test_lowres_noise_augmentation_noises_the_input_by_the_schedule_and_tells_the_net(chain):
    """Imagen's noise conditioning augmentation: the low-res input at level l is q(x_t | x_0) of the
    diffusion schedule at t = l * (T - 1), and the net sees t; off, the input is the clean upsample."""
    net = load_stage(chain["sr_high"].checkpoint, "sr_high")
    low_size, size = net.config.data.lowres_size, net.config.data.size
    low, noise = torch.rand(2, 3, low_size, low_size) * 2 - 1, torch.randn(2, 3, low_size, low_size)
    cond = net.lowres_condition(low, size, torch.tensor([0.0, 0.5]), noise)
    t = torch.tensor([0, round(0.5 * 999)])
    assert cond["noise_level"].tolist() == t.tolist()
    alpha_bar = net.diffusion.schedule.alphas_cumprod[t].view(2, 1, 1, 1)
    expected = net.upsample(alpha_bar.sqrt() * low + (1 - alpha_bar).sqrt() * noise, size)
    assert torch.allclose(cond["extra"], expected, atol=1e-5)
    assert (cond["extra"][1] - net.upsample(low, size)[1]).std() > 0.2  # level 0.5 is no longer the clean input
    x, step = torch.randn(2, 3, size, size), torch.tensor([500, 500])
    with torch.no_grad():  # the level is an input of the net
        a = net.denoise(x, step, cond)
        b = net.denoise(x, step, {**cond, "noise_level": cond["noise_level"].flip(0)})
    assert (a - b).abs().max() > 1e-4
    # in training the levels are drawn from [0, data.lowres_noise_max]
    levels = torch.cat([net.conditioning({"image": torch.rand(4, 3, size, size) * 2 - 1})[1]["noise_level"]
                        for _ in range(25)])
    assert levels.min() >= 0 and levels.max() <= 0.5 * 999 and levels.std() > 50

    off = build_stage(tiny("sr_high", **{"data.lowres_noise_max": 0.0, "sampling.lowres_noise": 0.0}))
    assert not hasattr(off.net, "noise_level_embed")
    assert off.lowres_condition(low, size, 0.5, noise).keys() == {"extra"}
    assert torch.equal(off.lowres_condition(low, size, 0.5, noise)["extra"], off.upsample(low, size))


def test_init_and_resume_across_lowres_noise_augmentation_name_the_setting(chain, data_root, tmp_path):
    from models.stages import init_from_checkpoint

    off = {"data.lowres_noise_max": 0.0, "sampling.lowres_noise": 0.0}
    with pytest.raises(CheckpointError, match="it was trained with low-res noise augmentation: set "
                                              "data.lowres_noise_max > 0; missing|unexpected"):
        init_from_checkpoint(build_stage(tiny("sr_low", **off)), chain["sr_low_image"].checkpoint)
    plain = train_stage("sr_high", tiny("sr_high", **off), data_root=data_root, dataset="shapes",
                        out_dir=tmp_path / "plain", max_steps=1)
    with pytest.raises(CheckpointError, match="it was trained without low-res noise augmentation: set "
                                              "data.lowres_noise_max and sampling.lowres_noise to 0"):
        init_from_checkpoint(build_stage(tiny("sr_high")), plain.checkpoint)
    with pytest.raises(CheckpointError, match=r"data.lowres_noise_max: checkpoint 0.0, config 0.5"):
        train_stage("sr_high", tiny("sr_high"), data_root=data_root, dataset="shapes", out_dir=tmp_path / "plain",
                    max_steps=2, resume=True)


def test_time_windows_cover_the_clip_at_the_training_length():
    from models.sampling import time_windows

    for frames, window, overlap in [(76, 8, 4), (76, 8, 0), (76, 6, 3), (9, 8, 7), (8, 8, 2), (5, 8, 4)]:
        windows = time_windows(frames, window, overlap)
        assert windows[0].start == 0 and windows[-1].stop == frames
        assert all(w.stop - w.start == min(window, frames) for w in windows)
        assert all(a.stop - b.start >= overlap for a, b in zip(windows, windows[1:]))  # shared, no gap
        fewest = 1 if frames <= window else -(-(frames - overlap) // (window - overlap))
        assert len(windows) == fewest, (frames, window, overlap)


def test_windowed_denoising_averages_the_windows_that_share_a_frame():
    from models.sampling import denoise_in_windows, time_windows

    x, extra = torch.randn(2, 3, 20, 4, 4), torch.randn(2, 3, 20, 4, 4)
    cond, t = {"extra": extra, "fps": torch.tensor([4.0, 8.0])}, torch.tensor(2.0)
    seen = []

    def window_mean(x_t, t, cond):  # mixes frames: each window predicts its own mean over time
        seen.append((x_t.shape[2], cond["extra"].shape[2], cond["fps"].tolist()))
        return ((x_t + cond["extra"]).mean(2, keepdim=True) * t).expand_as(x_t)

    out = denoise_in_windows(window_mean, window=8, overlap=4)(x, t, cond)
    windows = time_windows(20, 8, 4)
    assert seen == [(8, 8, [4.0, 8.0])] * len(windows)
    for f in range(20):
        holders = [2.0 * (x + extra)[:, :, w].mean(2) for w in windows if w.start <= f < w.stop]
        assert torch.allclose(out[:, :, f], torch.stack(holders).mean(0), atol=1e-6)

    def per_frame(x_t, t, cond):  # no mixing: windows change nothing
        return torch.tanh(x_t * cond["extra"]) * t
    assert torch.allclose(denoise_in_windows(per_frame, 8, 4)(x, t, cond), per_frame(x, t, cond), atol=1e-6)


@pytest.mark.parametrize("overlap,windows_per_step", [(None, 4), (0, 3)])
def test_sr_low_sees_only_windows_of_its_training_length(chain, overlap, windows_per_step):
    """13 frames through the 6-frame sr_low: overlapping full windows (by default half a window
    shared), never a short remainder; every frame super-resolved."""
    from models.sampling import seeded, super_resolve_video

    net = load_stage(chain["sr_low"].checkpoint, "sr_low")
    net.config.sampling.window_overlap = overlap
    lengths, levels, denoise = [], [], net.denoise
    net.denoise = lambda x_t, t, cond: (lengths.append(x_t.shape[2]) or levels.append(cond["noise_level"].tolist())
                                        or denoise(x_t, t, cond))
    low, size = net.config.data.lowres_size, net.config.data.size
    video = torch.rand(1, 3, 13, low, low) * 2 - 1
    out = super_resolve_video(net, video, 8.0, seeded(0, 1), steps=2)
    assert out.shape == (1, 3, 13, size, size) and torch.isfinite(out).all()
    assert set(lengths) == {net.config.data.frames} and len(lengths) == 2 * windows_per_step
    assert levels == [[round(net.config.sampling.lowres_noise * 999)]] * len(lengths) == [[100]] * len(lengths)
    levels.clear()
    super_resolve_video(net, video, 8.0, seeded(0, 1), steps=1, lowres_noise=0.3)
    assert levels == [[300]] * windows_per_step


def test_image_mode_sr_low_super_resolves_frame_by_frame_in_windows(chain):
    from models.sampling import seeded, super_resolve_video

    net = load_stage(chain["sr_low_image"].checkpoint, "sr_low")
    lengths, denoise = [], net.denoise
    net.denoise = lambda x_t, t, cond: lengths.append(x_t.shape[2]) or denoise(x_t, t, cond)
    low, size = net.config.data.lowres_size, net.config.data.size
    video = (torch.rand(1, 3, 1, low, low) * 2 - 1).expand(1, 3, 13, low, low).contiguous()
    out = super_resolve_video(net, video, 8.0, seeded(0, 1), steps=1)
    assert out.shape == (1, 3, 13, size, size)
    assert lengths == [6, 6, 6]  # no overlap: 0-6, 6-12, and 7-13 for the last frame
    assert (out[:, :, 1:] - out[:, :, :1]).abs().max() > 1e-3  # its own noise per frame: no temporal layers


def test_sampling_refuses_a_lowres_noise_the_sr_stages_never_trained_on_before_sampling(chain):
    from models.sampling import generate, load_chain

    loaded = load_chain({s: chain[s].checkpoint for s in ("prior", "decoder", "sr_low", "sr_high")})
    sampled = []
    loaded["prior"].sample = lambda *a, **k: sampled.append(1)
    with pytest.raises(ValueError, match="lowres noise 0.9: the sr_low checkpoint trained on levels from 0 to "
                                         "data.lowres_noise_max = 0.5"):
        generate(loaded, ["a red ball"], lowres_noise=0.9)
    for guidance in (float("nan"), float("inf"), -1.0):  # nan gave an all-black video
        with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
            generate(loaded, ["a red ball"], guidance=guidance)
    assert not sampled


def test_samples_record_the_lowres_noise_only_where_a_stage_reads_it(tmp_path):
    """A chain without SR stages ignores --lowres-noise: recorded anyway, two such runs of the same
    checkpoints and steps read as different settings, and `mav evaluate` refused their videos."""
    from models.sampling import sampling_settings

    paths = {stage: tmp_path / f"{stage}.ckpt" for stage in ("prior", "decoder", "sr_low")}
    for path in paths.values():
        path.write_bytes(b"weights")
    short = {stage: paths[stage] for stage in ("prior", "decoder")}
    assert sampling_settings(short, 2, None, 0.3) == sampling_settings(short, 2, None, None)
    assert sampling_settings(paths, 2, None, 0.3) != sampling_settings(paths, 2, None, None)
    assert sampling_settings(paths, 2, None, 0.3)["lowres_noise"] == 0.3


def test_sampling_refuses_more_steps_than_a_stages_timesteps_before_sampling(chain):
    """--steps (or a config's sample_steps) above a stage's 1000 timesteps: an error naming the stage,
    before any stage samples (the DPM-Solver++ stages returned NaN: a black video)."""
    from models.sampling import generate, load_chain

    loaded = load_chain({s: chain[s].checkpoint for s in ("prior", "decoder")})
    with pytest.raises(ValueError, match="steps 1001: the prior checkpoint's schedule has 1000 timesteps, so it "
                                         "samples in at most 1000 steps"):
        generate(loaded, ["a red ball"], steps=1001)
    loaded["decoder"].config.diffusion.sample_steps = 1200  # as a checkpoint trained before configs refused it records it
    with pytest.raises(ValueError, match="diffusion.sample_steps 1200 of its config: the decoder checkpoint's "
                                         "schedule has 1000 timesteps"):
        generate(loaded, ["a red ball"])
    assert generate(loaded, ["a red ball"], steps=1)[0].isfinite().all()  # --steps overrides it


def test_sr_high_noises_every_frames_input_alike_at_the_sampling_level(chain):
    from models.sampling import seeded, super_resolve_frames

    net = load_stage(chain["sr_high"].checkpoint, "sr_high")
    extras, levels, denoise = [], [], net.denoise
    net.denoise = lambda x_t, t, cond: (extras.append(cond["extra"]) or levels.append(cond["noise_level"].tolist())
                                        or denoise(x_t, t, cond))
    low = net.config.data.lowres_size
    still = (torch.rand(1, 3, 1, low, low) * 2 - 1).expand(1, 3, 3, low, low).contiguous()
    super_resolve_frames(net, still, seeded(0, 1), steps=1)
    assert levels == [[100, 100, 100]]
    clean = net.upsample(still[:, :, 0], net.config.data.size)
    assert (extras[0][0] - clean[0]).abs().max() > 0.05  # noised (level 0.1: sigma ~0.16) ...
    assert torch.equal(extras[0][1], extras[0][0]) and torch.equal(extras[0][2], extras[0][0])  # ... alike


def test_sampling_chain_writes_76_frame_mp4_and_a_video_is_its_seed_alone_or_in_a_batch(chain, tmp_path):
    """The five stages write a 76-frame mp4 and gif at 20 fps. Video i of a batch sampled with seed S
    draws all its noise (prior, decoder, interpolation, both SR stages and their low-res augmentation)
    from its own generator, seeded S + i: sampled alone with seed S + i it is the same video (to float
    rounding: batched matmuls round differently, by < 1e-7; uint8 frames by at most one level). One
    generator shared by the batch gave the second video other noise: 0.05 apart (6 levels)."""
    from models.sampling import CHAIN, generate, load_chain, sample_video, to_uint8
    from models.video_io import read_frames

    ckpts = {s: chain[s].checkpoint for s in CHAIN}
    batch, fps = generate(load_chain(ckpts), ["a red circle", "a red circle"], steps=1, guidance=2.0, seed=5)
    assert batch.shape == (2, 3, 76, 64, 64) and fps == pytest.approx(20.0)
    # one prompt, seeds 5 and 6: the tiny nets' videos lie near 0 after one step, other noise moves them
    # by a few hundredths
    assert (batch[0] - batch[1]).abs().max() > 1e-2
    alone = sample_video("a red circle", ckpts, tmp_path / "v.mp4", steps=1, guidance=2.0, seed=6)
    assert alone.frames.shape == (76, 64, 64, 3) and alone.frames.dtype == torch.uint8
    assert (alone.frames.int() - to_uint8(batch[1]).int()).abs().max() <= 1
    frames, written_fps = read_frames(alone.mp4)
    assert frames.shape == (76, 64, 64, 3) and written_fps == pytest.approx(20.0)
    assert alone.gif.exists() and read_frames(alone.gif)[0].shape[0] == 76


def test_guidance_and_seed_in_prior_and_decoder(chain, tmp_path):
    from models.sampling import generate, load_chain

    c = load_chain({"prior": chain["prior"].checkpoint, "decoder": chain["decoder"].checkpoint})
    a, fps = generate(c, ["a blue square moving up"], steps=2, guidance=3.0, seed=0)
    b, _ = generate(c, ["a blue square moving up"], steps=2, guidance=3.0, seed=0)
    assert a.shape == (1, 3, 16, 16, 16) and fps == 4.0
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(c, ["a blue square moving up"], steps=2, guidance=1.0, seed=0)[0])
    with pytest.raises(CheckpointError, match="expected 'decoder'"):
        load_chain({"prior": chain["prior"].checkpoint, "decoder": chain["prior"].checkpoint})


def check_ddp_ranks(out):
    import json

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["step"] == 4 for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were all-reduced
    first_pass = [set(r["ids"][:4]) for r in ranks]  # 8 clips in one shard: 4 per rank per pass
    assert len(first_pass[0]) == len(first_pass[1]) == 4 and not first_pass[0] & first_pass[1]
    assert (out / "checkpoints" / "last.ckpt").exists()
    for step, (a, b) in enumerate(zip(ranks[0]["losses"], ranks[1]["losses"])):  # the logged loss: both ranks'
        assert ranks[0]["logged"][step] == ranks[1]["logged"][step] == pytest.approx((a + b) / 2, rel=1e-5)


def run_probe(data_root, out, *args, nodes=1):
    """tests/dist_probe.py: training on two CPU processes. One node: Lightning starts the second
    process. Two nodes: each is started by hand with its NODE_RANK and the master's address, as
    SLURM-less clusters (and torchrun users) launch them."""
    import os
    import socket
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "tests" / "dist_probe.py"), str(data_root), "shapes", str(out),
           "--nodes", str(nodes), *args]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    envs = [None] if nodes == 1 else [
        {**{k: v for k, v in os.environ.items() if k != "LOCAL_RANK"},
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)} for rank in range(nodes)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for env in envs]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(e[-3000:] for e in errors)


@pytest.mark.slow
def test_ddp_and_fsdp_on_two_processes_and_on_two_nodes(data_root, chain, tmp_path):
    """DDP on two processes splits the data and keeps the weights in sync: on one node (Lightning
    starts the second process), and on two 'nodes' of one process each (trainer.num_nodes: each
    started by hand, as a cluster's launcher would).

    trainer.strategy fsdp: torch's FSDP shards the video decoder over two CPU processes (gloo);
    the GPU test repeats this on CUDA. Same data, same float32 maths as DDP, so the weights must
    agree: the gradient clipping (a tiny limit, so it clips every step) needs the norm over both
    ranks' shards, the EMA averages each rank's shards, and the checkpoint gathers both. Frozen
    spatial layers (video mode) sit beside the trained temporal ones, and gradient checkpointing is
    on. Then each resumes from the other's checkpoint, over two 'nodes' of one process each.

    One pair of processes per launch (one node, then two), each running its runs one after the
    other (dist_probe.py --then): starting the processes is most of a run's time."""
    # inflated from a trained image decoder: from scratch, the zero-initialised (and frozen) output
    # conv would keep every gradient but its own at zero
    image = chain["decoder_image"]
    # weight decay: FSDP's optimizer sees flat shards, so which parameters decay is decided before
    settings = ["--set", "mode=video", "trainer.grad_clip=0.001", "trainer.ema_decay=0.5",
                "unet.grad_checkpoint=true", "trainer.weight_decay=0.5"]
    fresh = ["--steps", "3", "--init", str(image.checkpoint), *settings]
    run_probe(data_root, tmp_path / "ddp_one_node",  # plain DDP (image mode, 4 steps), then the video decoder's
              "--then", str(tmp_path / "ddp"), "--strategy", "ddp", *fresh,
              "--then", str(tmp_path / "fsdp"), "--strategy", "fsdp", *fresh)
    check_ddp_ranks(tmp_path / "ddp_one_node")
    ddp, fsdp = (read_checkpoint(tmp_path / s / "checkpoints" / "last.ckpt") for s in ("ddp", "fsdp"))
    for key in ("current_model_state", "state_dict"):  # raw and EMA weights
        assert fsdp[key].keys() == ddp[key].keys()  # FSDP's wrappers left no trace in the names
        for name, value in ddp[key].items():
            torch.testing.assert_close(fsdp[key][name], value, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    # Adam's moments: the clipped gradients' scale shows here (Adam's steps hardly depend on it).
    # Both number them by position among all the module's parameters
    names = [n for n, _ in build_stage(tiny("decoder", mode="video")).named_parameters()]
    for i, name in enumerate(names):
        assert (i in ddp["optimizer_states"][0]["state"]) == ("temporal" in name), name  # trained: temporal only
        for moment, value in ddp["optimizer_states"][0]["state"].get(i, {}).items():
            torch.testing.assert_close(fsdp["optimizer_states"][0]["state"][i][moment], value,
                                       rtol=1e-4, atol=1e-12, msg=f"{moment} {name}")
    trained = [n for n in names if "temporal" in n]
    assert any(not torch.equal(ddp["state_dict"][n], ddp["current_model_state"][n]) for n in trained)  # EMA lags
    load_stage(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", "decoder")  # a plain module's checkpoint

    # --resume, each from the other's checkpoint (a run started on one GPU goes on sharded, and back):
    # FSDP loads the raw weights, EMA and optimizer state of a DDP checkpoint, DDP those FSDP wrote
    (tmp_path / "ddp").rename(tmp_path / "ddp_then_fsdp")
    (tmp_path / "fsdp").rename(tmp_path / "fsdp_then_ddp")
    resumed = ["--steps", "5", "--resume", *settings]
    run_probe(data_root, tmp_path / "ddp_two_nodes",  # plain DDP, then the resumes
              "--then", str(tmp_path / "ddp_then_fsdp"), "--strategy", "fsdp", *resumed,
              "--then", str(tmp_path / "fsdp_then_ddp"), "--strategy", "ddp", *resumed, nodes=2)
    check_ddp_ranks(tmp_path / "ddp_two_nodes")
    ddp, fsdp = (read_checkpoint(tmp_path / s / "checkpoints" / "last.ckpt") for s in ("fsdp_then_ddp", "ddp_then_fsdp"))
    assert fsdp["global_step"] == ddp["global_step"] == 5
    for key in ("current_model_state", "state_dict"):
        for name, value in ddp[key].items():
            torch.testing.assert_close(fsdp[key][name], value, rtol=1e-5, atol=1e-6, msg=f"resumed {key} {name}")


class RecordCompiled(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.compiled = pl_module.net.down[0][0]._compiled_call_impl is not None


@pytest.mark.slow
def test_compiled_training_writes_plain_checkpoints(data_root, tmp_path):
    """trainer.compile: the U-Net trains through torch.compile (inductor on the CPU too), and its
    checkpoint has the plain parameter names, so it loads into an uncompiled module."""
    import math

    from torch._dynamo.utils import counters

    record = RecordCompiled()
    graphs = counters["stats"]["unique_graphs"]
    # one resolution level: fewer distinct block shapes to compile (inductor's C++ build, ~5 s each cold)
    cfg = tiny("decoder", mode="image", **{"trainer.compile": True, "unet.channel_mults": [1], "unet.attn_levels": [0]})
    result = train_stage("decoder", cfg, data_root=data_root, dataset="shapes", out_dir=tmp_path, max_steps=2,
                         callbacks=[record])
    assert record.compiled and result.global_step == 2 and math.isfinite(result.train_loss)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo captured the blocks (no silent eager fallback)
    state = read_checkpoint(result.checkpoint)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
    plain = load_stage(result.checkpoint)
    assert plain.net.down[0][0]._compiled_call_impl is None
    assert torch.equal(plain.net.conv_in.spatial.weight, state["net.conv_in.spatial.weight"])
