"""DAC parity: descript's own model code (`descript-audio-codec`, installed with --no-deps) and the
transformers DacModel our converter fills from its state dict give identical codes and the same
audio, with descript's padding (431 frames for 5 s at 44.1 kHz) and n_quantizers honoured.

How descript's model is imported: `dac/__init__.py` imports `dac.utils` (argbind) and
`descript-audiotools`, whose package imports torchaudio, which we never install. The model code
itself needs two names from audiotools at import time only (`ml.BaseModel`, a torch Module with
save/load helpers, and `AudioSignal`, used by `compress`, not by `encode`/`decode`). So the test
registers a bare `dac` package (its submodules load without running its __init__) and a small
`audiotools` stand-in module in sys.modules for the duration of the import. Everything that
computes (layers, quantizer, encoder, decoder) is descript's code.
"""
import importlib
import importlib.util
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("einops")

from conftest import bare_package, stand_in_modules  # noqa: E402

from tokensynth_jax.interop import dac_convert  # noqa: E402
from tokensynth_jax.interop.convert import ConversionError  # noqa: E402

# The real 44.1 kHz architecture (strides 2-4-8-8, 9 codebooks of 1024, dim 8) with narrow
# encoder/decoder channels, so a 5 s clip runs in about a second; test_full_size_state_dict_converts
# checks the full-width key set and shapes.
SMALL = dict(encoder_dim=8, encoder_rates=[2, 4, 8, 8], decoder_dim=48, decoder_rates=[8, 8, 4, 2],
             n_codebooks=9, codebook_size=1024, codebook_dim=8, sample_rate=44100)
SR = 44100
# descript's layers use torch.jit.script and the old weight_norm; both warn in torch 2.13.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")]


@pytest.fixture(scope="module")
def descript():
    """descript's `dac.model.dac` module, imported as the module docstring says."""
    if importlib.util.find_spec("dac") is None:
        pytest.skip("descript-audio-codec is not installed (make setup installs it with --no-deps)")
    stand_in = types.ModuleType("audiotools")
    stand_in.ml = types.ModuleType("audiotools.ml")
    stand_in.ml.BaseModel = type("BaseModel", (torch.nn.Module,), {})
    stand_in.AudioSignal = stand_in.STFTParams = None  # compress()/the discriminator only
    with stand_in_modules({"dac": bare_package("dac"), "audiotools": stand_in, "audiotools.ml": stand_in.ml}):
        module = importlib.import_module("dac.model.dac")
    torch.set_num_threads(1)
    return module


@pytest.fixture(scope="module")
def pair(descript):
    """(descript DAC, converted transformers DacModel), random weights, both in eval mode."""
    torch.manual_seed(0)
    original = descript.DAC(**SMALL).eval()
    with torch.no_grad():  # weight_g away from its init (= |v|) so the weight-norm fold matters
        for name, p in original.named_parameters():
            if name.endswith("weight_g") or name.endswith("alpha"):
                p.mul_(torch.rand_like(p) + 0.5)
    return original, dac_convert.from_descript(original.state_dict(), SMALL)


@pytest.fixture(scope="module")
def clip():
    t = np.arange(5 * SR) / SR
    rng = np.random.default_rng(1)
    audio = 0.4 * np.sin(2 * np.pi * 220 * t) * np.exp(-t) + 0.05 * rng.normal(size=t.size)
    return audio[None].astype(np.float32)  # [1, 220500]: 5 s, not a whole number of hops


@pytest.mark.parametrize("n_quantizers", [None, 4])
def test_codes_are_identical_and_five_seconds_is_431_frames(pair, clip, n_quantizers):
    original, converted = pair
    x = torch.from_numpy(clip)[:, None, :]
    with torch.no_grad():
        _, codes, *_ = original.encode(original.preprocess(x, SR), n_quantizers=n_quantizers)
    ours = dac_convert.encode(converted, clip, n_quantizers=n_quantizers)
    k = n_quantizers or 9
    assert ours.shape == (1, k, 431) == (1, k, dac_convert.num_frames(clip.shape[-1]))
    np.testing.assert_array_equal(ours, codes[:, :k].numpy())
    assert len(np.unique(ours)) > 50  # real quantisation, not one code everywhere


def test_prep_codec_gives_descripts_codes(pair, clip, tmp_path):
    """Prep's DAC (tokensynth_jax.audio.encoders.Codec, loading a local checkpoint) pads as descript's
    preprocess does: 431 frames for 5 s, the codes of descript's own model."""
    from tokensynth_jax.audio import encoders

    original, converted = pair
    converted.save_pretrained(tmp_path / "dac")
    codec = encoders.Codec(str(tmp_path / "dac"), batch_size=1)
    assert codec.info.padding == "whole-hop"
    with torch.no_grad():
        _, codes, *_ = original.encode(original.preprocess(torch.from_numpy(clip)[:, None, :], SR))
    ours = codec.encode(clip)  # [B, T, K]
    assert ours.shape == (1, 431, 9)
    np.testing.assert_array_equal(ours.transpose(0, 2, 1), codes.numpy())


def test_encode_is_in_eval_mode_whatever_the_model_mode(pair, clip):
    _, converted = pair
    converted.train()  # quantizer dropout would ignore n_quantizers and return all 9 codebooks
    try:
        assert dac_convert.encode(converted, clip, n_quantizers=3).shape == (1, 3, 431)
        assert converted.training  # the caller's mode is left as it was
    finally:
        converted.eval()


def test_decoded_audio_matches_the_references_decoding(pair, clip):
    """The reference decodes with quantizer.from_codes + decode (tokensynth/dac_decoder.py)."""
    original, converted = pair
    codes = torch.from_numpy(dac_convert.encode(converted, clip))
    with torch.no_grad():
        theirs = original.decode(original.quantizer.from_codes(codes)[0])
        ours = converted.decode(audio_codes=codes).audio_values
    theirs, ours = theirs.reshape(-1).numpy(), ours.reshape(-1).numpy()
    assert ours.shape == theirs.shape == (431 * 512,)
    assert np.abs(theirs).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_full_size_state_dict_converts(descript):
    """The published 44.1 kHz size (64 / 1536 channels): every key maps, with its shape."""
    torch.manual_seed(0)
    state = descript.DAC().state_dict()
    model = dac_convert.from_descript(state)
    # weight_g / weight_v pairs fold into one weight: 76.6M parameters either way
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in state.items() if not k.endswith("weight_g")) == 76_620_777


def test_strict_conversion_lists_every_problem(pair):
    original, _ = pair
    state = dict(original.state_dict())
    del state["decoder.model.6.weight_v"], state["quantizer.quantizers.8.codebook.weight"]
    state["encoder.block.9.bias"] = torch.zeros(3)
    state["encoder.block.0.bias"] = torch.zeros(7)
    with pytest.raises(ConversionError) as info:
        dac_convert.from_descript(state, SMALL)
    lines = str(info.value).splitlines()
    assert lines[0] == "descript DAC state dict does not match the architecture:"
    assert set(lines[1:]) == {
        "  unexpected key encoder.block.9.bias",
        "  unexpected key decoder.conv2.weight_g (from descript)",  # a weight_g without its weight_v
        "  missing key decoder.conv2.weight (1, 3, 7)",
        "  missing key quantizer.quantizers.8.codebook.weight (1024, 8)",
        "  shape mismatch encoder.conv1.bias: (7,), expected (8,)",
    }


def test_bad_descript_files(tmp_path):
    with pytest.raises(ConversionError, match="no such file"):
        dac_convert.load_descript_file(tmp_path / "missing.pth")
    plain = tmp_path / "plain.pth"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(ConversionError, match="plain.pth: not a descript DAC file"):
        dac_convert.load_descript_file(plain)
