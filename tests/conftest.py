"""Shared test setup: 8 fake CPU devices, the reference package, tiny models with given weights.

The XLA flag below must be set before jax is first imported, so it sits at the very top of the
first module pytest loads: every test in the suite then sees 8 CPU devices, which the sharding and
checkpoint tests build meshes from, while code that names no mesh still runs on device 0.
"""
import contextlib
import importlib
import importlib.util
import math
import os
import re
import sys
import types

# `cli.main` turns on the persistent compile cache (compile_cache.py); tests that call it must not
# write into the user's cache folder. test_compile_cache.py sets its own folders.
os.environ.setdefault("TOKENSYNTH_COMPILE_CACHE", "off")

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=8".strip()

import jax  # noqa: E402  (after the XLA flag on purpose)
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from tokensynth_jax.model.transformer import TokenSynth  # noqa: E402
from tokensynth_jax.tokens.midi_library import pretty_midi  # noqa: E402  (quiet under $CI)

# Sizes the reference forces on a tiny official-shaped model: get_hparams only lets us change
# heads, blocks and width; 9 codebooks of 1024, the 1133-id MIDI vocabulary and the 512 -> 1024
# timbre MLP are hard-coded. max_len stays 1024 because `synthesize` needs midi_len + 451 positions.
REF_TINY = dict(num_heads=3, num_blocks=2, embed_dim=48)
REF_INIT_STD = 0.3  # large random weights: peaked logits, so greedy decisions are not near-ties


def lower_pallas_for_cuda(fn, *args) -> tuple[str, int]:
    """`fn` (Pallas kernels with interpret=False) exported for CUDA from this CPU: its MLIR module
    text and the number of programs in its Triton calls' grids. A construct the Triton lowering
    lacks, or a shape a kernel cannot tile, fails here rather than on a GPU."""
    exported = jax.export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    module = exported(*args).mlir_module()
    return module, math.prod(int(n) for n in re.findall(r"grid_[xyz] = (\d+)", module))


def bare_package(name: str, path: list | None = None) -> types.ModuleType:
    """A module for the installed package `name` (or a folder `path`) whose __init__ never runs.

    With its __path__ set, Python imports the package's submodules alone, which lets the tests use
    the model code of packages whose __init__ imports what we do not install.
    """
    package = types.ModuleType(name)
    package.__path__ = list(path if path is not None else importlib.util.find_spec(name).submodule_search_locations)
    return package


@contextlib.contextmanager
def stand_in_modules(modules: dict, also_restore=()):
    """`modules` in sys.modules for the block; afterwards every one of those names (and of
    `also_restore`, set inside the block) is as it was, so no stand-in leaks into other tests."""
    saved = {k: sys.modules.get(k) for k in [*modules, *also_restore]}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load_reference_module(name):
    """Imports `tokensynth.<name>` from the installed reference without running its __init__.

    tokensynth/__init__.py imports laion_clap, dac and librosa, which we do not install. Registering
    a bare package module whose __path__ is the installed package directory lets Python find and
    import the submodule alone. Skips the test if the reference is not installed.
    """
    if "tokensynth" not in sys.modules:
        spec = importlib.util.find_spec("tokensynth")
        if spec is None or spec.submodule_search_locations is None:
            pytest.skip("reference package tokensynth is not installed")
        sys.modules["tokensynth"] = bare_package("tokensynth")
    try:
        return importlib.import_module(f"tokensynth.{name}")
    except ImportError as e:  # torch, tqdm or huggingface_hub missing
        pytest.skip(f"reference module tokensynth.{name} cannot be imported: {e}")


@pytest.fixture(scope="session")
def reference():
    """The reference's `model` and `utils` modules (tokensynth 0.0.4)."""
    import torch

    # The reference's step-by-step generation of tiny models is all small ops: on 2 cores torch's
    # intra-op threads make it 20x slower (12 s instead of 0.6 s for one 450-row synthesis).
    torch.set_num_threads(1)
    return types.SimpleNamespace(model=load_reference_module("model"), utils=load_reference_module("utils"))


@pytest.fixture(scope="session")
def reference_module():
    """The loader itself, for tests that need one reference module only."""
    return load_reference_module


def model_from_params(cfg, params):
    """Our model for `cfg` holding `params` (a nested dict as `convert.from_official` returns)."""
    abstract = nnx.eval_shape(lambda: TokenSynth(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def randomize(model, seed, std=REF_INIT_STD):
    """Replaces every parameter of `model` by N(0, std) draws (in place) and returns the model.

    The default init (std 0.02, zero biases, unit norms) gives nearly flat attention and logits,
    under which a masking or padding bug can hide; large random weights make every input matter.
    """
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


@pytest.fixture(scope="session")
def tiny_reference(reference):
    """Builds a tiny reference module: `make(unconditional=False, seed=0)`.

    Its parameters are seeded N(0, REF_INIT_STD) draws; the attention mask buffers stay the
    reference's default (the inverted `triu(ones, 1)`).
    """
    import torch

    M = reference.model
    original = M.TokenSynth.get_hparams  # TokenSynthUnconditional inherits it

    def tiny_hparams(self):
        h = original(self)
        for name, value in REF_TINY.items():
            setattr(h, name, value)
        return h

    def make(unconditional=False, seed=0):
        cls = M.TokenSynthUnconditional if unconditional else M.TokenSynth
        with pytest.MonkeyPatch.context() as mp:  # only construction reads the hparams
            mp.setattr(M.TokenSynth, "get_hparams", tiny_hparams)
            module = cls(device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, REF_INIT_STD, generator=generator)
        return module.eval()

    return make


@pytest.fixture(scope="session")
def official_pair(tiny_reference):
    """`get(conditioning, attention)` -> (reference module, our model) computing the same function.

    "tokensynth-0.0.4": the reference with its default mask buffer, ours with the quirk mode.
    "causal": the reference after loading `convert.to_official` of our causal model (strict=False,
    as its `from_pretrained` does), which writes lower-triangular mask buffers. Built once a session.
    """
    from tokensynth_jax.interop import convert

    cache = {}

    def get(conditioning="timbre", attention="causal"):
        if (conditioning, attention) not in cache:
            ref = tiny_reference(unconditional=conditioning == "unconditional", seed=7)
            cfg, params, _ = convert.from_official(
                ref.state_dict(), num_heads=REF_TINY["num_heads"], attention=attention
            )
            assert cfg.conditioning == conditioning
            if attention == "causal":
                ref.load_state_dict(convert.to_official(cfg, params), strict=False)
            cache[conditioning, attention] = (ref, model_from_params(cfg, params))
        return cache[conditioning, attention]

    return get


def write_midi(path, tracks, tempo=120.0):
    """Writes a real MIDI file: tracks of (program, is_drum, [(start, end, pitch, velocity), ...])."""
    pm = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    for program, is_drum, notes in tracks:
        inst = pretty_midi.Instrument(program=program, is_drum=is_drum)
        inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for s, e, p, v in notes]
        pm.instruments.append(inst)
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pm.write(str(path))


def read_tensorboard(log_dir):
    """An EventAccumulator (tensorboard's own reader) with every scalar, image and audio event of
    the event files in `log_dir` loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "audio": 0})
    events.Reload()
    return events


def pytest_collection_modifyitems(items):
    """The long tests (marked slow) first, so that with `-n 2` (the Makefile's) they start at once
    on both workers and the short ones fill in around them, instead of one long test at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
