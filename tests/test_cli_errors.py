"""Bad command lines, one table: each exits 2 with one line naming the flag or file, no traceback, nothing written.

Every case runs `cli.main` in-process against a fresh output folder and checks that the folder is
exactly as the case left it before (no result, no temporary sibling, no created parent). The
inputs (a tiny checkpoint from `tokensynth init --config tiny`, MIDI, an embedding, a sweep plan,
a fake training workdir) are made once for the module. Most cases fail before any model loads;
a few run as `python -m tokensynth_jax.cli` to show that stderr carries no traceback.
"""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
from conftest import write_midi
from test_input_pipeline import _write_shards

from tokensynth_jax.checkpoint_meta import META_FILE
from tokensynth_jax.cli import main as cli
from tokensynth_jax.cli import model_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Paths the cases refer to as {name}."""
    root = tmp_path_factory.mktemp("inputs")
    ckpt = str(root / "ckpt")
    assert cli.main(["init", "--config", "tiny", ckpt]) == 0
    write_midi(root / "a.mid", [(0, False, [(0.1, 0.9, 60, 100)])])
    (root / "text.mid").write_text("not MIDI")
    np.save(root / "e.npy", np.ones(512, np.float32))
    np.save(root / "bad_e.npy", np.ones(7, np.float32))
    (root / "folder").mkdir()
    (root / "file.txt").write_text("a file")
    # A LAION-like state dict with just what the --text-heads check reads (a 768-wide RoBERTa).
    torch.save({"state_dict": {"module.audio_branch.bn0.weight": torch.zeros(4),
                               "module.text_branch.embeddings.word_embeddings.weight": torch.zeros(5, 768)}},
               root / "clap.pt")
    os.makedirs(root / "workdir" / "checkpoints" / "3")  # a training workdir with step 3 saved
    bad_ckpt = root / "bad_ckpt"  # the checkpoint with a model config no ModelConfig takes
    shutil.copytree(ckpt, bad_ckpt)
    meta = json.loads((bad_ckpt / META_FILE).read_text())
    meta["model"]["dtype"] = "float77"
    (bad_ckpt / META_FILE).write_text(json.dumps(meta))
    soundfile.write(root / "one.wav", np.zeros(16000, np.float32), 16000)
    (root / "items.jsonl").write_text(
        '{"id": "first", "task": "text", "generated": "file.txt", "midi": "a.mid", "text": "a cello"}\n'
        '{"id": "second", "task": "text", "generated": "gone.wav", "midi": "a.mid", "text": "a cello"}\n')
    for name, shards in (("no_sha", [{"shard": "train/s.array_record", "split": "train", "bytes": 1, "records": 1}]),
                         ("escapes", [{"shard": "../s.array_record", "split": "train", "bytes": 1, "records": 1,
                                       "sha256": "0"}]),
                         ("null_entry", [None])):  # prep outputs whose manifest.json lost a shard's fields
        (root / name).mkdir()
        (root / name / "manifest.json").write_text(json.dumps({"shards": shards, "records": {"train": 1}}))
    (root / "cook.jsonl").write_text('{"id": "first", "task": "cook", "generated": "one.wav", "midi": "a.mid"}\n')
    (root / "ok.jsonl").write_text('{"id": "first", "task": "text", "generated": "one.wav", "midi": "a.mid", "text": "a"}\n')
    plan = str(root / "plan")
    assert cli.main(["sweep", "plan", "--config", "configs/family.py:base=tiny", "--depths", "1,2",
                     "--budgets", "1e11", "--workdir", str(root / "runs"), "--out", plan, "--min-steps", "1",
                     f"--config.data.paths={root / 'folder'}"]) == 0
    torch.save({"weight": torch.zeros(3)}, root / "other.pt")  # a PyTorch file of another model
    st = root / "st"  # a safetensors checkpoint whose config.json says metadata 5
    assert cli.main(["convert", "--to", "safetensors", ckpt, str(st)]) == 0
    config = json.loads((st / "config.json").read_text())
    (st / "config.json").write_text(json.dumps({**config, "metadata": 5}))
    shards = root / "shards"  # real records (20-60 frames of 4 codebooks of 64: the tiny model's)
    shards.mkdir()
    _write_shards(str(shards), num_shards=1, per_shard=4, frames=(20, 60), codebook_size=64, codebooks=4)
    cut_ckpt = root / "cut_ckpt"  # a checkpoint whose parameter files were cut short
    shutil.copytree(ckpt, cut_ckpt)
    data = min((cut_ckpt / "params" / "ocdbt.process_0" / "d").iterdir())
    data.write_bytes(data.read_bytes()[:10])
    configs = tmp_path_factory.mktemp("configs")  # user config files (Python may cache their bytecode beside them)
    (configs / "syntax.py").write_text("def get_config(arg):\n    return 1 +\n")
    (configs / "raises.py").write_text("def get_config(arg):\n    return {}['model']\n")
    (configs / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (configs / "imports.py").write_text("import no_such_module\n")
    (configs / "number.py").write_text("def get_config(arg):\n    return 5\n")
    (configs / "no_model.py").write_text("import ml_collections\n\n\ndef get_config(arg):\n"
                                         "    return ml_collections.ConfigDict({'data': {}})\n")
    return {"shards": str(shards), "cut_ckpt": str(cut_ckpt), "configs": str(configs), "ckpt": ckpt, "midi": str(root / "a.mid"), "text_midi": str(root / "text.mid"), "emb": str(root / "e.npy"),
            "bad_emb": str(root / "bad_e.npy"), "folder": str(root / "folder"), "file": str(root / "file.txt"),
            "clap_pt": str(root / "clap.pt"), "workdir": str(root / "workdir"), "items": str(root / "items.jsonl"),
            "items_ok": str(root / "ok.jsonl"), "bad_ckpt": str(bad_ckpt),
            "plan": plan, "inputs": str(root)}


SYN = ["synthesize", "--checkpoint", "{ckpt}", "--midi", "{midi}", "--timbre-embedding", "{emb}",
       "--tokens-out", "{tmp}/codes.npy"]
EXPORT = ["export", "--checkpoint", "{ckpt}", "{tmp}/export"]
INFER = ["inference-checkpoint", "--config", "tiny", "{workdir}", "{tmp}/model"]
PLAN = ["sweep", "plan", "--budgets", "1e11", "--workdir", "{tmp}/runs", "--out", "{tmp}/plan"]
TRAIN = ["train", "--config", "tiny", "--workdir", "{tmp}/run"]
DATA = "--config.data.paths={folder}"

# (id, argv, what stderr must name, files and folders the case makes in {tmp} first)
CASES = [
    # init
    ("init-heads-do-not-divide-width", ["init", "--config", "tiny", "--set", "model.num_heads=5", "{tmp}/m"],
     "model.num_heads=5", []),
    ("init-set-without-equals", ["init", "--config", "tiny", "--set", "model.num_layers", "{tmp}/m"], "--set model.num_layers", []),
    ("init-negative-layers", ["init", "--config", "tiny", "--set", "model.num_layers=-1", "{tmp}/m"], "model.num_layers=-1", []),
    ("init-out-is-a-file", ["init", "--config", "tiny", "{tmp}/m"], "is a file", ["file:m"]),
    ("init-out-exists", ["init", "--config", "tiny", "{tmp}/m"], "pass --overwrite", [f"file:m/{META_FILE}"]),
    ("init-overwrite-refuses-a-foreign-folder", ["init", "--config", "tiny", "--overwrite", "{tmp}/m"],
     "not replacing it", ["file:m/notes.txt"]),
    ("init-no-such-config", ["init", "--config", "no_such_config", "{tmp}/m"], "no_such_config", []),
    ("init-unknown-config-field", ["init", "--config", "tiny", "--config.model.no_such=1", "{tmp}/m"],
     "--config.model.no_such", []),
    ("init-unknown-dtype", ["init", "--config", "tiny", "--set", "model.dtype=float77", "{tmp}/m"],
     "model.dtype='float77': one of float32, bfloat16, float16", []),
    ("init-integer-param-dtype", ["init", "--config", "tiny", "--set", "model.param_dtype=int8", "{tmp}/m"],
     "model.param_dtype='int8'", []),
    ("init-negative-layer-norm-eps", ["init", "--config", "tiny", "--set", "model.layer_norm_eps=-1", "{tmp}/m"],
     "model.layer_norm_eps=-1", []),
    ("init-config-file-does-not-parse", ["init", "--config", "{configs}/syntax.py", "{tmp}/m"],
     "syntax.py:2: the config file fails: SyntaxError", []),
    ("init-config-file-raises", ["init", "--config", "{configs}/raises.py", "{tmp}/m"],
     "raises.py:2: the config file fails: KeyError: 'model'", []),
    ("init-config-file-imports-a-missing-module", ["init", "--config", "{configs}/imports.py", "{tmp}/m"],
     "imports.py:1: the config file fails: ModuleNotFoundError", []),
    ("init-config-file-gives-no-configdict", ["init", "--config", "{configs}/number.py", "{tmp}/m"],
     "number.py: get_config(None) returned int", []),
    ("init-empty-compile-cache", ["--compile-cache", "", "init", "--config", "tiny", "{tmp}/m"],
     "--compile-cache '': give a folder, or 'off'", []),
    ("init-config-file-is-not-python", ["init", "--config", "{tmp}/c.json", "{tmp}/m"],
     "c.json: not a Python file", ["file:c.json"]),
    ("init-config-file-without-a-model", ["init", "--config", "{configs}/no_model.py", "{tmp}/m"],
     "no_model.py: get_config() gives no model, codec", []),
    ("init-override-of-a-group", ["init", "--config", "tiny", "--config.model=3", "{tmp}/m"],
     "--config.model=3: model is a group of fields", []),
    ("init-fraction-for-an-integer", ["init", "--config", "tiny", "--config.model.num_layers=2.7", "{tmp}/m"],
     "--config.model.num_layers=2.7: not a value of type int", []),
    ("init-set-error-names-set", ["init", "--config", "tiny", "--set", "model.dropout=abc", "{tmp}/m"],
     "--set model.dropout=abc: not a value of type float", []),
    ("init-seed-not-an-int", ["init", "--config", "tiny", "--seed", "x", "{tmp}/m"], "argument --seed", []),
    # terabytes of parameters: it allocated for minutes, then paged or was killed
    ("init-model-larger-than-memory", ["init", "--config", "tiny", "--set", "model.d_model=262144", "{tmp}/m"],
     "--config.model: 1,650.2B parameters (2 x 262144) need 6,600.8 GB to initialise; this host has", []),
    # train
    ("train-damaged-shard-leaves-no-workdir", [*TRAIN, "--config.data.paths={tmp}/data/train"],
     "not a readable ArrayRecord shard", ["file:data/train/shard-00000-of-00001.array_record"]),
    ("train-steps-not-a-number", [*TRAIN, DATA, "--config.train.steps=abc"], "--config.train.steps=abc", []),
    ("train-without-data", TRAIN, "--config.data.paths", []),
    ("train-data-path-missing", [*TRAIN, "--config.data.paths={tmp}/nothing"], "nothing", []),
    ("train-zero-steps", [*TRAIN, DATA, "--config.train.steps=0"], "--config.train.steps=0", []),
    ("train-negative-learning-rate", [*TRAIN, DATA, "--config.optim.peak_lr=-1"], "--config.optim.peak_lr=-1.0: must be", []),
    ("train-b2-above-one", [*TRAIN, DATA, "--config.optim.b2=1.5"], "--config.optim.b2=1.5: must be a number >= 0", []),
    ("train-negative-workers", [*TRAIN, DATA, "--config.data.worker_count=-1"], "--config.data.worker_count=-1", []),
    ("train-model-larger-than-memory", [*TRAIN, DATA, "--config.model.d_model=262144"],
     "GB to train (parameters, gradients and two Adam moments); this host has", []),
    ("train-seq-len-over-max-len", [*TRAIN, DATA, "--config.data.seq_len=4096"], "--config.data.seq_len", []),
    ("train-workdir-is-a-file", [*TRAIN, DATA], "--workdir", ["file:run"]),
    # a prep output's root: the recursive search took its valid and test shards into training
    ("train-data-is-a-prep-output", [*TRAIN, "--config.data.paths={tmp}/data"], "a prep output, whose folders hold its",
     ["file:data/manifest.json", "file:data/train/shard-00000-of-00001.array_record"]),
    # Orbax waited 5 minutes on a checkpoints/ it could not make, after compiling and a first step
    ("train-workdir-checkpoints-is-a-file", [*TRAIN, DATA], "run: checkpoints is a file", ["file:run/checkpoints"]),
    ("train-workdir-metrics-is-a-folder", [*TRAIN, DATA], "run: metrics.jsonl is a folder", ["dir:run/metrics.jsonl"]),
    ("train-mesh-of-other-devices", [*TRAIN, DATA, "--config.mesh.data=3"], "--config.mesh", []),
    ("train-batch-does-not-split-over-the-mesh", [*TRAIN, DATA, "--config.data.global_batch=12"],
     "--config.data.global_batch=12", []),
    ("train-batch-does-not-split-into-micro-batches", [*TRAIN, DATA, "--config.data.global_batch=8",
                                                       "--config.train.grad_accum=3"], "train.grad_accum (3)", []),
    # found from the first record and the checkpoint's file sizes, before the run makes its --workdir
    ("train-record-longer-than-seq-len", [*TRAIN, "--config.data.paths={shards}", "--config.data.seq_len=16"],
     "positions exceed seq_len 16 (data.seq_len)", []),
    ("train-init-from-a-cut-checkpoint", [*TRAIN, "--config.data.paths={shards}", "--init-from", "{cut_ckpt}"],
     "--init-from {cut_ckpt}: damaged checkpoint", []),
    ("train-init-from-not-a-checkpoint", [*TRAIN, DATA, "--init-from", "{folder}"], "folder", []),
    ("train-init-from-another-model", [*TRAIN, DATA, "--config.model.num_layers=3", "--init-from", "{ckpt}"],
     "its model differs from the run's: model.num_layers is 2 there, 3 in the run's config", []),
    # compile-step
    ("compile-step-zero-batch", ["compile-step", "--config", "tiny", "--config.data.global_batch=0"],
     "--config.data.global_batch=0", []),
    ("compile-step-batch-does-not-split", ["compile-step", "--config", "tiny", "--config.mesh.data=8",
                                           "--config.data.global_batch=12"], "--config.data.global_batch=12", []),
    ("compile-step-mesh-of-other-devices", ["compile-step", "--config", "tiny", "--config.mesh.data=3"],
     "--config.mesh", []),
    ("compile-step-topology-without-libtpu", ["compile-step", "--config", "tiny", "--topology", "v5e:2x2"],
     "--topology v5e:2x2", []),
    # convert
    ("convert-official-of-another-shape", ["convert", "--to", "official", "{ckpt}", "{tmp}/o.pt"], "--force", []),
    ("convert-official-onto-a-folder", ["convert", "--to", "official", "--force", "{ckpt}", "{tmp}/o.pt"],
     "is a directory", ["dir:o.pt"]),
    ("convert-official-onto-a-file", ["convert", "--to", "official", "--force", "{ckpt}", "{tmp}/o.pt"],
     "pass --overwrite", ["file:o.pt"]),
    ("convert-from-missing-pt", ["convert", "--from", "official", "{tmp}/none.pt", "{tmp}/o"], "none.pt: no such file", []),
    ("convert-from-pt-is-a-folder", ["convert", "--from", "official", "{folder}", "{tmp}/o"], "is a directory", []),
    ("convert-from-another-models-pt", ["convert", "--from", "official", "{inputs}/other.pt", "{tmp}/o"],
     "IN.pt {inputs}/other.pt: not an official TokenSynth state dict", []),
    ("convert-from-safetensors-metadata-not-an-object", ["convert", "--from", "safetensors", "{inputs}/st", "{tmp}/o"],
     "st/config.json: metadata is 5, not an object", []),
    ("convert-safetensors-num-heads", ["convert", "--to", "safetensors", "--num-heads", "4", "{ckpt}", "{tmp}/o"],
     "--num-heads", []),
    ("convert-safetensors-onto-a-full-folder", ["convert", "--to", "safetensors", "{ckpt}", "{tmp}/o"],
     "pass --overwrite", ["file:o/other.txt"]),
    ("convert-zero-heads", ["convert", "--from", "official", "--num-heads", "0", "{file}", "{tmp}/o"],
     "argument --num-heads", []),
    ("convert-force-without-official", ["convert", "--to", "safetensors", "--force", "{ckpt}", "{tmp}/o"], "--force", []),
    ("convert-from-not-safetensors", ["convert", "--from", "safetensors", "{folder}", "{tmp}/o"], "no config.json", []),
    # convert-clap
    ("clap-zero-text-heads", ["convert-clap", "{clap_pt}", "{tmp}/clap", "--text-heads", "0"], "argument --text-heads", []),
    ("clap-text-heads-do-not-divide", ["convert-clap", "{clap_pt}", "{tmp}/clap", "--text-heads", "7"], "--text-heads 7", []),
    ("clap-out-is-a-file", ["convert-clap", "{clap_pt}", "{tmp}/clap"], "is a file", ["file:clap"]),
    ("clap-missing-original", ["convert-clap", "{tmp}/missing.pt", "{tmp}/clap"], "missing.pt: no such file", []),
    ("clap-missing-tokenizer", ["convert-clap", "{clap_pt}", "{tmp}/clap", "--tokenizer", "{tmp}/tok"], "--tokenizer", []),
    ("clap-not-a-tokenizer", ["convert-clap", "{clap_pt}", "{tmp}/clap", "--tokenizer", "{folder}"],
     "not a tokenizer directory", []),
    # inference-checkpoint
    ("infer-not-a-workdir", ["inference-checkpoint", "--config", "tiny", "{folder}", "{tmp}/model"],
     "not a training workdir", []),
    ("infer-no-such-step", [*INFER, "--step", "99"], "--step 99", []),
    ("infer-negative-step", [*INFER, "--step", "-1"], "argument --step", []),
    ("infer-out-is-a-file", INFER, "is a file", ["file:model"]),
    # export
    ("export-top-p-zero", [*EXPORT, "--top-p", "0"], "argument --top-p", []),
    ("export-top-p-above-one", [*EXPORT, "--top-p", "1.5"], "argument --top-p", []),
    ("export-top-k-negative", [*EXPORT, "--sampler", "top-k", "--top-k", "-1"], "argument --top-k", []),
    ("export-top-k-ignored", [*EXPORT, "--top-k", "5"], "--top-k 5", []),
    ("export-top-k-keeps-every-id", [*EXPORT, "--sampler", "top-k", "--top-k", "1133"], "--top-k 1133: keeps every id",
     []),
    ("synthesize-top-k-keeps-every-id", [*SYN, "--sampler", "top-k", "--top-k", "5000"], "--top-k 5000: keeps every id",
     []),
    ("export-out-is-a-file", EXPORT, "is a file", ["file:export"]),
    ("export-bad-example-midi", [*EXPORT, "--example-midi", "{text_midi}"], "text.mid", []),
    ("export-example-midi-is-a-folder", [*EXPORT, "--example-midi", "{folder}"], "is a directory", []),
    ("export-unknown-platform", [*EXPORT, "--platforms", "cpu,gpu"], "--platforms", []),
    ("export-too-few-rows", [*EXPORT, "--max-rows", "3"], "--max-rows 3", []),
    ("export-rows-past-max-len", [*EXPORT, "--max-rows", "100000"], "--max-rows 100000 is more than", []),
    ("export-timbre-without-midi", [*EXPORT, "--example-timbre", "{emb}"], "--example-timbre", []),
    # synthesize
    ("synth-top-p-above-one", [*SYN, "--top-p", "1.5"], "argument --top-p", []),
    ("synth-top-k-negative", [*SYN, "--top-k", "-1"], "argument --top-k", []),
    ("synth-top-k-ignored", [*SYN, "--top-k", "5"], "--top-k 5", []),
    ("synth-temperature-ignored-by-greedy", [*SYN, "--sampler", "greedy", "--temperature", "0.5"], "--temperature", []),
    ("synth-midi-is-a-folder", [*SYN[:4], "{folder}", *SYN[5:]], "is a directory", []),
    ("synth-midi-missing", [*SYN[:4], "{tmp}/none.mid", *SYN[5:]], "none.mid: no such file", []),
    ("synth-tokens-out-exists", SYN, "pass --overwrite", ["file:codes.npy"]),
    ("synth-mix-out-of-range", [*SYN[:5], "--timbre-audio", "{inputs}/one.wav", "--text", "a", "--mix", "2",
                                "--tokens-out", "{tmp}/codes.npy"], "argument --mix", []),
    ("synth-embedding-of-wrong-size", [*SYN[:6], "{bad_emb}", *SYN[7:]], "bad_e.npy", []),
    ("synth-guidance-without-null-timbre", [*SYN, "--guidance-scale", "2"], "--guidance-scale", []),
    ("synth-too-few-rows", [*SYN, "--max-rows", "2"], "--max-rows 2", []),
    ("synth-config-override-ignored", [*SYN, "--config.model.num_layers=3"], "--config.model.num_layers", []),
    ("synth-set-a-weight-field", [*SYN, "--set", "model.num_layers=3"], "--set model.num_layers: a checkpoint's", []),
    ("synth-set-unknown-value", [*SYN, "--set", "model.decode_attention=flash"], "model.decode_attention='flash'", []),
    ("synth-set-unknown-dtype", [*SYN, "--set", "model.dtype=float77"], "model.dtype='float77'", []),
    ("synth-checkpoint-of-a-bad-model-config", [*SYN[:2], "{bad_ckpt}", *SYN[3:]],
     "--checkpoint {bad_ckpt}/tokensynth.json: model.dtype='float77'", []),
    ("convert-checkpoint-of-a-bad-model-config", ["convert", "--to", "safetensors", "{bad_ckpt}", "{tmp}/o"],
     "CKPT_DIR {bad_ckpt}/tokensynth.json: model.dtype='float77'", []),
    ("synth-set-not-a-number", [*SYN, "--set", "model.dropout=abc"], "--set model.dropout=abc: not a value of type float", []),
    ("synth-wav-folder-is-a-file", [*SYN, "--out", "{tmp}/wavs.d"], "--out", ["file:wavs.d"]),
    # An output under a file, found before any work (the write would fail only after generating).
    ("synth-out-under-a-file", [*SYN[:-2], "--out", "{tmp}/f/x.wav"], "f is a file, not a directory", ["file:f"]),
    ("synth-tokens-out-under-a-file", [*SYN[:-1], "{tmp}/f/d/codes.npy"], "f is a file, not a directory",
     ["file:f"]),
    ("init-out-under-a-file", ["init", "--config", "tiny", "{tmp}/f/model"], "f is a file, not a directory",
     ["file:f"]),
    ("export-out-under-a-file", [*EXPORT[:-1], "{tmp}/f/export"], "f is a file, not a directory", ["file:f"]),
    ("eval-out-under-a-file", ["eval", "{items_ok}", "--clap", "none", "--out", "{tmp}/f/r"], "not a directory",
     ["file:f"]),
    ("eval-tensorboard-is-a-file", ["eval", "{items_ok}", "--clap", "none", "--out", "{tmp}"], "tensorboard",
     ["file:tensorboard"]),
    ("prep-out-under-a-file", ["prep", "--out", "{tmp}/f/data"], "f is a file, not a directory", ["file:f"]),
    ("synth-guidance-scale-nan", [*SYN, "--guidance-scale", "nan"], "argument --guidance-scale", []),
    ("synth-seed-too-big", [*SYN, "--seed", "99999999999999999999"], "argument --seed", []),
    ("init-negative-seed", ["init", "--config", "tiny", "--seed", "-1", "{tmp}/model"], "argument --seed", []),
    ("prep-negative-seed", ["prep", "--out", "{tmp}/data", "--seed", "-1"], "argument --seed", []),
    # Beam drops a flag it does not know with a warning and runs without it (here, not on Dataflow)
    ("prep-unknown-beam-flag", ["prep", "--out", "{tmp}/data", "--", "--runner=DataflowRunner", "--projet=p"],
     "Beam options (after --): unknown ['--projet=p']", []),
    ("prep-unknown-beam-runner", ["prep", "--out", "{tmp}/data", "--", "--runner=NoSuchRunner"],
     "--runner=NoSuchRunner: Unexpected pipeline runner", []),
    ("prep-pitch-table-not-a-range", ["prep", "--out", "{tmp}/data", "--table-pitches", "0"],
     "argument --table-pitches", []),
    ("synth-out-on-a-virtual-fs", [*SYN[:-2], "--out", "/proc/tokensynth-test.wav"], "cannot write in /proc", []),
    # eval
    ("eval-missing-file-of-a-later-item", ["eval", "{items}", "--clap", "none", "--out", "{tmp}/report"], "gone.wav", []),
    ("eval-zero-tolerance", ["eval", "{items}", "--onset-tolerance", "0", "--out", "{tmp}/report"],
     "argument --onset-tolerance", []),
    ("eval-report-exists", ["eval", "{items_ok}", "--clap", "none", "--out", "{tmp}"], "eval.json", ["file:eval.json"]),
    ("eval-unknown-task", ["eval", "{inputs}/cook.jsonl", "--clap", "none", "--out", "{tmp}/r"],
     "cook.jsonl:1: item 'first': task 'cook' is not one of", []),
    ("eval-no-manifest", ["eval", "{tmp}/none.jsonl", "--clap", "none"], "none.jsonl", []),
    # sweep
    ("sweep-depth-zero", [*PLAN, "--depths", "0,2"], "argument --depths", []),
    ("sweep-negative-budget", [*PLAN[:2], "--budgets=-1e12", *PLAN[4:], "--depths", "1"], "argument --budgets", []),
    ("sweep-not-a-family", [*PLAN, "--config", "configs/tiny.py", "--depths", "1,2"], "not a model family", []),
    ("sweep-one-depth-not-a-family", [*PLAN, "--config", "tiny", "--depths", "1"], "not a model family", []),
    ("sweep-zero-min-steps", [*PLAN, "--depths", "1", "--min-steps", "0"], "argument --min-steps", []),
    ("sweep-plan-out-is-a-file", [*PLAN, "--config", "configs/family.py:base=tiny", "--depths", "1"], "--out",
     ["file:plan"]),
    ("sweep-fit-level-above-one", ["sweep", "fit", "{plan}", "--level", "2", "--out", "{tmp}/fit"], "argument --level", []),
    ("sweep-fit-negative-bootstrap", ["sweep", "fit", "{plan}", "--bootstrap", "-3", "--out", "{tmp}/fit"],
     "argument --bootstrap", []),
    ("sweep-run-unknown-run", ["sweep", "run", "{plan}", "--only", "c1e11-d9"], "c1e11-d9", []),
    ("sweep-no-such-plan", ["sweep", "fit", "{tmp}/nowhere", "--out", "{tmp}/fit"], "no such plan", []),
    # prep
    ("prep-out-is-a-file", ["prep", "--out", "{tmp}/data"], "--out", ["file:data"]),
    ("prep-verify-no-such-output", ["prep", "verify", "{tmp}/data"], "data: no such directory", []),
    ("prep-verify-no-manifest", ["prep", "verify", "{tmp}/data"], "manifest", ["dir:data"]),
    ("prep-verify-manifest-is-a-folder", ["prep", "verify", "{tmp}/data"], "manifest.json: unreadable (IsADirectoryError",
     ["dir:data/manifest.json"]),
    ("prep-verify-manifest-shard-without-sha256", ["prep", "verify", "{inputs}/no_sha"],
     "no_sha/manifest.json: shards[0]: sha256 is None", []),
    ("prep-verify-manifest-shard-outside", ["prep", "verify", "{inputs}/escapes"],
     "escapes/manifest.json: shards[0]: shard '../s.array_record' is not a path inside the output", []),
    ("prep-verify-manifest-null-shard", ["prep", "verify", "{inputs}/null_entry"],
     "null_entry/manifest.json: shards[0]: None is not an object", []),
    # checkpoint verify
    ("checkpoint-verify-no-such-dir", ["checkpoint", "verify", "{tmp}/none"], "none", []),
    ("checkpoint-verify-not-a-checkpoint", ["checkpoint", "verify", "{tmp}/empty"], "empty", ["dir:empty"]),
    ("prep-missing-midi-dir", ["prep", "--out", "{tmp}/data", "--midi-dir", "{tmp}/lmd"], "--midi-dir", []),
    ("prep-programs-not-numbers", ["prep", "--out", "{tmp}/data", "--programs", "a,b"], "argument --programs", []),
    ("prep-programs-twice", ["prep", "--out", "{tmp}/data", "--programs", "0,40,0"],
     "argument --programs: '0,40,0': program 0 is listed twice", []),
    ("prep-programs-out-of-range", ["prep", "--out", "{tmp}/data", "--programs", "0,128"],
     "argument --programs: '0,128': GM programs are 0-127, not 128", []),
    ("demo-programs-out-of-range", ["demo", "--workdir", "{tmp}/demo", "--programs", "0,300"],  # was prep's usage, 28 lines
     "tokensynth demo: error: argument --programs: '0,300': GM programs are 0-127, not 300", []),
    ("prep-zero-workers", ["prep", "--out", "{tmp}/data", "--workers", "0"], "argument --workers", []),
    ("prep-nsynth-dir-without-nsynth", ["prep", "--out", "{tmp}/data", "--nsynth-dir", "{folder}"],
     "goes with --instruments nsynth", []),  # was ignored: SoundFont presets rendered instead
    ("init-config-file-exits", ["init", "--config", "{configs}/exits.py", "{tmp}/m"],
     "exits.py:2: the config file fails: SystemExit: 3", []),
    ("init-config-is-a-folder", ["init", "--config", "{folder}", "{tmp}/m"], "is a folder; a config is a .py file", []),
    ("prep-missing-soundfont", ["prep", "--out", "{tmp}/data", "--soundfont", "{tmp}/gm.sf2"], "gm.sf2", []),
    ("prep-soundfont-not-a-soundfont", ["prep", "--out", "{tmp}/data", "--soundfont", "{tmp}/gm.sf2"],
     "gm.sf2: not a SoundFont", ["file:gm.sf2"]),  # FluidSynth printed 4 lines of its own first
    ("prep-device-not-a-torch-device", ["prep", "--out", "{tmp}/data", "--device", "bogus"], "--device", []),
    ("prep-fractions-hold-out-every-preset", ["prep", "--out", "{tmp}/data", "--valid-fraction", "0.6",
                                              "--test-fraction", "0.4"], "--valid-fraction", []),
    # found inside the Beam job: printed once, without Beam's traceback, and the new --out removed
    ("prep-every-midi-file-rejected", ["prep", "--out", "{tmp}/data", "--midi-dir", "{tmp}/lmd", "--codec",
                                       "tiny-encodec", "--clap", "tiny-clap"], "segment pool", ["file:lmd/x.mid"]),
    # demo and the top level
    ("demo-zero-steps", ["demo", "--workdir", "{tmp}/demo", "--steps", "0"], "argument --steps", []),
    ("demo-workdir-is-a-file", ["demo", "--workdir", "{tmp}/demo"], "--workdir", ["file:demo"]),
    ("unknown-command", ["frobnicate"], "frobnicate", []),
]


def _make(tmp_path, entries) -> None:
    for entry in entries:
        kind, name = entry.split(":", 1)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "dir":
            path.mkdir()
        else:
            path.write_text("something the user made")


def _tree(root) -> dict:
    """Every path under root with its size and modification time."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            out[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return out


def _argv(template, inputs, tmp_path) -> list[str]:
    return [a.format(tmp=tmp_path, **inputs) for a in template]


def _assert_one_line(err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tokensynth") and ": error: " in lines[0], err
    assert expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("name, argv, expected, make", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(inputs, tmp_path, capsys, name, argv, expected, make):
    _make(tmp_path, make)
    before, shared = _tree(tmp_path), _tree(inputs["inputs"])
    capsys.readouterr()
    assert cli.main(_argv(argv, inputs, tmp_path)) == 2
    _assert_one_line(capsys.readouterr().err, expected.format(tmp=tmp_path, **inputs))
    assert _tree(tmp_path) == before  # no result, no temporary sibling, no parent folder made
    assert _tree(inputs["inputs"]) == shared


def test_the_table_covers_every_subcommand():
    assert len(CASES) >= 40
    # `prep verify OUT` is the prep-verify parser (prep itself takes Beam's options after it)
    commands = {"prep-verify" if c[1][:2] == ["prep", "verify"] else c[1][0] for c in CASES}
    assert set(cli.build_parser()._subparsers._group_actions[0].choices) <= commands


@pytest.mark.parametrize("argv, expected", [
    (["init", "--config", "tiny", "--set", "model.num_layers=-1", "{tmp}/m"], "model.num_layers=-1"),
    (["train", "--config", "tiny", "--workdir", "{tmp}/run", DATA, "--config.train.steps=abc"], "train.steps=abc"),
    (["sweep", "fit", "{plan}", "--level", "2"], "argument --level"),
    (["export", "--checkpoint", "{ckpt}", "{tmp}/export", "--example-midi", "{text_midi}"], "text.mid"),
])
def test_a_user_error_in_its_own_process_prints_no_traceback(inputs, tmp_path, argv, expected):
    done = subprocess.run([sys.executable, "-m", "tokensynth_jax.cli", *_argv(argv, inputs, tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    _assert_one_line(done.stderr, expected)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_the_interpreter_exits_ends_it_without_a_traceback(tmp_path):
    """The command has returned; JAX's and Orbax's atexit handlers run. A Ctrl-C then (sent here by
    the first handler to run) ends the process by the signal, not in 'Exception ignored' and a
    traceback from inside them."""
    script = ("import atexit, os, signal, sys, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
              "from tokensynth_jax.cli import console\n"
              "sys.argv = ['tokensynth', 'init', '--config', 'tiny', '--set', 'model.num_layers=-1', 'm']\n"
              "sys.exit(console.main())\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -signal.SIGINT, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr, done.stderr
    _assert_one_line(done.stderr, "model.num_layers=-1")


def test_convert_force_writes_another_shape_with_a_warning(inputs, tmp_path, capsys):
    out = tmp_path / "o.pt"
    assert cli.main(["convert", "--to", "official", "--force", inputs["ckpt"], str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: the official package (tokensynth 0.0.4) hard-codes" in err and "num_layers 2 (it builds 12)" in err
    assert sorted(os.listdir(tmp_path)) == ["o.pt"]  # the temporary sibling is gone
    assert cli.main(["convert", "--to", "official", "--force", "--overwrite", inputs["ckpt"], str(out)]) == 0


def test_a_packaged_config_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    """`tokensynth demo` runs in the folder holding its workdir demo/ and loads --config demo."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("tiny")
    assert cli.main(["init", "--config", "tiny", str(tmp_path / "m")]) == 0


def test_heads_that_do_not_divide_the_width_name_the_flag(inputs, tmp_path, capsys):
    assert cli.main(["convert", "--to", "official", "--force", inputs["ckpt"], str(tmp_path / "o.pt")]) == 0
    capsys.readouterr()
    assert cli.main(["convert", "--from", "official", "--num-heads", "7", str(tmp_path / "o.pt"), str(tmp_path / "m")]) == 2
    _assert_one_line(capsys.readouterr().err, "--num-heads 7: model.num_heads=7 does not divide model.d_model=64")
    assert sorted(os.listdir(tmp_path)) == ["o.pt"]


def test_overwrite_replaces_a_previous_result_whole(inputs, tmp_path):
    out = tmp_path / "st"
    assert cli.main(["convert", "--to", "safetensors", inputs["ckpt"], str(out)]) == 0
    (out / "stale.txt").write_text("left from before")
    assert cli.main(["convert", "--to", "safetensors", inputs["ckpt"], str(out)]) == 2
    assert cli.main(["convert", "--to", "safetensors", "--overwrite", inputs["ckpt"], str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # the old folder went whole
    assert sorted(os.listdir(tmp_path)) == ["st"]


def test_overwrite_never_replaces_a_pipe_and_writes_through_a_link(inputs, tmp_path, capsys):
    """--overwrite renamed the result over whatever had the name: as root, `--tokens-out /dev/null`
    replaced the device node with a regular file; and a symbolic link became a file of its own."""
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    argv = [a if a != str(tmp_path / "codes.npy") else str(fifo) for a in _argv(SYN, inputs, tmp_path)]
    assert cli.main([*argv, "--overwrite"]) == 2
    _assert_one_line(capsys.readouterr().err, "fifo.npy: not a regular file (a device, pipe or socket)")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    target, link = tmp_path / "real" / "codes.npy", tmp_path / "link.npy"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link.symlink_to(target)
    argv = [a if a != str(fifo) else str(link) for a in argv]
    assert cli.main([*argv, "--overwrite"]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert np.load(link).shape == np.load(target).shape and target.read_bytes() != b"old"
    assert sorted(os.listdir(target.parent)) == ["codes.npy"]  # no temporary left beside it


def test_a_checkpoint_that_records_no_codec_takes_codec_for_codes_and_audio(inputs, tmp_path, capsys):
    """Its error said "pass --codec NAME", which then was ignored (windows are planned in its frames)
    or refused with codes only."""
    ckpt = tmp_path / "nocodec"
    shutil.copytree(inputs["ckpt"], ckpt)
    meta = json.loads((ckpt / META_FILE).read_text())
    del meta["metadata"]["codec"]
    (ckpt / META_FILE).write_text(json.dumps(meta))
    argv = [a.replace(inputs["ckpt"], str(ckpt)) for a in _argv(SYN, inputs, tmp_path)]
    assert cli.main(argv) == 2
    _assert_one_line(capsys.readouterr().err, "the checkpoint records no codec; pass --codec NAME")
    assert cli.main([*argv, "--codec", "tiny-encodec"]) == 0
    assert cli.main([*argv, "--codec", "tiny-encodec", "--out", str(tmp_path / "a.wav"), "--overwrite"]) == 0
    assert soundfile.info(str(tmp_path / "a.wav")).samplerate == 32000


def test_output_markers_are_the_writers_file_names():
    from tokensynth_jax.inference import export
    from tokensynth_jax.interop import safetensors_format

    assert model_commands.EXPORT_MARKER == export.META_FILE
    assert model_commands.SAFETENSORS_MARKER == safetensors_format.CONFIG_FILE
    assert set(model_commands.PLATFORMS) >= set(export.PLATFORMS)


def test_a_damaged_step_is_one_line_on_the_real_commands_stderr(tmp_path):
    """In a process of its own (where Orbax's absl warnings reach stderr, unlike under capsys)."""
    os.makedirs(tmp_path / "run" / "checkpoints" / "3")  # a step folder without Orbax's metadata
    out = subprocess.run([sys.executable, "-m", "tokensynth_jax.cli", "inference-checkpoint", "--config", "tiny",
                          str(tmp_path / "run"), str(tmp_path / "model")], capture_output=True, text=True, check=False)
    assert out.returncode == 2, out.stderr
    _assert_one_line(out.stderr, "step 3 is damaged: _CHECKPOINT_METADATA is missing")
    assert not os.path.exists(tmp_path / "model")


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_new_workdir(tmp_path, capsys):
    """A user error found after the run made its --workdir (here a loss that diverges at step 3,
    before the first checkpoint) removes that new workdir again: no step was saved. (A record too
    long for data.seq_len found mid-run no longer fails the run: it is skipped and counted.)"""
    from array_record.python.array_record_module import ArrayRecordWriter

    from tokensynth_jax.tokens import records

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    writer = ArrayRecordWriter(str(data / "shard-00000.array_record"), "group_size:1")
    for i in range(2):
        writer.write(records.PairRecord(f"p{i}", "train", "inst", rng.integers(1, 1133, 4), rng.integers(0, 64, (10, 4)),
                                        rng.normal(size=512), {}, "clap", {"chain": []}, {"midi": "gen", "start": 0.0},
                                        {"midi": "gen", "start": 5.0}).to_bytes())
    writer.close()
    workdir = tmp_path / "run"
    capsys.readouterr()
    assert cli.main(["train", "--config", "tiny", "--workdir", str(workdir), f"--config.data.paths={data}",
                     "--config.train.steps=6", "--config.train.log_every=1", "--config.optim.peak_lr=1e30",
                     "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tokensynth train: error: step ") and "training diverged" in err
    assert not workdir.exists()
