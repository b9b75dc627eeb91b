# Worker image for `tokensynth prep` on Dataflow / Flink / Spark portable runners.
#   docker build -f launch/prep.Dockerfile -t IMAGE . && docker push IMAGE
# The Beam SDK image must match the apache-beam version the job is launched with.
FROM apache/beam_python3.11_sdk:2.77.0

# FluidSynth for SoundFont instruments (pyfluidsynth loads libfluidsynth at import).
RUN apt-get update && apt-get install -y --no-install-recommends libfluidsynth3 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tokensynth
COPY . .
# torch first, pinned (the CPU build for CPU workers, a CUDA build for GPU workers), then the rest.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir '.[prep]' pyfluidsynth

# Bake the pretrained encoders in, so a thousand workers do not each ask the hub.
RUN python -c "from transformers import ClapModel, ClapFeatureExtractor, EncodecModel; \
EncodecModel.from_pretrained('facebook/encodec_32khz'); \
ClapModel.from_pretrained('laion/larger_clap_music'); ClapFeatureExtractor.from_pretrained('laion/larger_clap_music')"
