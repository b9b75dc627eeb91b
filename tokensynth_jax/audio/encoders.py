"""The audio front end: CLAP embeddings and codec codes through transformers.

With the converters (interop/), the only place that imports torch and transformers. Presets are chosen by name:
pretrained checkpoints (Hugging Face ids or local paths) load the normal way and, when they are
not in the cache and the hub cannot be reached, fail with a clear error, never a silent switch to
random weights; `tiny-*` presets are tiny seeded random models of the same architectures (tests,
the offline demo) and `random-*` presets are full-size random models with the published
architectures (benchmarks), so asking for random weights is always explicit. The offline demo's
own encoders, named for what they are, need no weights: `demo-spectral` (spectral statistics in
CLAP's shape, audio only) and `demo-melrvq`, a codec that `tokensynth prep --codec demo-melrvq`
fits on its renders and saves as OUT/codec/demo-melrvq.npz; that file's path is then the codec's
name everywhere else (training configs, checkpoints, synthesis). Models run at a fixed
batch size (short batches are padded): on CPU an item's result then does not depend on which
items share its batch, which keeps shards byte-identical however the runner bundles the work.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os

import numpy as np

from tokensynth_jax.audio import io as audio_io
from tokensynth_jax.audio import melrvq, spectral_embedder
from tokensynth_jax.errors import UserError
from tokensynth_jax.tokens import records

# name -> (kind, published architecture). EnCodec 32 kHz: transformers' conversion script
# (upsampling 8-5-4-4, 2048 codes, 2.2 kbps = 4 codebooks at 50 Hz, non-causal, no conv shortcut).
_ENCODEC_32K = dict(upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[2.2], num_filters=64, sampling_rate=32000,
                    codebook_size=2048, use_causal_conv=False, normalize=False, use_conv_shortcut=False)
# DAC 44.1 kHz: 9 codebooks of 1024 (dim 8), strides 2-4-8-8 (512 samples, 86.13 frames/s).
_DAC_44K = dict(encoder_hidden_size=64, downsampling_ratios=[2, 4, 8, 8], decoder_hidden_size=1536, n_codebooks=9,
                codebook_size=1024, codebook_dim=8, sampling_rate=44100)
# Tiny models: odd sizes where the architecture allows (both codecs need power-of-two codebooks).
_TINY_ENCODEC = dict(upsampling_ratios=[8, 5, 4, 4], target_bandwidths=[1.2], num_filters=4, hidden_size=12,
                     sampling_rate=32000, codebook_size=64, use_causal_conv=False, normalize=False,
                     use_conv_shortcut=False, num_lstm_layers=1, compress=2)
_TINY_DAC = dict(encoder_hidden_size=4, downsampling_ratios=[2, 4, 8, 8], decoder_hidden_size=32, n_codebooks=3,
                 codebook_size=64, codebook_dim=4, sampling_rate=44100)
# CLAP HTSAT-base (LAION's larger_clap_* checkpoints): 128-wide patches, depths 2-2-12-2, 1024 hidden.
_HTSAT_BASE = dict(patch_embeds_hidden_size=128, hidden_size=1024, depths=[2, 2, 12, 2])
_TINY_HTSAT = dict(patch_embeds_hidden_size=8, hidden_size=64, depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                   window_size=8)
_TINY_TEXT = dict(vocab_size=101, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                  max_position_embeddings=40)

CODEC_PRESETS = {
    "tiny-encodec": ("encodec", _TINY_ENCODEC),
    "tiny-dac": ("dac", _TINY_DAC),
    "random-encodec_32khz": ("encodec", _ENCODEC_32K),
    "random-dac_44khz": ("dac", _DAC_44K),
}
CLAP_PRESETS = {
    "tiny-clap": {"audio_config": _TINY_HTSAT, "text_config": _TINY_TEXT},
    "random-larger_clap_music": {"audio_config": _HTSAT_BASE},
}
CLAP_SAMPLE_RATE = 48000
_SEED = 0  # random presets are seeded, so two workers build the same model


class EncoderError(UserError):
    """An encoder that cannot be loaded; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class CodecInfo:
    """What a record says about its codec."""

    name: str
    sample_rate: int
    frame_rate: float
    num_codebooks: int
    codebook_size: int
    padding: str = records.PADDING_NONE  # how a clip is padded before encoding (records.py's codec["padding"])
    fit: str = ""  # a fitted codec's state fingerprint (demo-melrvq); "" for pretrained and random ones

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["fit"]:  # as records of unfitted codecs always said
            del d["fit"]
        return d


def is_fitted_state(name: str) -> bool:
    """Whether a codec name is the path of a fitted demo-melrvq state (what prep writes)."""
    return name.endswith(".npz")


def load_fitted_codec(path: str) -> melrvq.MelRVQ:
    """The fitted codec saved at `path` (local, or any URL etils.epath reads, as Orbax does).

    Raises:
      EncoderError: no such file, or not a demo-melrvq state.
    """
    from etils import epath

    try:
        data = epath.Path(path).read_bytes()
    except OSError as e:
        raise EncoderError(f"codec {path!r}: cannot read the fitted {melrvq.NAME} state ({e}); "
                           "it is written by tokensynth prep --codec demo-melrvq into OUT/codec/") from e
    try:
        return melrvq.MelRVQ.from_bytes(data, what=f"codec {path!r}")
    except melrvq.MelRVQError as e:
        raise EncoderError(str(e)) from e


def _fitted_info(fitted: melrvq.MelRVQ) -> CodecInfo:
    c = fitted.config
    return CodecInfo(melrvq.NAME, c.sample_rate, c.frame_rate, c.num_codebooks, c.codebook_size,
                     fit=fitted.fingerprint[:16])


def _unfitted(name: str) -> EncoderError:
    return EncoderError(f"codec {name!r} is fitted by `tokensynth prep --codec {name}` on the job's own renders; "
                        f"elsewhere name the fitted state it wrote, OUT/codec/{melrvq.NAME}.npz")


def _missing(name: str, what: str, e: Exception, offline: bool) -> EncoderError:
    tiny = "tiny-encodec" if what == "codec" else "tiny-clap"
    folder = (f"a local {what} is a folder with config.json and the weights, as transformers' save_pretrained "
              "writes it")
    if os.path.isfile(name):
        return EncoderError(f"--{what} {name}: is a file ({folder})")
    if os.path.isdir(name):
        return EncoderError(f"--{what} {name}: holds no config.json ({folder})")
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:  # a local path, not an org/name id
        return EncoderError(f"--{what} {name}: no such directory ({folder})")
    why = "--offline keeps off the hub" if offline else \
        "the hub is unreachable" if hub_unreachable() else "the hub did not give it"
    return EncoderError(
        f"{what} {name!r} is not in the Hugging Face cache, and {why} ({type(e).__name__}): "
        f"download it first (huggingface-cli download {name}) or pick a tiny preset explicitly "
        f"(--{what} {tiny}); presets: {sorted(CODEC_PRESETS if what == 'codec' else CLAP_PRESETS)}, and the "
        f"offline demo's {melrvq.NAME if what == 'codec' else spectral_embedder.NAME}"
    )


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> bool:
    """Whether a 3 s connection to the Hugging Face hub fails (asked once a process).

    Without this, huggingface_hub retries every request five times with backoff, about 30 s of
    warnings, before it falls back to the cache or fails. Behind a proxy (HTTPS_PROXY or
    ALL_PROXY set) only the requests themselves can tell, so the hub counts as reachable.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    import socket
    import urllib.parse

    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return False
    except OSError:
        return True


@contextlib.contextmanager
def _local_only(name: str, offline: bool):
    """Yields `local_files_only` for `from_pretrained(name)`: offline asked for, or a hub id while
    the hub is unreachable (then the cache answers at once).

    While it is true huggingface_hub is told it is offline too: with `local_files_only` alone it
    still asks the hub for its registry of AI-agent harnesses (huggingface_hub 2.4, a 3 s request
    once a day), which `--offline` promises not to do.
    """
    if not (offline or (not os.path.isdir(name) and hub_unreachable())):
        yield False
        return
    from huggingface_hub import constants

    before, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = before


def _hub_config(name: str, what: str, offline: bool):
    from transformers import AutoConfig

    try:
        with _local_only(name, offline) as local:
            return AutoConfig.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as e:
        raise _missing(name, what, e, offline) from e


def _codec_config(name: str, offline: bool):
    from transformers import DacConfig, EncodecConfig

    if name in CODEC_PRESETS:
        kind, kw = CODEC_PRESETS[name]
        return kind, (EncodecConfig if kind == "encodec" else DacConfig)(**kw)
    config = _hub_config(name, "codec", offline)
    if config.model_type not in ("encodec", "dac"):
        raise EncoderError(f"codec {name!r} is a {config.model_type!r} model; data prep reads EnCodec or DAC")
    return config.model_type, config


def codec_info(name: str, *, offline: bool = False) -> CodecInfo:
    """The codec's rates and codebooks, from its config only (no weights).

    Raises:
      EncoderError: the codec is unknown, or a pretrained one is missing offline.
    """
    if name == melrvq.NAME:
        raise _unfitted(name)
    if is_fitted_state(name):
        return _fitted_info(load_fitted_codec(name))
    kind, c = _codec_config(name, offline)
    if kind == "encodec":
        hop = int(np.prod(c.upsampling_ratios))
        k = int(1000 * max(c.target_bandwidths) // (math.ceil(c.sampling_rate / hop) * c.codebook_nbits))
        padding = records.PADDING_NONE
    else:  # descript's preprocess pads to a whole hop; the official model was trained on those codes
        hop, k, padding = int(np.prod(c.downsampling_ratios)), c.n_codebooks, records.PADDING_WHOLE_HOP
    return CodecInfo(name, int(c.sampling_rate), c.sampling_rate / hop, k, int(c.codebook_size), padding)


def set_torch_threads(count: int) -> None:
    """Caps the intra-op threads of the torch models here (one Beam worker per core wants 1)."""
    import torch

    torch.set_num_threads(count)


def _seeded(build):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        return build()


def _init_encodec_codebooks(model) -> None:
    """Gives a random EnCodec's codebooks entries where its encoder's frames are.

    transformers initialises EnCodec codebooks to zeros (pretrained weights replace them), which
    maps every frame to code 0; a random model for tests must map different audio to different
    codes. As EnCodec's own k-means init does, codebooks are drawn from encoder frames (of seeded
    noise), layer by layer on the residual, with a little jitter.
    """
    import torch

    g = torch.Generator().manual_seed(_SEED)
    sr = model.config.sampling_rate
    x = torch.randn(1, 1, 4 * sr, generator=g) * 0.1
    with torch.inference_mode():
        residual = model.encoder(x)[0].T  # [frames, dim]
        for layer in model.quantizer.layers:
            book = layer.codebook
            pick = torch.randint(residual.shape[0], (book.embed.shape[0],), generator=g)
            jitter = torch.randn(book.embed.shape, generator=g) * residual.std() * 0.1
            book.embed.copy_(residual[pick] + jitter)
            residual = residual - book.embed[book.quantize(residual)]


def check_device(device: str) -> None:
    """Raises EncoderError unless `device` names a torch device that is here (checked before a
    job starts, so a typo is not found by the first worker that encodes)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise EncoderError(f"device {device!r}: not a torch device (cpu, cuda, cuda:N, mps, ...)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise EncoderError(f"device {device!r} asked for, but torch sees no CUDA device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise EncoderError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise EncoderError(f"device {device!r} asked for, but torch sees no MPS device")


def _torch_device(device: str):
    """The torch device; on CUDA, deterministic kernels (byte-identical shards need them: several
    cuDNN convolutions and cuBLAS reductions are not run-to-run reproducible by default)."""
    import os

    import torch

    check_device(device)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    return torch.device(device)


class Codec:
    """Audio [B, N] at the codec's rate -> codes [B, T, K], at a fixed batch size."""

    def __init__(self, name: str, *, batch_size: int, device: str = "cpu", offline: bool = False):
        """Loads a codec preset or checkpoint (see module doc). Raises EncoderError."""
        if is_fitted_state(name):  # numpy only: no torch, batch size and device play no part
            self.kind, self.batch_size, self.device = "melrvq", batch_size, device
            self.model = load_fitted_codec(name)  # read once: its info comes from it
            self.info = _fitted_info(self.model)
            return
        self.info = codec_info(name, offline=offline)
        from transformers import DacModel, EncodecModel

        kind, config = _codec_config(name, offline)
        cls = EncodecModel if kind == "encodec" else DacModel
        if name in CODEC_PRESETS:
            model = _seeded(lambda: cls(config)).eval()
            if kind == "encodec":
                _init_encodec_codebooks(model)
        else:
            try:
                with _local_only(name, offline) as local:
                    model = cls.from_pretrained(name, local_files_only=local)
            except OSError as e:
                raise _missing(name, "codec", e, offline) from e
        self.kind, self.batch_size, self.device = kind, batch_size, _torch_device(device)
        self.model = model.eval().to(self.device)
        self._bandwidth = max(config.target_bandwidths) if kind == "encodec" else None

    def encode(self, audio_bn: np.ndarray) -> np.ndarray:
        """Codes of each clip.

        Args:
          audio_bn: float32 [B, N] mono clips of equal length at `info.sample_rate`.

        Returns:
          int64 [B, T, K] codes, undelayed. DAC pads each clip to a whole hop first, as descript's
          `preprocess` does (`info.padding`): T = ceil(N / hop), 431 frames for 5 s at 44.1 kHz.
        """
        audio_bn = np.asarray(audio_bn, np.float32)
        if self.kind == "melrvq":
            return self.model.encode(audio_bn)
        import torch

        from tokensynth_jax.interop import dac_convert

        out = []
        for i in range(0, audio_bn.shape[0], self.batch_size):
            chunk = audio_bn[i : i + self.batch_size]
            padded = np.zeros((self.batch_size, audio_bn.shape[1]), np.float32)
            padded[: chunk.shape[0]] = chunk
            if self.kind == "encodec":
                x = torch.from_numpy(padded)[:, None, :].to(self.device)
                with torch.inference_mode():
                    codes = self.model.encode(x, bandwidth=self._bandwidth).audio_codes  # [chunks, B, K, T]
                codes = torch.cat(list(codes), dim=-1).cpu().numpy()
            else:
                codes = dac_convert.encode(self.model, padded)  # [B, K, T]
            out.append(codes[: chunk.shape[0]].transpose(0, 2, 1))
        return np.concatenate(out).astype(np.int64)

    def decode(self, codes_btk: np.ndarray) -> np.ndarray:
        """Audio of each item's codes (the inverse of `encode`, up to the codec's loss).

        Args:
          codes_btk: int [B, T, K] codes of equal length, 0 <= code < codebook_size, undelayed.

        Returns:
          float32 [B, T * hop] mono audio at `info.sample_rate`.

        Raises:
          EncoderError: codes of the wrong shape or out of the codebooks' range.
        """
        codes_btk = np.asarray(codes_btk)
        k, size = self.info.num_codebooks, self.info.codebook_size
        if codes_btk.ndim != 3 or codes_btk.shape[2] != k:
            raise EncoderError(f"codec {self.info.name!r} decodes [B, T, {k}] codes, got shape {codes_btk.shape}")
        if codes_btk.size and (codes_btk.min() < 0 or codes_btk.max() >= size):
            raise EncoderError(f"codec {self.info.name!r} has codes 0..{size - 1}, "
                               f"got {codes_btk.min()}..{codes_btk.max()}")
        if self.kind == "melrvq":
            return self.model.decode(codes_btk)
        import torch

        hop = round(self.info.sample_rate / self.info.frame_rate)
        out = []
        for i in range(0, codes_btk.shape[0], self.batch_size):
            chunk = codes_btk[i : i + self.batch_size]
            padded = np.zeros((self.batch_size, *codes_btk.shape[1:]), np.int64)
            padded[: chunk.shape[0]] = chunk
            x = torch.from_numpy(padded).permute(0, 2, 1).to(self.device)  # [B, K, T]
            with torch.inference_mode():
                if self.kind == "encodec":  # one chunk (these configs have no chunking), no scales
                    audio = self.model.decode(x[None], [None]).audio_values[:, 0]
                else:
                    audio = self.model.decode(audio_codes=x).audio_values
            out.append(audio[: chunk.shape[0], : codes_btk.shape[1] * hop].float().cpu().numpy())
        return np.concatenate(out)


def reference_front_end(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The reference's CLAP input (tokensynth 0.0.4 `CLAP.encode_audio`): `librosa.load(sr=16000)`
    then `librosa.resample` to 48 kHz, both librosa's default soxr_hq, so the same numbers; the
    embedding never sees content above 8 kHz."""
    audio = audio_io.resample_soxr(audio, sample_rate, 16000)
    return audio_io.resample_soxr(audio, 16000, CLAP_SAMPLE_RATE)


def check_clap(name: str, *, offline: bool = False) -> None:
    """Fails fast, before a job starts, if a CLAP checkpoint cannot be had (config only).

    Raises:
      EncoderError: a pretrained CLAP that is missing offline, or a model that is not CLAP.
    """
    if name in CLAP_PRESETS or name == spectral_embedder.NAME:
        return
    config = _hub_config(name, "clap", offline)
    if config.model_type != "clap":
        raise EncoderError(f"clap {name!r} is a {config.model_type!r} model, not CLAP")


class ClapEmbedder:
    """Reference clips -> L2-normalised CLAP audio embeddings, at a fixed batch size."""

    def __init__(self, name: str, *, batch_size: int, device: str = "cpu", offline: bool = False,
                 input_mode: str = "codec-rate"):
        """Loads a CLAP preset or checkpoint (see module doc). Raises EncoderError.

        input_mode "tokensynth-0.0.4" band-limits the reference to 16 kHz before CLAP's 48 kHz, as
        the reference implementation's front end does; "codec-rate" resamples straight to 48 kHz.
        `demo-spectral` is no CLAP (see the module doc): numpy only, audio only, any input mode.
        """
        self.name, self.batch_size, self.input_mode = name, batch_size, input_mode
        if name == spectral_embedder.NAME:
            self.model, self.device, self.dim = spectral_embedder.SpectralEmbedder(), device, spectral_embedder.DIM
            return
        from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

        if name in CLAP_PRESETS:
            model = _seeded(lambda: ClapModel(ClapConfig(**CLAP_PRESETS[name])))
            # LAION's unfused checkpoints: one 10 s window, short clips repeated then padded.
            features = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad")
        else:
            try:
                with _local_only(name, offline) as local:
                    model = ClapModel.from_pretrained(name, local_files_only=local)
                    features = ClapFeatureExtractor.from_pretrained(name, local_files_only=local)
            except OSError as e:
                raise _missing(name, "clap", e, offline) from e
        self._offline, self._tokenizer = offline, None  # the text tokenizer loads on first use
        self.device = _torch_device(device)
        self.model, self.features = model.eval().to(self.device), features
        self.dim = int(model.config.projection_dim)

    @property
    def model_id(self) -> str:
        """What a record's `clap_model` field says: the checkpoint and the front-end mode."""
        return f"{self.name}|{self.input_mode}"

    def embed(self, audio_bn: np.ndarray, sample_rate: int) -> np.ndarray:
        """Embeddings of each clip.

        Args:
          audio_bn: float32 [B, N] mono clips at `sample_rate`.
          sample_rate: their rate (the codec's).

        Returns:
          float32 [B, D] unit-norm embeddings.
        """
        if self.name == spectral_embedder.NAME:
            try:
                return self.model.embed(audio_bn, sample_rate)
            except spectral_embedder.SpectralEmbedderError as e:
                raise EncoderError(str(e)) from e
        import torch

        audio_bn = np.asarray(audio_bn, np.float32)
        if self.input_mode == "tokensynth-0.0.4":
            audio_bn = reference_front_end(audio_bn, sample_rate)
        else:
            audio_bn = audio_io.resample_polyphase(audio_bn, sample_rate, CLAP_SAMPLE_RATE)
        out = []
        for i in range(0, audio_bn.shape[0], self.batch_size):
            chunk = list(audio_bn[i : i + self.batch_size])
            n = len(chunk)
            chunk += [np.zeros_like(chunk[0])] * (self.batch_size - n)
            inputs = self.features(chunk, sampling_rate=CLAP_SAMPLE_RATE, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                emb = self.model.get_audio_features(**inputs).pooler_output
            out.append(emb[:n].float().cpu().numpy())
        return np.concatenate(out)

    def _tokenize(self, texts: list[str]):
        """Token ids and attention mask [B, L] of each text (padded to the longest)."""
        import torch

        if self.name not in CLAP_PRESETS:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                try:
                    with _local_only(self.name, self._offline) as local:
                        self._tokenizer = AutoTokenizer.from_pretrained(self.name, local_files_only=local)
                except OSError as e:
                    raise _missing(self.name, "clap", e, self._offline) from e
            return dict(self._tokenizer(texts, padding=True, truncation=True, return_tensors="pt"))
        # Random presets have no vocabulary to load (the hub is out of reach and a random model
        # has nothing to agree with), so their tokenizer is hand-written: UTF-8 bytes folded into
        # the tiny vocabulary between RoBERTa's <s> and </s>, <pad> after, as RoBERTa lays them out.
        c = self.model.config.text_config
        keep = c.max_position_embeddings - c.pad_token_id - 3  # room for <s>, </s> and the offset
        ids = [[c.bos_token_id] + [3 + b % (c.vocab_size - 3) for b in t.encode()[:keep]] + [c.eos_token_id]
               for t in texts]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), c.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """Text embeddings (text-to-instrument timbres).

        Args:
          texts: descriptions, each non-empty.

        Returns:
          float32 [B, D] unit-norm embeddings, in the same space as `embed`'s.
        """
        if self.name == spectral_embedder.NAME:
            try:
                return self.model.embed_text(texts)
            except spectral_embedder.SpectralEmbedderError as e:
                raise EncoderError(str(e)) from e
        import torch

        if not texts or any(not t.strip() for t in texts):
            raise EncoderError(f"CLAP text embedding needs non-empty texts, got {texts!r}")
        out = []
        for i in range(0, len(texts), self.batch_size):
            inputs = {k: v.to(self.device) for k, v in self._tokenize(list(texts[i : i + self.batch_size])).items()}
            with torch.inference_mode():
                out.append(self.model.get_text_features(**inputs).pooler_output.float().cpu().numpy())
        return np.concatenate(out)
