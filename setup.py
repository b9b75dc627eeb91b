"""tokensynth-jax: a JAX/Flax TokenSynth for sharded pretraining, fast sampling and portable checkpoints.

Extras keep the heavy, accelerator-irrelevant stacks apart: a TPU trainer installs the core
(`pip install .[train]`) and never pulls torch; `torch` (official-checkpoint conversion) and
`audio` (codecs and CLAP through transformers) are only for the machines that need them.
`pip install torch==2.13.0` first on CPU machines, so transformers does not pull a CUDA build.
"""
import pathlib

import setuptools

CORE = [
    "jax>=0.10",
    "flax>=0.12.8",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12",
    "ml-collections>=1.0",
    "absl-py",
    "numpy>=1.26",
    "msgpack>=1.0",  # the pair-record encoding (records.py)
    "pretty_midi>=0.2.10",
    "safetensors>=0.8",  # checkpoints for others (safetensors_format.py; 0.8 reads and writes bfloat16 numpy)
    "flatbuffers>=24.3",  # jax.export serialization (export.py)
]
TORCH = ["torch>=2.1"]
AUDIO = TORCH + ["transformers>=4.45", "soundfile>=0.12", "scipy>=1.10",  # WAV in/out, resampling
                 "tqdm>=4.60", "matplotlib>=3.6",  # synthesize: progress bar over windows, spectrogram PNGs
                 "librosa>=0.10"]  # CLAP input_mode "tokensynth-0.0.4": the reference's own resampling
# tensorboardX writes the scalars, sample audio and spectrograms; tensorboard reads and shows them.
TENSORBOARD = ["tensorboardX>=2.6", "tensorboard>=2.21"]
TRAIN = ["grain>=0.2.10", "array_record>=0.7"] + TENSORBOARD
PREP = AUDIO + TRAIN + ["apache-beam>=2.60", "pedalboard>=0.9", "pyfluidsynth>=1.3"]  # scipy: in AUDIO
SCALING = ["scipy>=1.10", "matplotlib>=3.6", "threadpoolctl>=3.1"]  # sweep fits and plots (scaling.py)
# metrics.py / evaluate.py: the transcription F-score runs basic-pitch 0.4.0's ONNX path, vendored in
# evaluation/basic_pitch/ because basic-pitch's published requirements pin tensorflow<2.15.1 on Linux
# (and numpy 1.x), which cannot be installed next to jax. The copy needs onnxruntime, librosa and
# scipy (librosa, scipy and soundfile come with AUDIO); mir_eval scores the notes; eval clips go to TensorBoard.
EVAL = AUDIO + ["mir_eval>=0.7", "onnxruntime>=1.16"] + TENSORBOARD
NSYNTH_TFDS = ["tensorflow-datasets", "tensorflow"]  # only to convert a prepared TFDS nsynth; not in `all`
TEST = ["pytest>=8", "pytest-xdist>=3", "psutil"]

setuptools.setup(
    name="tokensynth-jax",
    version="0.1.0",
    description="JAX/Flax TokenSynth: neural synthesizer from MIDI and CLAP timbre to codec tokens.",
    long_description=(pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The repository's top-level `configs/` and `data_prep/` install inside the product's names:
    # `tokensynth_jax.configs` (so `--config tiny` works from any directory) and `tokensynth_prep`
    # (the Beam job; a generic top-level `data_prep` would squat a name other projects use).
    packages=setuptools.find_packages(include=["tokensynth_jax", "tokensynth_jax.*"]) + [
        "tokensynth_jax.configs", "tokensynth_prep"],
    package_dir={"tokensynth_jax.configs": "configs", "tokensynth_prep": "data_prep"},
    package_data={"tokensynth_jax.inference": ["assets/*"],
                  # basic-pitch's ONNX model and the license and notice its Apache-2.0 terms require
                  "tokensynth_jax.evaluation.basic_pitch": ["nmp.onnx", "LICENSE", "NOTICE"]},
    install_requires=CORE,
    extras_require={
        "torch": TORCH,
        "audio": AUDIO,
        "train": TRAIN,
        "prep": PREP,
        "test": TEST,
        "scaling": SCALING,
        "eval": EVAL,
        "nsynth-tfds": NSYNTH_TFDS,
        "all": sorted(set(PREP + TEST + SCALING + EVAL)),
    },
    entry_points={"console_scripts": ["tokensynth=tokensynth_jax.cli.console:main"]},
)
