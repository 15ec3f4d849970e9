"""Data: readers (paths -> labels and mask paths), exact transforms, parallel decoding, the
``divide_num`` split and the synthetic demo set."""
# The built-in readers: importing them runs their @register_reader decorators.
from . import btad, folder, mvtec, mvtec3d, synthetic, visa  # noqa: F401
from .base import (
    IMAGE_EXTENSIONS,
    MASK_RULES,
    NORMAL_TYPES,
    UNLABELED,
    Category,
    DatasetError,
    Sample,
    UnreadableImageError,
    check_category_name,
    is_normal_type,
)
from .divide import divide_indices
from .loading import (
    LoadedImages,
    check_mask_sizes,
    default_num_workers,
    iter_image_batches,
    load_category_masks,
    load_images,
    load_images_checked,
    load_masks,
    mask_size_mismatches,
)
from .registry import READERS, Reader, available, get_reader, list_categories, load_category, register_reader
from .synthetic import DefectParams, generate_synthetic
from .transforms import NonFiniteImageError, binarise_mask, load_mask, preprocess_image, to_rgb, upright

__all__ = [
    "IMAGE_EXTENSIONS", "MASK_RULES", "NORMAL_TYPES", "UNLABELED", "Category", "DatasetError", "Sample",
    "UnreadableImageError",
    "check_category_name", "is_normal_type", "divide_indices", "LoadedImages", "check_mask_sizes",
    "default_num_workers", "iter_image_batches", "load_category_masks", "load_images", "load_images_checked",
    "load_masks", "mask_size_mismatches",
    "READERS", "Reader", "available", "get_reader", "list_categories", "load_category", "register_reader",
    "DefectParams", "generate_synthetic", "NonFiniteImageError", "binarise_mask", "load_mask", "preprocess_image",
    "to_rgb", "upright",
]
