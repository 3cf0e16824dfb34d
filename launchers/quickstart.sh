#!/usr/bin/env bash
# The main job on one machine: set up the venv, generate the demo WebDataset shards (images,
# captions, sounds, questions), train a SentencePiece tokenizer on their text, train the whole
# tiny multi-modal model (image, text and audio encoders, fusion, caption decoder, every
# objective) with 4 ranks (tensor parallel 2 x data parallel 2, ZeRO-3) through the deepspeed
# launcher, and evaluate it on the held-out shards: retrieval R@1 for each modality pair, caption
# BLEU-4 and VQA accuracy. Re-running it resumes from (or re-evaluates) the last checkpoint.
#   RUN_DIR      where checkpoints and TensorBoard logs go (default runs/quickstart)
#   NUM_RANKS    processes on this machine (default 4; GPUs when there are any)
#   MASTER_PORT  rendezvous port on 127.0.0.1 (default 29500)
# Extra arguments are config overrides, e.g. `bash launchers/quickstart.sh train_steps=100`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/setup_env.sh
RUN_DIR=${RUN_DIR:-runs/quickstart}
NUM_RANKS=${NUM_RANKS:-4}

python tools/make_demo_data.py --out demo_data
python tools/train_tokenizer.py --shards 'demo_data/train/shard-*.tar' --out demo_data/tokenizer.model

deepspeed --num_gpus "$NUM_RANKS" --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
  launchers/pretrain.py --config tiny --ds-config ds_configs/zero3.json --resume auto \
  parallel.tensor_parallel=2 \
  checkpoint.dir="$RUN_DIR/checkpoints" \
  logging.tensorboard_dir="$RUN_DIR/tensorboard" \
  "$@"
