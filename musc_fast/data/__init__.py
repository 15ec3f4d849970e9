"""Data: readers (paths -> labels and mask paths), exact transforms, parallel decoding, the
``divide_num`` split and the synthetic demo set."""
from .base import IMAGE_EXTENSIONS, MASK_RULES, UNLABELED, Category, DatasetError, Sample
from .divide import divide_indices
from .loading import default_num_workers, iter_image_batches, load_images, load_masks
from .registry import READERS, Reader, available, get_reader, list_categories, load_category, register_reader
from .synthetic import DefectParams, generate_synthetic
from .transforms import binarise_mask, load_mask, preprocess_image

__all__ = [
    "IMAGE_EXTENSIONS", "MASK_RULES", "UNLABELED", "Category", "DatasetError", "Sample",
    "divide_indices", "default_num_workers", "iter_image_batches", "load_images", "load_masks",
    "READERS", "Reader", "available", "get_reader", "list_categories", "load_category", "register_reader",
    "DefectParams", "generate_synthetic", "binarise_mask", "load_mask", "preprocess_image",
]
