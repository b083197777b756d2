"""Tiny random-weight Kandinsky 2.1 model folders, built fully offline.

``write_tiny_models(root)`` writes three diffusers-format folders::

    root/prior     KandinskyPriorPipeline   (PriorTransformer + CLIP text/vision + CLIPTokenizer + UnCLIPScheduler)
    root/decoder   KandinskyPipeline        (MultilingualCLIP + XLMRobertaTokenizer + UNet + DDIMScheduler + MoVQ,
                                             and ddpm_scheduler/: the DDPM config beside the pipeline, as in the hub repo)
    root/inpaint   KandinskyInpaintPipeline (same as decoder, UNet with in_channels=9)

They load through exactly the same ``from_pretrained(..., use_safetensors=True)`` calls as the real hub
models (``kandinsky-community/kandinsky-2-1-prior``, ``kandinsky-2-1``, ``kandinsky-2-1-inpaint``), keep the
block types / config structure of the real models (see ``bench/kandinsky21_configs.json``) and only shrink
the sizes, so a 64x64 text-to-image call runs in a fraction of a second on CPU.

Everything is deterministic: the tokenizers are trained from a built-in corpus with deterministic tie
breaking, and every model is built right after ``torch.manual_seed(<fixed>)``, so two calls produce
byte-identical files. The inpaint folder's ``text_encoder``, ``tokenizer``, ``movq`` and ``scheduler`` are
byte-identical to the decoder's, so those components can be shared between the two pipelines.

Run ``python -m kbatch.models.tiny ROOT`` to write the folders from the command line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "write_tiny_models",
    "tiny_models_complete",
    "TINY_EMBED_DIM",
    "TINY_MOVQ_SCALE_FACTOR",
    "TINY_IMAGE_SIZE",
    "COMPONENTS",
]

#: Width of the CLIP image embedding (prior output, UNet cross_attention_dim, MCLIP numDims, ...).
TINY_EMBED_DIM = 32
#: 2 ** (number of MoVQ levels - 1): a 64x64 image is a 16x16 latent.
TINY_MOVQ_SCALE_FACTOR = 4
#: Natural image size of the tiny models (unet.sample_size * movq scale factor).
TINY_IMAGE_SIZE = 64
#: The three folders written under ``root``.
COMPONENTS = ("prior", "decoder", "inpaint")

# Seeds used before building each random-weight model (fixed: byte-identical builds).
_SEEDS = {
    "prior_text_encoder": 1001,
    "prior_image_encoder": 1002,
    "prior": 1003,
    "mclip": 2001,
    "unet": 2002,
    "movq": 2003,
    "inpaint_unet": 3002,
}

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Small built-in English corpus the tokenizers are trained on (prompt-like, varied sentences).
_CORPUS = """\
A red cat sits on a blue chair in the warm morning light.
The quick brown fox jumps over the lazy dog near the river bank.
A painting of a mountain lake at sunset, oil on canvas, highly detailed.
Portrait of an old man with a long white beard, dramatic lighting, studio photo.
A futuristic city skyline at night with neon lights and flying cars.
A bowl of fresh fruit on a wooden kitchen table, still life, soft shadows.
A small house in a green forest, watercolor illustration for a children's book.
An astronaut riding a horse on the moon, digital art, trending on artstation.
A cup of hot coffee and an open book beside a rainy window.
Two dogs playing with a yellow ball in a sunny park full of flowers.
A black and white photograph of a busy street in Paris in the sixties.
A majestic lion resting under a tree on the African savanna at dawn.
A cozy living room with a fireplace, a red sofa and a sleeping kitten.
A sailing boat on a calm blue sea under a bright summer sky.
A castle on a hill surrounded by clouds, fantasy concept art, epic scale.
A close up photo of a bee collecting pollen from a purple flower.
A steaming bowl of ramen with eggs, green onions and noodles.
An ancient temple hidden in the jungle, covered with vines and moss.
A robot reading a newspaper in a cafe, cartoon style, bright colors.
A snowy village at Christmas with glowing windows and a tall pine tree.
A young woman wearing a straw hat walking through a field of sunflowers.
A vintage car parked in front of a diner in the desert, golden hour.
An owl sitting on a branch at midnight under a full moon and stars.
A plate of pancakes with strawberries, blueberries and maple syrup.
A lighthouse on a rocky coast during a storm with huge crashing waves.
A colorful hot air balloon floating over green hills and small farms.
A wooden bridge over a quiet stream in an autumn forest with orange leaves.
A pencil sketch of a horse running across an open meadow.
A glass of orange juice on a white table, minimal product photography.
A giant whale swimming through the clouds above a sleeping town, surreal.
A little girl flying a kite on the beach on a windy afternoon.
A medieval knight in shiny silver armor holding a sword and a shield.
A dragon made of fire flying over a frozen lake, cinematic, 4k, 8k.
Three green apples and a pear in a basket, impressionist painting.
A panda eating bamboo in a misty mountain forest in China.
A subway train arriving at a crowded station during rush hour.
A teddy bear sitting on a bed next to a pile of colorful pillows.
A field of lavender in Provence with an old stone farmhouse.
A bicycle leaning against a brick wall covered with graffiti.
A fox in the snow looking at the camera, wildlife photography, sharp focus.
An underwater scene with coral reefs, tropical fish and a sea turtle.
A chef cooking pasta in a small restaurant kitchen, warm tones.
A pixel art landscape with mountains, rivers and a tiny village.
A mug of tea, a candle and knitted socks on a rainy autumn evening.
The Eiffel Tower and the Golden Gate Bridge in one picture, photo, 1990.
Hello world! What's this? It's a test: 0 1 2 3 4 5 6 7 8 9 (ok) - yes, no; maybe.
"""

# Characters every tokenizer must know (so that ordinary prompts do not hit <unk>).
_EXTRA_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()[]-_/&%+=*#@"

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_CLIP_NUM_MERGES = 400
_XLMR_VOCAB_SIZE = 600
_SCORE_DIGITS = 4


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char table (same order as CLIP's vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_pretokenize(lines: list[str]) -> collections.Counter:
    """Split text exactly like CLIPTokenizer does (NFC, whitespace, lowercase, regex split, byte level)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts: collections.Counter = collections.Counter()
    for line in lines:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] += 1
    return counts


def _learn_bpe_merges(word_counts: collections.Counter, num_merges: int) -> list[tuple[str, str]]:
    """Deterministic BPE training (CLIP style, ``</w>`` end-of-word suffix).

    The ``tokenizers`` BpeTrainer breaks count ties in a process-dependent order, so the merges are
    learned here with an explicit tie break (highest count, then lexicographically smallest pair).
    """
    words: dict[tuple[str, ...], int] = {}
    for word, count in sorted(word_counts.items()):
        symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
        words[symbols] = words.get(symbols, 0) + count
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best, best_count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best_count < 2:
            break
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + count
        words = new_words
    return merges


def _build_clip_tokenizer():
    """Byte-level BPE CLIPTokenizer with CLIP's vocab layout.

    Layout like the real CLIP vocab: 256 byte chars, the same 256 with ``</w>``, the merges, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last (the EOS token has the highest id, which the legacy
    ``eos_token_id == 2`` pooling of CLIPTextModel relies on, exactly as with the real model).
    """
    from transformers import CLIPTokenizer

    lines = _CORPUS.splitlines() + [" ".join(_EXTRA_CHARS)]
    merges = _learn_bpe_merges(_clip_pretokenize(lines), _CLIP_NUM_MERGES)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    seen = set(vocab_list)
    for a, b in merges:
        token = a + b
        if token not in seen:
            seen.add(token)
            vocab_list.append(token)
    vocab_list += [_CLIP_BOS, _CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=[(a, b) for a, b in merges],
        unk_token=_CLIP_EOS,
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,
        model_max_length=77,
    )


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _unigram_training_lines() -> list[str]:
    lines = _CORPUS.splitlines()
    return lines + [line.lower() for line in lines] + [" ".join(_EXTRA_CHARS)]


def _train_unigram_pieces() -> list[tuple[str, float]]:
    """Train a SentencePiece-style Unigram model with ``tokenizers`` and canonicalize it.

    The ``tokenizers`` UnigramTrainer selects the pieces (that set is stable), but it is multi-threaded
    and iterates hash maps, so its piece order and the EM scores of rare pieces change from run to run
    (measured: ~1e-3). The pieces are therefore re-scored deterministically with their log relative
    frequency as substrings of the ``▁``-prefixed training words (longer, frequent pieces win the Viterbi
    segmentation, as with a trained model), rounded, and sorted by (score descending, piece), which makes
    two builds byte-identical.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre
    trainer = trainers.UnigramTrainer(
        vocab_size=_XLMR_VOCAB_SIZE,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=sorted(set(_EXTRA_CHARS + "▁")),
        max_piece_length=12,
        show_progress=False,
    )
    lines = _unigram_training_lines()
    with _env(TOKENIZERS_PARALLELISM="false"):
        tok.train_from_iterator(lines, trainer)
    specials = {"<s>", "<pad>", "</s>", "<unk>", "<mask>"}
    piece_set = {piece for piece, _ in json.loads(tok.to_str())["model"]["vocab"] if piece not in specials}
    # Every single character must be a piece so ordinary text never falls back to <unk>.
    piece_set.update(_EXTRA_CHARS + "▁")

    words: collections.Counter = collections.Counter()
    for line in lines:
        for word, _ in pre.pre_tokenize_str(line):
            words[word] += 1
    counts: dict[str, int] = {}
    for piece in sorted(piece_set):
        n = 0
        for word, c in words.items():
            start = word.find(piece)
            while start != -1:
                n += c
                start = word.find(piece, start + 1)
        counts[piece] = n
    total = sum(counts.values())
    floor = math.log(0.5 / total)  # pieces never seen as a substring (should not happen)
    pieces = {
        piece: round(math.log(n / total) if n else floor, _SCORE_DIGITS) + 0.0 for piece, n in counts.items()
    }
    return sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0]))


def _build_xlmr_tokenizer():
    """XLMRobertaTokenizer (Unigram) with the real model's special ids: <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last."""
    from transformers import XLMRobertaTokenizer

    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += _train_unigram_pieces()
    vocab.append(("<mask>", 0.0))
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=512)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _build_prior_components(clip_tokenizer) -> dict:
    import torch
    from diffusers import PriorTransformer, UnCLIPScheduler
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    d = TINY_EMBED_DIM
    torch.manual_seed(_SEEDS["prior_text_encoder"])
    text_encoder = CLIPTextModelWithProjection(
        CLIPTextConfig(
            attention_dropout=0.0,
            bos_token_id=0,
            dropout=0.0,
            eos_token_id=2,
            hidden_act="quick_gelu",
            hidden_size=32,
            initializer_factor=1.0,
            initializer_range=0.02,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            max_position_embeddings=77,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            projection_dim=d,
            vocab_size=len(clip_tokenizer),
        )
    ).eval()

    torch.manual_seed(_SEEDS["prior_image_encoder"])
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            attention_dropout=0.0,
            dropout=0.0,
            hidden_act="quick_gelu",
            hidden_size=32,
            image_size=32,
            initializer_factor=1.0,
            initializer_range=0.02,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_channels=3,
            num_hidden_layers=2,
            patch_size=8,
            projection_dim=d,
        )
    ).eval()

    torch.manual_seed(_SEEDS["prior"])
    # The prior's encoder_hidden_states_proj maps embedding_dim -> inner dim and is applied to the
    # CLIP text hidden states, so embedding_dim must equal the CLIP text hidden_size (as 768 = 768 in
    # the real model).
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        embedding_dim=d,
        num_embeddings=77,
        additional_embeddings=4,
        dropout=0.0,
    )
    with torch.no_grad():
        # Trained models hold the CLIP embedding statistics here; the init (zeros) would make every
        # image embedding identical. Unit std / small mean keeps the outputs input dependent.
        prior.clip_std.fill_(1.0)
        prior.clip_mean.copy_(torch.randn(prior.clip_mean.shape) * 0.1)
        prior.positional_embedding.copy_(torch.randn(prior.positional_embedding.shape) * 0.02)
        prior.prd_embedding.copy_(torch.randn(prior.prd_embedding.shape) * 0.02)
    prior.eval()

    scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    image_processor = CLIPImageProcessor(
        crop_size=32,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=list(_CLIP_MEAN),
        image_std=list(_CLIP_STD),
        resample=3,
        size=32,
    )
    return dict(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        scheduler=scheduler,
        image_processor=image_processor,
    )


def _build_unet(in_channels: int, seed: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        act_fn="silu",
        addition_embed_type="text_image",
        addition_embed_type_num_heads=64,
        attention_head_dim=8,
        block_out_channels=(32, 64),
        center_input_sample=False,
        class_embed_type=None,
        cross_attention_dim=TINY_EMBED_DIM,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        downsample_padding=1,
        encoder_hid_dim=32,  # = MCLIP transformerDimensions
        encoder_hid_dim_type="text_image_proj",
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=in_channels,
        layers_per_block=1,
        mid_block_scale_factor=1,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        norm_eps=1e-05,
        norm_num_groups=8,
        out_channels=8,  # learned variance: 4 noise channels + 4 variance channels
        resnet_time_scale_shift="scale_shift",
        sample_size=TINY_IMAGE_SIZE // TINY_MOVQ_SCALE_FACTOR,
        time_embedding_type="positional",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        upcast_attention=False,
        use_linear_projection=False,
    ).eval()


def _build_decoder_shared(xlmr_tokenizer) -> dict:
    """text_encoder / tokenizer / scheduler / movq shared by the decoder and the inpaint folders."""
    import torch
    from diffusers import DDIMScheduler, VQModel
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    torch.manual_seed(_SEEDS["mclip"])
    text_encoder = MultilingualCLIP(
        MCLIPConfig(
            transformerDimSize=32,
            imageDimSize=TINY_EMBED_DIM,
            attention_probs_dropout_prob=0.1,
            bos_token_id=0,
            eos_token_id=2,
            hidden_act="gelu",
            hidden_dropout_prob=0.1,
            hidden_size=32,
            initializer_range=0.02,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            max_position_embeddings=514,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            position_embedding_type="absolute",
            type_vocab_size=1,
            vocab_size=len(xlmr_tokenizer),
        )
    ).eval()

    torch.manual_seed(_SEEDS["movq"])
    # SpatialNorm (norm_type="spatial") hard-codes GroupNorm(32 groups): decoder widths must be multiples of 32.
    movq = VQModel(
        act_fn="silu",
        block_out_channels=(32, 32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        norm_type="spatial",
        num_vq_embeddings=64,
        out_channels=3,
        sample_size=TINY_IMAGE_SIZE // 2,
        scaling_factor=0.18215,
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
        vq_embed_dim=4,
    ).eval()

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    return dict(text_encoder=text_encoder, tokenizer=xlmr_tokenizer, scheduler=scheduler, movq=movq)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _fix_model_index(folder: Path) -> None:
    """Name the image processor ``CLIPImageProcessor`` like the real hub folder.

    Without torchvision, transformers 5 instantiates ``CLIPImageProcessorPil`` and diffusers would record
    that class, which older transformers versions cannot load. ``CLIPImageProcessor`` loads everywhere
    (falling back to the PIL variant where torchvision is missing).
    """
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    entry = index.get("image_processor")
    if isinstance(entry, list) and len(entry) == 2 and entry[1] != "CLIPImageProcessor":
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _save_all(staging: Path) -> None:
    import torch
    from diffusers import KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline

    rng_state = torch.random.get_rng_state()
    try:
        prior_pipe = KandinskyPriorPipeline(**_build_prior_components(_build_clip_tokenizer()))
        shared = _build_decoder_shared(_build_xlmr_tokenizer())
        decoder_pipe = KandinskyPipeline(unet=_build_unet(4, _SEEDS["unet"]), **shared)
        inpaint_pipe = KandinskyInpaintPipeline(unet=_build_unet(9, _SEEDS["inpaint_unet"]), **shared)
    finally:
        torch.random.set_rng_state(rng_state)

    prior_pipe.save_pretrained(staging / "prior", safe_serialization=True)
    _fix_model_index(staging / "prior")
    decoder_pipe.save_pretrained(staging / "decoder", safe_serialization=True)
    inpaint_pipe.save_pretrained(staging / "inpaint", safe_serialization=True)
    _save_ddpm_scheduler(decoder_pipe.scheduler, staging / "decoder")
    # Guarantee the shared components are byte-identical copies of the decoder's.
    for sub in ("text_encoder", "tokenizer", "movq", "scheduler", "ddpm_scheduler"):
        shutil.rmtree(staging / "inpaint" / sub, ignore_errors=True)
        shutil.copytree(staging / "decoder" / sub, staging / "inpaint" / sub)


def _save_ddpm_scheduler(ddim, folder: Path) -> None:
    """``folder/ddpm_scheduler/``: the hub repo kandinsky-community/kandinsky-2-1 keeps the DDPM scheduler config
    beside the pipeline (not in model_index.json), and ``models.scheduler: ddpm`` loads it from there.

    The tiny folder mirrors the DDIM config with the DDPM class (what ``DDPMScheduler.from_config`` of the DDIM
    config gives), so a diffusers user who swaps the scheduler by ``from_config`` gets the same pixels here.
    """
    from diffusers import DDPMScheduler

    DDPMScheduler.from_config(ddim.config).save_pretrained(folder / "ddpm_scheduler")


def tiny_models_complete(root: str | os.PathLike) -> bool:
    """True when root/prior, root/decoder and root/inpaint all contain a model_index.json."""
    root = Path(root)
    return all((root / name / "model_index.json").is_file() for name in COMPONENTS)


@contextlib.contextmanager
def _lock(root: Path):
    """Inter-process lock on ``root`` (several workers may write the same root at once)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / ".tiny_models.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_tiny_models(root: str | os.PathLike, *, overwrite: bool = False) -> dict[str, str]:
    """Write tiny random-weight Kandinsky 2.1 model folders root/prior, root/decoder, root/inpaint
    in diffusers format (safetensors). Returns {"prior": path, "decoder": path, "inpaint": path}.
    If the three folders already exist and are complete (model_index.json present) and not overwrite,
    return them untouched.

    The folders load with ``KandinskyPriorPipeline.from_pretrained(paths["prior"], use_safetensors=True)``,
    ``KandinskyPipeline.from_pretrained(paths["decoder"], ...)`` and
    ``KandinskyInpaintPipeline.from_pretrained(paths["inpaint"], ...)``. Two calls produce byte-identical files.
    """
    root = Path(root).expanduser().absolute()
    paths = {name: str(root / name) for name in COMPONENTS}
    if not overwrite and tiny_models_complete(root):
        return paths

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if not overwrite and tiny_models_complete(root):  # another process finished meanwhile
            return paths
        staging = Path(tempfile.mkdtemp(prefix=".tiny-models-", dir=root))
        try:
            _save_all(staging)
            for name in COMPONENTS:
                target = root / name
                if target.exists() or target.is_symlink():
                    trash = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=root))
                    os.replace(target, trash / name)
                    shutil.rmtree(trash, ignore_errors=True)
                os.replace(staging / name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return paths


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write tiny random-weight Kandinsky 2.1 model folders.")
    parser.add_argument("root", help="folder that receives prior/, decoder/ and inpaint/")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the folders are complete")
    args = parser.parse_args(argv)
    print(json.dumps(write_tiny_models(args.root, overwrite=args.overwrite), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
