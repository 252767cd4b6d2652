"""Frozen CLIP (transformers) for text conditioning and CLIPSIM.

`FrozenCLIP.load(name_or_path)` takes a hub id (e.g. openai/clip-vit-base-patch32,
resolved from the local Hugging Face cache: nothing here forces a download) or a
folder written by `save_pretrained`. `build_tiny_clip(out_dir)` writes a tiny,
randomly initialised CLIP with a real byte-level BPE tokenizer built locally, so
tests and the CPU demo run offline. A tiny model says so: `FrozenCLIP.is_tiny`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.clip_source import cannot_load, existing_or_hub_id

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_MARKER = "mav_tiny_random"  # config attribute saved in config.json of tiny models

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# A small English corpus to learn BPE merges from: enough that common words in
# captions become one or two tokens instead of one token per byte.
_CORPUS = """
a person playing guitar in a room . a man riding a horse on the beach . a woman
dancing in the rain . a dog running through a field of flowers . a cat sitting on
a table . people walking in a city street at night . a car driving on a road .
a bird flying over the ocean . a person apply eye makeup , apply lipstick , archery ,
baby crawling , balance beam , band marching , baseball pitch , basketball , bench
press , biking , billiards , blow dry hair , blowing candles , body weight squats ,
bowling , boxing punching bag , breast stroke , brushing teeth , clean and jerk ,
cliff diving , cricket bowling , cutting in kitchen , diving , drumming , fencing ,
field hockey penalty , floor gymnastics , frisbee catch , front crawl , golf swing ,
haircut , hammering , handstand walking , head massage , high jump , horse race ,
hula hoop , ice dancing , javelin throw , juggling balls , jump rope , kayaking ,
knitting , long jump , lunges , military parade , mixing , mopping floor , playing
cello , playing piano , playing violin , pole vault , pull ups , push ups , rafting ,
rock climbing indoor , rowing , salsa spin , shaving beard , skiing , skijet , sky
diving , soccer juggling , surfing , swing , table tennis shot , tai chi , tennis
swing , throw discus , trampoline jumping , typing , walking with dog , writing on
board , yo yo . the quick brown fox jumps over the lazy dog . video of a sunset .
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[str]]:
    """Plain BPE on the corpus' words, in CLIP's format (last symbol carries </w>)."""
    byte_map = _bytes_to_unicode()
    alphabet = list(byte_map.values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower()))
    # each word as a tuple of symbols; the last symbol marks the end of word
    splits = {}
    for word, count in words.items():
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        splits[tuple(symbols)] = splits.get(tuple(symbols), 0) + count
    merges: list[str] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for symbols, count in splits.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        vocab_list.append(a + b)
        new_splits = {}
        for symbols, count in splits.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_splits[tuple(out)] = new_splits.get(tuple(out), 0) + count
        splits = new_splits
    # special tokens last, so EOS has the largest id (old CLIP configs pool at argmax(input_ids))
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32, num_merges: int = 300) -> Path:
    """Write a tiny random CLIPModel + working CLIP tokenizer + image processor to out_dir."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _learn_bpe(_CORPUS, num_merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(out)

    text_config = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )
    vision_config = dict(
        image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2,
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16)
    setattr(config, TINY_MARKER, True)
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's random state
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(out)
    _image_processor_class()(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD),
    ).save_pretrained(out)
    return out


def _image_processor_class():
    # The default CLIPImageProcessor wants torchvision (not installed here, see
    # docs/stack.md); the PIL variant reads and writes the same config file.
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    return cls


class FrozenCLIP(nn.Module):
    """CLIP text and image towers, frozen, in eval mode; embeddings are L2-normalised."""

    def __init__(self, model, tokenizer, mean=OPENAI_MEAN, std=OPENAI_STD, name: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu",
             local_only: bool = False) -> "FrozenCLIP":
        """`local_only`: a hub id only from the local cache, never the network."""
        from transformers import CLIPModel, CLIPTokenizer

        src = existing_or_hub_id(name_or_path)
        try:
            model = CLIPModel.from_pretrained(src, local_files_only=local_only)
            tokenizer = CLIPTokenizer.from_pretrained(src, local_files_only=local_only)
        except (OSError, ValueError) as err:  # not a folder, not a hub id, offline without a cached copy
            raise cannot_load(src, err) from None
        mean, std = OPENAI_MEAN, OPENAI_STD
        try:  # the processor config carries the normalisation the model was trained with
            proc = _image_processor_class().from_pretrained(src, local_files_only=local_only)
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError):
            pass
        return cls(model, tokenizer, mean, std, name=src).to(device)

    def train(self, mode: bool = True):  # frozen: stays in eval mode whatever the parent does
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def text_width(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def is_tiny(self) -> bool:
        return bool(getattr(self.model.config, TINY_MARKER, False))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (emb [B,D] L2-normalised, tokens [B,L,Dt] last hidden states, L = max length,
        mask [B,L] bool: True at the text's own tokens, False at the padding)."""
        batch = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        emb = self.model.text_projection(out.pooler_output)
        return F.normalize(emb.float(), dim=-1), out.last_hidden_state, batch["attention_mask"].bool()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[N,3,H,W] in [0,1] -> CLIP input: short side to image size (bicubic), centre crop, normalise.

        This is what CLIPImageProcessor does, done in torch on the batch so that
        frames never round-trip through PIL.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode_images expects [N,3,H,W], got {tuple(x.shape)}")
        s = self.image_size
        h, w = x.shape[-2:]
        # short side to s, long side int(s * long / short): CLIPImageProcessor truncates (320x240 -> 298x224)
        nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        x = F.interpolate(x.float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - s) // 2, (nw - s) // 2
        x = x[..., top : top + s, left : left + s].clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """[N,3,H,W] float in [0,1] -> [N,D] L2-normalised image embeddings."""
        dtype = next(self.model.parameters()).dtype
        outs = []
        for chunk in x.split(batch_size):
            pixels = self.preprocess(chunk.to(self.device)).to(dtype)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            outs.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1))
        if not outs:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.cat(outs)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[T,3,H,W] or [B,T,3,H,W] in [0,1] -> per-frame embeddings [..., T, D]."""
        if video.ndim == 4:
            return self.encode_images(video)
        b = video.shape[0]
        emb = self.encode_images(rearrange(video, "b t c h w -> (b t) c h w"))
        return rearrange(emb, "(b t) d -> b t d", b=b)


def tiny_clip_path() -> Path:
    """The tiny random CLIP under $MAV_CACHE (default ~/.cache/mav), built once; concurrent
    builders race to an atomic rename and the loser's copy (same seed, same model) is dropped."""
    path = Path(os.environ.get("MAV_CACHE", Path.home() / ".cache" / "mav")) / "tiny-clip"
    if not (path / "config.json").exists():
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
        build_tiny_clip(tmp)
        try:
            tmp.rename(path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
