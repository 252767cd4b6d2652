"""Protocols: UCF-101 prompts and splits, MSR-VTT captions, Inception Score math, and
`mav evaluate --protocol ucf101|msrvtt` end to end on tiny local copies of the benchmarks."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.inception_score import inception_score
from eval.protocols import UCF101, load_protocol, msrvtt_captions, msrvtt_protocol, ucf_prompt


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
    path.write_text(json.dumps({"sentences": [{"video_id": "video9", "caption": "a"}, {"caption": "no id"}]}))
    with pytest.raises(ValueError, match="sentence 1 \\(of 1\\) lacks a 'video_id' or 'caption' text"):
        msrvtt_captions(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"captions {path}: not readable JSON"):
        msrvtt_captions(path)


def test_inception_score_bounds():
    # confident and evenly spread over 10 classes in every split -> IS = 10; uninformative -> IS = 1
    confident = torch.full((100, 10), -50.0)
    confident[torch.arange(100), torch.arange(100) % 10] = 50.0
    assert inception_score(confident, splits=10, shuffle_seed=None)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.zeros(100, 10), splits=10) == pytest.approx((1.0, 0.0))


def test_inception_score_splits_do_not_follow_the_file_order():
    # 1000 confident videos of 10 classes, sorted by class (a folder named by class): split in that
    # order each split holds one class and scores 1; in the seeded shuffle each holds about all 10
    by_class = torch.full((1000, 10), -50.0)
    by_class[torch.arange(1000), torch.arange(1000) // 100] = 50.0
    assert inception_score(by_class, splits=10, shuffle_seed=None)[0] == pytest.approx(1.0)
    value, std = inception_score(by_class, splits=10)
    assert 9.0 < value < 10.0 and std < 0.5


# -- the protocols end to end: `mav evaluate --protocol ...` on tiny local copies ------------------
UCF_CLASSES = ("ApplyEyeMakeup", "YoYo")
SOURCES = (("asl_book.mkv", 0.0), ("bigbuckbunny.mp4", 0.5), ("bottle-detection.mp4", 3.0),
           ("big_buck_bunny_0_30.webm", 8.0), ("bottle-detection.mp4", 20.0), ("big_buck_bunny_0_30.webm", 20.0),
           ("bigbuckbunny.mp4", 2.5), ("asl_book.mkv", 1.5))


def _cut(src: Path, start: float, out: Path) -> Path:
    """24 frames of a real video at 160x120 (UCF-101 is 320x240 xvid .avi)."""
    from data_prep.ffmpeg_bin import ffmpeg_exe

    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-ss", str(start), "-i", str(src), "-frames:v", "24",
                    "-vf", "scale=160:120", "-an", "-c:v", "mpeg4", "-q:v", "5", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory, samples):
    """UCF101/{UCF-101/<Class>/v_*.avi, ucfTrainTestlist/}, 2 classes x 2 videos; MSR-VTT captions and
    test videos; fake folders (other cuts of real videos) with prompts.json sidecars."""
    root = tmp_path_factory.mktemp("bench")
    cuts = iter(SOURCES)
    ucf, rel = root / "UCF101", []
    for cls in UCF_CLASSES:
        for g in (1, 2):
            name, start = next(cuts)
            rel.append(f"{cls}/v_{cls}_g{g:02d}_c01.avi")
            _cut(samples / name, start, ucf / "UCF-101" / rel[-1])
    lists = ucf / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    (lists / "testlist01.txt").write_text("\n".join(rel) + "\n")

    captions = {"video7000": ["a woman applies makeup", "someone paints her face"],
                "video7001": ["a cartoon rabbit in a forest"], "video7002": ["bottles on a conveyor belt"]}
    (root / "msrvtt").mkdir()
    sentences = [{"video_id": v, "caption": c, "sen_id": i} for i, (v, cs) in enumerate(captions.items()) for c in cs]
    (root / "msrvtt" / "test_videodatainfo.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    for vid in captions:
        name, start = next(cuts)
        _cut(samples / name, start, root / "msrvtt" / "videos" / f"{vid}.mp4")

    fake_ucf, fake_msr = root / "fake-ucf", root / "fake-msrvtt"
    fake_ucf_prompts = {}
    for i, (name, start) in enumerate(SOURCES[4:8]):
        fake_ucf_prompts[_cut(samples / name, start + 1, fake_ucf / f"f{i}.mp4").name] = ucf_prompt(UCF_CLASSES[i % 2])
    (fake_ucf / "prompts.json").write_text(json.dumps(fake_ucf_prompts))
    msr_caps = [c for cs in captions.values() for c in cs][:3]
    for i, (name, start) in enumerate(SOURCES[1:4]):
        _cut(samples / name, start + 2, fake_msr / f"m{i}.mp4")
    (fake_msr / "prompts.json").write_text(json.dumps({f"m{i}.mp4": c for i, c in enumerate(msr_caps)}))
    return {"ucf": ucf, "captions": root / "msrvtt" / "test_videodatainfo.json", "video_root": root / "msrvtt" / "videos",
            "fake_ucf": fake_ucf, "fake_msrvtt": fake_msr, "all_captions": [c for cs in captions.values() for c in cs]}


def _cli(argv, tmp_path, capsys):
    from flows.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["evaluate", *argv, "--tracking-uri", uri, "--device", "cpu", "--bootstrap", "10"])
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err, uri


def _only_run(uri):
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("evaluate").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def _value(line: str) -> float:
    value = float(line.split()[1])
    assert np.isfinite(value)
    return value


def test_ucf101_protocol_on_fake_folder(prefect_server, benchmarks, tmp_path, capsys):
    rc, out, err, uri = _cli(["--protocol", "ucf101", "--protocol-root", str(benchmarks["ucf"]),
                              "--split-file", "testlist01.txt", "--fake", str(benchmarks["fake_ucf"])], tmp_path, capsys)
    assert rc == 0, err
    fvd, is_ = out[-2:]
    assert fvd.startswith("fvd: ") and "(smoke)" in fvd and "(N=4+4)" in fvd and _value(fvd) > 0
    assert is_.startswith("is: ") and "(smoke)" in is_ and "(N=4)" in is_ and _value(is_) >= 1
    client, run = _only_run(uri)
    m, p = run.data.metrics, run.data.params
    assert {"smoke_fvd", "smoke_fvd_low", "smoke_fvd_high", "smoke_is", "smoke_is_std"} == set(m)
    assert all(np.isfinite(v) for v in m.values()) and m["smoke_is"] == pytest.approx(_value(is_), rel=1e-3)
    assert p["protocol"] == "ucf101" and p["split_file"].endswith("testlist01.txt") and p["num_real"] == "4"
    assert p["is_splits"] == "2" and p["c3d_sha256"] == "random" and p["covariance"] == "biased"
    assert p["is_classifier"] == "C3D (state_dict)" and p["is_frame_size"] == "112x112 bilinear"
    used = client.download_artifacts(run.info.run_id, "eval/prompts.json", str(tmp_path))
    assert set(json.loads(Path(used).read_text()).values()) == {"a person apply eye makeup", "a person yo yo"}


def test_msrvtt_protocol_on_fake_folder(prefect_server, benchmarks, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err, uri = _cli(["--protocol", "msrvtt", "--captions", str(benchmarks["captions"]), "--video-root",
                              str(benchmarks["video_root"]), "--fake", str(benchmarks["fake_msrvtt"]), "--clip", "tiny",
                              "--num-videos", "2"],
                             tmp_path, capsys)
    assert rc == 0, err
    fvd, clipsim = out[-2:]
    assert clipsim.startswith("clipsim: ") and "(smoke)" in clipsim and -1 <= _value(clipsim) <= 1
    assert fvd.startswith("fvd: ") and "(N=2+2)" in fvd and _value(fvd) > 0
    client, run = _only_run(uri)
    assert {"smoke_clipsim", "smoke_fvd"} <= set(run.data.metrics)
    assert run.data.params["protocol"] == "msrvtt" and run.data.params["num_captions"] == "4"
    used = client.download_artifacts(run.info.run_id, "eval/prompts.json", str(tmp_path))
    used = json.loads(Path(used).read_text())
    own = json.loads((benchmarks["fake_msrvtt"] / "prompts.json").read_text())
    assert len(used) == 2 and used == {name: own[name] for name in used}  # each video with its own caption
    assert set(used.values()) <= set(benchmarks["all_captions"])


def test_a_protocol_samples_the_papers_16_frame_256_px_videos(prefect_server, benchmarks, tmp_path):
    """The paper scores both benchmarks on 16x256x256 videos: a protocol samples from the prior, the
    decoder and sr_low, without frame interpolation (76 frames) or the 768 px stage, and logs that chain."""
    from flows.evaluate import evaluate

    chains = []

    def sampler(prompt, checkpoints, out, steps, guidance, seed, device):  # copies a video; records its chain
        chains.append(dict(checkpoints))
        shutil.copy(next(benchmarks["fake_msrvtt"].glob("*.mp4")), out)
        return out

    given = {stage: str(tmp_path / f"{stage}.ckpt") for stage in
             ("prior", "decoder", "interpolation", "sr_low", "sr_high")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = evaluate(protocol="msrvtt", captions=str(benchmarks["captions"]), num_videos=2, sampler=sampler,
                   checkpoints=given, clip_model="tiny", tracking_uri=uri, num_resamples=0)
    paper = {stage: given[stage] for stage in ("prior", "decoder", "sr_low")}
    assert chains == [paper, paper]
    import mlflow

    logged = mlflow.MlflowClient(uri).get_run(out["run_id"]).data.params["checkpoints"]
    assert logged == ",".join(f"{stage}={Path(path).resolve()}" for stage, path in paper.items())


def test_msrvtt_protocol_prompts(benchmarks):
    full = msrvtt_protocol(benchmarks["captions"])
    assert full.prompts == benchmarks["all_captions"] and full.metrics == ("clipsim",) and full.real == []
    two = msrvtt_protocol(benchmarks["captions"], benchmarks["video_root"], num_videos=2, seed=3)
    assert len(two.prompts) == 2 and set(two.prompts) <= set(full.prompts)
    assert two.prompts == msrvtt_protocol(benchmarks["captions"], num_videos=2, seed=3).prompts  # seeded
    assert two.metrics == ("clipsim", "fvd") and [p.stem for p in two.real] == ["video7000", "video7001", "video7002"]
    with pytest.raises(ValueError, match="1 prompts are not MSR-VTT test captions, e.g. 'a dog'"):
        two.check_prompts(["a cartoon rabbit in a forest", "a dog"], "fake-folder")


def test_protocol_bad_inputs(prefect_server, benchmarks, tmp_path, capsys):
    missing = tmp_path / "no-ucf"
    rc, _, err, _ = _cli(["--protocol", "ucf101", "--protocol-root", str(missing), "--fake",
                          str(benchmarks["fake_ucf"])], tmp_path, capsys)
    assert rc == 2 and f"error: {missing}: expected UCF-101/ and ucfTrainTestlist/" in err
    bad = tmp_path / "captions.json"
    bad.write_text(json.dumps({"videos": []}))
    rc, _, err, _ = _cli(["--protocol", "msrvtt", "--captions", str(bad), "--fake", str(benchmarks["fake_msrvtt"])],
                         tmp_path, capsys)
    assert rc == 2 and f"error: {bad}: no 'sentences' list" in err
    from flows.cli import build_parser
    from flows.evaluate import check_inputs

    for protocol, needs in (("ucf101", "needs its root"), ("msrvtt", "needs its captions")):  # before the flow starts
        args = build_parser("evaluate").parse_args(["evaluate", "--protocol", protocol, "--fake", "x"])
        with pytest.raises(ValueError, match=needs):
            check_inputs(args)
    rc, _, err, _ = _cli(["--protocol", "ucf101", "--protocol-root", str(benchmarks["ucf"]), "--fake",
                          str(benchmarks["fake_ucf"]), "--clip-length", "12"], tmp_path, capsys)
    assert rc == 2 and "--clip-length 12: the inception score's C3D takes 16-frame clips" in err  # before any work
    rc, _, err, _ = _cli(["--protocol", "ucf101", "--protocol-root", str(benchmarks["ucf"]), "--split-file",
                          "testlist01.txt", "--checkpoints", str(tmp_path), "--num-videos", "1"], tmp_path, capsys)
    assert rc == 2 and "error: fvd needs at least 2 fake videos, got 1 (1 prompt of the ucf101 protocol, " \
                       "--num-videos 1)" in err  # before sampling
    with pytest.raises(SystemExit):
        _cli(["--protocol", "kinetics", "--fake", str(benchmarks["fake_ucf"])], tmp_path, capsys)
    assert "invalid choice: 'kinetics'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown protocol 'kinetics'"):
        load_protocol("kinetics")
    with pytest.raises(ValueError, match="needs its root"):
        load_protocol("ucf101")
    with pytest.raises(FileNotFoundError, match="testlist09.txt: no such split file"):
        load_protocol("ucf101", root=benchmarks["ucf"], split_file="testlist09.txt")
    partial = tmp_path / "partial"
    shutil.copytree(benchmarks["video_root"], partial)
    (partial / "video7002.mp4").unlink()
    with pytest.raises(FileNotFoundError, match="1 test videos are missing, e.g. video7002"):
        msrvtt_protocol(benchmarks["captions"], partial)
    with pytest.raises(FileNotFoundError, match="no-such: no such folder"):
        msrvtt_protocol(benchmarks["captions"], tmp_path / "no-such")


def test_smoke_c3d_is_the_same_for_a_seed_and_leaves_the_callers_rng_alone():
    from eval.inception_score import load_c3d

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, second, third = (load_c3d(None, seed=s)[0] for s in (7, 7, 8))
    assert torch.equal(torch.rand(3), expected)  # building them drew nothing from the global generator
    assert torch.equal(first.fc8.weight, second.fc8.weight) and not torch.equal(first.fc8.weight, third.fc8.weight)


def test_torchscript_c3d_scores_its_own_probabilities(tmp_path):
    """StyleGAN-V's c3d_ucf101.pt is TorchScript called on uint8 [B,3,16,H,W] that returns class
    probabilities; a module with that interface, saved and loaded like it, gives the IS of its
    probabilities (TGANv2's formula, written out here), and one that does not is named."""
    import hashlib

    from eval.inception_score import TorchScriptC3D, VideoInceptionScore, load_c3d

    class StyleGANVLike(torch.nn.Module):  # the call signature of c3d_ucf101.pt
        def __init__(self, classes: int, probabilities: bool = True):
            super().__init__()
            self.mix = torch.nn.Linear(3 * 16, classes)
            self.probabilities = probabilities

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.dtype == torch.uint8 and x.shape[1] == 3 and x.shape[2] == 16
            logits = self.mix((x.float().mean(dim=(3, 4)) - 127.5).flatten(1))
            return logits.softmax(dim=1) if self.probabilities else logits

    torch.manual_seed(0)
    module = StyleGANVLike(101)
    path = tmp_path / "c3d_ucf101.pt"
    torch.jit.script(module).save(str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    c3d, smoke, checksum = load_c3d(str(path), digest)
    assert (c3d.kind, smoke, checksum) == ("torchscript", False, digest)

    videos = torch.randint(0, 256, (12, 16, 20, 24, 3), dtype=torch.uint8)
    inception = VideoInceptionScore(c3d, smoke, splits=3)
    for batch in videos.split(5):
        inception.update(batch)
    result = inception.result()
    with torch.no_grad():
        probs = module(videos.permute(0, 4, 1, 2, 3)).double().numpy()
    np.random.RandomState(42).shuffle(probs)  # StyleGAN-V's compute_isv
    parts = np.split(probs, 3)
    expected = [np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1))) for p in parts]
    # (float32 probabilities: their log's softmax sums them to 1 again in float64)
    assert (result.value, result.std) == pytest.approx((np.mean(expected), np.std(expected)), rel=1e-6)
    assert result.value > 1.5 and not result.smoke

    # one that does not is named as it loads, from its output for one tiny video; and, were that right,
    # as it scores
    torch.jit.script(torch.nn.Linear(3, 3)).save(str(tmp_path / "linear.pt"))
    with pytest.raises(ValueError, match=r"weights \S+linear.pt: not StyleGAN-V's c3d_ucf101.pt \(RuntimeError: [^\n]+\)$"):
        load_c3d(str(tmp_path / "linear.pt"))
    for name, wrong, reason in (("logits.pt", StyleGANVLike(101, probabilities=False), "not class probabilities"),
                                ("ten.pt", StyleGANVLike(10), r"gives \({n}, 10\) for {n} videos?, not \[{n}, 101\]")):
        torch.jit.script(wrong).save(str(tmp_path / name))
        with pytest.raises(ValueError, match=rf"weights \S+{name}: not StyleGAN-V's c3d_ucf101.pt \(.*"
                                             + reason.format(n=1)):
            load_c3d(str(tmp_path / name))
        scored = TorchScriptC3D(torch.jit.load(str(tmp_path / name)), str(tmp_path / name))
        with pytest.raises(ValueError, match=rf"weights \S+{name}: .*{reason.format(n=5)}"):
            VideoInceptionScore(scored, False).update(videos[:5])


def test_the_inception_classifier_stays_in_eval_mode_in_a_module_put_in_training_mode(tmp_path):
    """StyleGAN-V's TorchScript C3D has dropout: a parent module's .train() (a LightningModule holding
    the metric) switched it on, and the same videos scored differently from call to call."""
    from eval.inception_score import VideoInceptionScore, load_c3d

    class WithDropout(torch.nn.Module):  # c3d_ucf101.pt's call signature, with a dropout before its head
        def __init__(self):
            super().__init__()
            self.drop, self.head = torch.nn.Dropout(0.5), torch.nn.Linear(3 * 16, 101)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.drop(x.float().mean(dim=(3, 4)).flatten(1) / 255)).softmax(dim=1)

    torch.jit.script(WithDropout()).save(str(tmp_path / "c3d.pt"))
    c3d, smoke, _ = load_c3d(str(tmp_path / "c3d.pt"))
    holder = torch.nn.ModuleDict({"inception": VideoInceptionScore(c3d, smoke)}).train()
    videos = torch.randint(0, 256, (4, 16, 8, 8, 3), dtype=torch.uint8)
    first, second = (holder["inception"].c3d.classify(videos) for _ in range(2))
    assert not c3d.training and torch.equal(first, second)
