"""Protocols: UCF-101 prompts and splits, MSR-VTT captions, Inception Score math."""
import json

import pytest
import torch

from eval.inception_score import inception_score
from eval.protocols import UCF101, msrvtt_captions, ucf_prompt


@pytest.mark.parametrize("name,prompt", [("ApplyEyeMakeup", "a person apply eye makeup"), ("YoYo", "a person yo yo"),
                                         ("CleanAndJerk", "a person clean and jerk"), ("Skijet", "a person skijet")])
def test_ucf_class_templates(name, prompt):
    assert ucf_prompt(name) == prompt


def test_ucf_layout_and_class_frequencies(tmp_path):
    (tmp_path / "UCF-101").mkdir()
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 YoYo\n")
    (lists / "trainlist01.txt").write_text(
        "".join(f"ApplyEyeMakeup/v_ApplyEyeMakeup_g{i:02d}_c01.avi 1\n" for i in range(9)) + "YoYo/v_YoYo_g01_c01.avi 2\n")
    ds = UCF101(tmp_path)
    assert len(ds.videos) == 10 and ds.videos[-1].name == "v_YoYo_g01_c01.avi"
    draws = ds.class_prompts(2000, seed=0)
    share = draws.count("a person apply eye makeup") / len(draws)
    assert 0.86 < share < 0.94  # 9 of 10 training videos
    with pytest.raises(FileNotFoundError, match="ucfTrainTestlist"):
        UCF101(tmp_path / "missing")


def test_msrvtt_captions(tmp_path):
    path = tmp_path / "test_videodatainfo.json"
    path.write_text(json.dumps({"sentences": [{"video_id": "video9", "caption": "a man sings "},
                                              {"video_id": "video9", "caption": "someone sings"},
                                              {"video_id": "video7", "caption": "a cat"}]}))
    assert len(msrvtt_captions(path)) == 3
    assert msrvtt_captions(path, "first") == [("video7", "a cat"), ("video9", "a man sings")]


def test_inception_score_bounds():
    # confident and evenly spread over 10 classes -> IS = 10; uninformative -> IS = 1
    confident = torch.full((100, 10), -50.0)
    confident[torch.arange(100), torch.arange(100) % 10] = 50.0
    assert inception_score(confident, splits=10)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.zeros(100, 10), splits=10) == pytest.approx((1.0, 0.0))
