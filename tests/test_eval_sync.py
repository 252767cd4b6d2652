"""CLIPSIM and the Inception Score gathered over two gloo processes, one of which scored no video
(FVD's gather has its own test in test_eval_fvd.py): the same values as one process."""
from __future__ import annotations

import pytest
import torch

from eval.clipsim import CLIPSIM
from eval.inception_score import VideoInceptionScore, load_c3d
from models.clip import FrozenCLIP, build_tiny_clip
from tests.gloo import run_in_gloo_group

PROMPTS = ["a red ball", "a blue sky", "a green field", "two dogs", "a sunset"]


def videos(n: int, frames: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, frames, size, size, 3), generator=torch.Generator().manual_seed(n),
                         dtype=torch.uint8)


def scores(clip_path: str, clip_videos, is_videos, parts: int = 1, part: int = 0, rank0_only: bool = False):
    """CLIPSIM (value, interval, count) and IS (value, std, count) over this process's share."""
    take = (lambda x: x if part == 0 else x[:0]) if rank0_only else (lambda x: x.tensor_split(parts)[part])
    clipsim = CLIPSIM(FrozenCLIP.load(clip_path))
    mine, prompts = take(clip_videos), take(torch.arange(len(PROMPTS)))
    if len(mine):
        clipsim.update(mine, [PROMPTS[i] for i in prompts])
    c = clipsim.result(num_resamples=50)
    c3d, smoke = load_c3d(None, seed=0)[:2]
    with torch.no_grad():  # random weights give near-uniform probabilities and an IS within 1e-6 of 1
        c3d.fc8.weight.mul_(100)
    inception = VideoInceptionScore(c3d, smoke, splits=2)
    if len(take(is_videos)):
        inception.update(take(is_videos))
    i = inception.result()
    return torch.tensor([c.value, c.low, c.high, c.num_videos, i.value, i.std, i.num_videos], dtype=torch.float64)


def _worker(rank, world, clip_path, clip_videos, is_videos, rank0_only, out):
    out[rank] = scores(clip_path, clip_videos, is_videos, world, rank, rank0_only)


def test_two_processes_give_the_one_process_scores_when_one_scored_nothing(tmp_path):
    rank0_only = True  # rank 1's list states stay empty (an uneven split is FVD's test too)
    clip_path = str(build_tiny_clip(tmp_path / "clip"))
    clip_videos, is_videos = videos(len(PROMPTS), 3, 32), videos(4, 16, 112)
    single = scores(clip_path, clip_videos, is_videos)
    out = torch.zeros(2, len(single), dtype=torch.float64).share_memory_()
    run_in_gloo_group(_worker, 2, clip_path, clip_videos, is_videos, rank0_only, out)
    for rank in range(2):  # every process gets the whole result; same rows in rank order: same bootstrap
        assert out[rank].tolist() == pytest.approx(single.tolist(), rel=1e-6, abs=1e-9)
