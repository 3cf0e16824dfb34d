"""Data for megamm: shard discovery, tokenizer, WAV audio, the synthetic demo dataset and the loaders.

This package depends only on ``megamm.config``, ``megamm.fileio``, the standard
library, numpy, torch, PIL, webdataset (and its braceexpand) and sentencepiece.
"""

from megamm.data.audio import SAMPLE_RATE, WavError, decode_wav, encode_wav, pcm_to_float
from megamm.data.demo import (
    ANSWER_VOCAB,
    COLOURS,
    MAX_EVAL_SAMPLES,
    POSITIONS,
    SHAPES,
    SIZES,
    iter_captions,
    write_demo_dataset,
)
from megamm.data.pipeline import (
    AUDIO_PAD_MULTIPLE,
    EXTRAS,
    IMAGE_EXTENSIONS,
    MAX_AUDIO_SAMPLES,
    NO_ANSWER,
    ROW_FIELDS,
    Batch,
    DataPosition,
    build_train_loader,
    check_shard_count,
    data_stream_settings,
    decode_image,
    images_to_tensor,
    iter_eval_batches,
    placeholder_batch,
    square_rgb,
)
from megamm.data.processor import PROCESSOR_FILE, TOKENIZER_FILE, Processor
from megamm.data.shards import (
    SIZES_FILE,
    brace_expand,
    check_shards_readable,
    expand_shards,
    iter_tar_samples,
    known_sample_count,
)
from megamm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from megamm.fileio import atomic_output

__all__ = [
    "ANSWER_VOCAB",
    "AUDIO_PAD_MULTIPLE",
    "EXTRAS",
    "BOS_ID",
    "COLOURS",
    "EOS_ID",
    "IMAGE_EXTENSIONS",
    "MAX_AUDIO_SAMPLES",
    "MAX_EVAL_SAMPLES",
    "NO_ANSWER",
    "PAD_ID",
    "POSITIONS",
    "PROCESSOR_FILE",
    "ROW_FIELDS",
    "SAMPLE_RATE",
    "SHAPES",
    "SIZES",
    "SIZES_FILE",
    "TOKENIZER_FILE",
    "UNK_ID",
    "Batch",
    "DataPosition",
    "Processor",
    "Tokenizer",
    "WavError",
    "atomic_output",
    "brace_expand",
    "build_train_loader",
    "check_shard_count",
    "check_shards_readable",
    "data_stream_settings",
    "decode_image",
    "decode_wav",
    "encode_wav",
    "expand_shards",
    "images_to_tensor",
    "iter_captions",
    "iter_eval_batches",
    "iter_tar_samples",
    "known_sample_count",
    "pcm_to_float",
    "placeholder_batch",
    "square_rgb",
    "train_tokenizer",
    "write_demo_dataset",
]
