"""tskd.data: dataset format and validation, demo data, pre-training corpus, augmentation.

Core layer: numpy, PIL, scipy, torch and (lazily) MONAI; no Ray. See DEVELOPERS.md for the
tensor contracts (images float32 (B, 3, H, W) in 0..255, masks int64 (B, H, W)).
"""

from tskd.data.augment import STRENGTHS, augment_copies, build_augment
from tskd.data.corpus import CORPUS_LABELS, ProceduralCorpus, make_corpus_item
from tskd.data.dataset import SegmentationDataset, load_arrays, load_fov_arrays
from tskd.data.demo import DEMO_LABELS, make_demo_case, write_demo_dataset
from tskd.data.format import (IMAGE_EXTENSIONS, DatasetError, DatasetInfo, Splits,
                              load_dataset_info, make_splits, read_case, read_fov, read_image,
                              read_mask, validate_dataset, write_dataset_json)

__all__ = [
    "CORPUS_LABELS", "DEMO_LABELS", "IMAGE_EXTENSIONS", "STRENGTHS", "DatasetError",
    "DatasetInfo", "ProceduralCorpus", "SegmentationDataset", "Splits", "augment_copies",
    "build_augment", "load_arrays", "load_dataset_info", "load_fov_arrays", "make_corpus_item",
    "make_demo_case", "make_splits", "read_case", "read_fov", "read_image", "read_mask",
    "validate_dataset", "write_dataset_json", "write_demo_dataset",
]
