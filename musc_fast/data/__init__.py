"""Data: readers (paths -> labels and mask paths), exact transforms, parallel decoding, the
``divide_num`` split and the synthetic demo set."""
from .base import (
    IMAGE_EXTENSIONS,
    MASK_RULES,
    UNLABELED,
    Category,
    DatasetError,
    Sample,
    UnreadableImageError,
    check_category_name,
)
from .divide import divide_indices
from .loading import (
    LoadedImages,
    default_num_workers,
    iter_image_batches,
    load_images,
    load_images_checked,
    load_masks,
)
from .registry import READERS, Reader, available, get_reader, list_categories, load_category, register_reader
from .synthetic import DefectParams, generate_synthetic
from .transforms import binarise_mask, load_mask, preprocess_image, to_rgb

__all__ = [
    "IMAGE_EXTENSIONS", "MASK_RULES", "UNLABELED", "Category", "DatasetError", "Sample", "UnreadableImageError",
    "check_category_name", "divide_indices", "LoadedImages", "default_num_workers", "iter_image_batches",
    "load_images", "load_images_checked", "load_masks",
    "READERS", "Reader", "available", "get_reader", "list_categories", "load_category", "register_reader",
    "DefectParams", "generate_synthetic", "binarise_mask", "load_mask", "preprocess_image", "to_rgb",
]
