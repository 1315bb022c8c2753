"""Data layer: benchmark and custom data sets, few-shot / base-new protocols, transforms and loaders.

Typical use::

    splits = get_dataset("caltech101", root="/data")      # validated CoOp split
    splits = subsample(fewshot(splits, shots=16, seed=1), "base")
    loader = build_loader(splits.train, build_transform(train=True), 32, shuffle=True, seed=1)

This package never imports model code; the model layer passes image size / mean / std.
"""

from vlprompt.data.augment import MultiView, RandAugment, randaugment_transform
from vlprompt.data.custom import load_custom
from vlprompt.data.datasets import get_dataset
from vlprompt.data.demo import ensure_demo
from vlprompt.data.descriptions import ClassDescriptions, read_descriptions
from vlprompt.data.fewshot import fewshot, sample_per_class
from vlprompt.data.image_cache import CachedImageDataset as CachedEvalDataset
from vlprompt.data.images import load_rgb, set_max_image_pixels
from vlprompt.data.loaders import ImageDataset, build_loader, cached_eval_dataset
from vlprompt.data.registry import (
    BENCHMARKS,
    CROSS_DATASET_SOURCE,
    CROSS_DATASET_TARGETS,
    DG_SOURCE,
    DG_TARGETS,
    FEWSHOT_K,
    SPECS,
    DatasetSpec,
    canonical_name,
    get_spec,
    list_datasets,
    training_preprocess,
)
from vlprompt.data.splits import DatasetSplits, Datum, read_split, split_hash, write_split
from vlprompt.data.subsample import SUBSAMPLES, base_new_labels, subsample
from vlprompt.data.transforms import CLIP_MEAN, CLIP_STD, build_transform
from vlprompt.data.verify import VerifyReport, verify_dataset

__all__ = [
    "BENCHMARKS",
    "CLIP_MEAN",
    "CLIP_STD",
    "CROSS_DATASET_SOURCE",
    "CROSS_DATASET_TARGETS",
    "DG_SOURCE",
    "DG_TARGETS",
    "FEWSHOT_K",
    "SPECS",
    "SUBSAMPLES",
    "CachedEvalDataset",
    "ClassDescriptions",
    "DatasetSpec",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "MultiView",
    "RandAugment",
    "VerifyReport",
    "base_new_labels",
    "build_loader",
    "build_transform",
    "cached_eval_dataset",
    "canonical_name",
    "ensure_demo",
    "fewshot",
    "get_dataset",
    "get_spec",
    "list_datasets",
    "load_custom",
    "load_rgb",
    "randaugment_transform",
    "read_descriptions",
    "read_split",
    "sample_per_class",
    "set_max_image_pixels",
    "split_hash",
    "subsample",
    "training_preprocess",
    "verify_dataset",
    "write_split",
]
