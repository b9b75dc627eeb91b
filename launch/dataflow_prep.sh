#!/usr/bin/env bash
# The paper's data set on Dataflow: the 953 NSynth training instruments x 10,000 five-second
# Lakh MIDI segments = 9.53M pairs (plus the NSynth valid/test instruments, held out), EnCodec
# 32 kHz codes and LAION music CLAP embeddings, ~27 GB of ArrayRecord shards.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=gs://my-bucket \
#   IMAGE=us-docker.pkg.dev/my-project/tokensynth/prep:latest launch/dataflow_prep.sh [more prep flags]
#
# Before: the raw NSynth release in $BUCKET/nsynth/nsynth-{train,valid,test}/, Lakh MIDI (lmd_full)
# in $BUCKET/lmd_full/, and a worker image built from launch/prep.Dockerfile (FluidSynth, this
# package and the pretrained encoders baked in). Cost (docs/benchmarks.md): ~0.9 core-seconds a
# pair on CPU, almost all of it CLAP and the codec, so ~2,300 core-hours: 64 n2-standard-16
# workers take ~2.5 h. On GPU workers, replace the worker lines by
#   --machine_type=g2-standard-8 \
#   --dataflow_service_options="worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
# and pass `--device cuda --encode-batch-size 32` as prep flags.
# Re-running the same command after a failure resumes: finished shards are kept, the rest redone.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}" "${IMAGE:?set IMAGE}"

exec python -m tokensynth_jax.cli prep \
  --out "${BUCKET}/tokensynth-data/nsynth-lmd-encodec32k-v1" \
  --midi-dir "${BUCKET}/lmd_full" \
  --instruments nsynth --nsynth-dir "${BUCKET}/nsynth" \
  --num-segments 10000 --pairs-per-instrument 10000 --max-notes 128 \
  --codec facebook/encodec_32khz --clap laion/larger_clap_music \
  --encode-batch-size 1 --torch-threads 1 --chunk-size 2500 --records-per-shard 20000 \
  "$@" \
  -- \
  --runner=DataflowRunner --project="${PROJECT}" --region="${REGION}" \
  --job_name="tokensynth-prep-$(date +%Y%m%d-%H%M%S)" \
  --temp_location="${BUCKET}/tmp" --staging_location="${BUCKET}/staging" \
  --sdk_container_image="${IMAGE}" --sdk_location=container \
  --experiments=use_runner_v2 \
  --machine_type=n2-standard-16 --disk_size_gb=50 \
  --num_workers=16 --max_num_workers=64 --autoscaling_algorithm=THROUGHPUT_BASED
