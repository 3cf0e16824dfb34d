"""Data for megamm: shard specifications and reading, sample decoding (images, audio, captions,
questions), the training streams and loaders, the tokenizer and the synthetic demo dataset.

This package depends only on ``megamm.config``, ``megamm.fileio``, the standard library, numpy,
torch, PIL, soundfile, webdataset (its writer and braceexpand) and sentencepiece.
"""

from megamm.data.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioError,
    WavError,
    decode_audio,
    decode_wav,
    encode_wav,
    pcm_to_float,
)
from megamm.data.demo import (
    ANSWER_VOCAB,
    COLOURS,
    MAX_EVAL_SAMPLES,
    POSITIONS,
    SHAPES,
    SIZES,
    write_demo_dataset,
)
from megamm.data.images import IMAGE_EXTENSIONS, ImageError, decode_image, images_to_tensor, square_rgb
from megamm.data.pipeline import (
    AUDIO_PAD_MULTIPLE,
    MAX_AUDIO_SAMPLES,
    ROW_FIELDS,
    Batch,
    DataPosition,
    bad_summary,
    build_sources,
    build_train_loader,
    check_shard_count,
    data_stream_settings,
    iter_eval_batches,
    keys_digest,
    next_epochs,
    placeholder_batch,
    stream_count,
)
from megamm.data.processor import PROCESSOR_FILE, TOKENIZER_FILE, Processor
from megamm.data.samples import (
    BAD_REASONS,
    EXTRAS,
    NO_ANSWER,
    PAIRS,
    Bad,
    Row,
    SampleDecoder,
    iter_captions,
    sample_texts,
)
from megamm.data.shards import (
    SIZES_FILE,
    ShardError,
    ShardReader,
    brace_expand,
    check_shards_readable,
    expand_shards,
    iter_shard_samples,
    known_sample_count,
    shard_sizes,
)
from megamm.data.streams import Source
from megamm.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_tokenizer
from megamm.fileio import atomic_output

__all__ = [
    "ANSWER_VOCAB", "AUDIO_EXTENSIONS", "AUDIO_PAD_MULTIPLE", "BAD_REASONS", "BOS_ID", "COLOURS", "EOS_ID", "EXTRAS",
    "IMAGE_EXTENSIONS", "MAX_AUDIO_SAMPLES", "MAX_EVAL_SAMPLES", "NO_ANSWER", "PAD_ID", "PAIRS", "POSITIONS",
    "PROCESSOR_FILE", "ROW_FIELDS", "SAMPLE_RATE", "SHAPES", "SIZES", "SIZES_FILE", "TOKENIZER_FILE", "UNK_ID",
    "AudioError", "Bad", "Batch", "DataPosition", "ImageError", "Processor", "Row", "SampleDecoder", "ShardError",
    "ShardReader", "Source", "Tokenizer", "WavError", "atomic_output", "bad_summary", "brace_expand",
    "build_sources", "build_train_loader", "check_shard_count", "check_shards_readable", "data_stream_settings",
    "decode_audio", "decode_image", "decode_wav", "encode_wav", "expand_shards", "images_to_tensor",
    "iter_captions", "iter_eval_batches", "iter_shard_samples", "keys_digest", "known_sample_count",
    "next_epochs", "pcm_to_float", "placeholder_batch", "sample_texts", "shard_sizes", "square_rgb",
    "stream_count", "train_tokenizer", "write_demo_dataset",
]  # fmt: skip
