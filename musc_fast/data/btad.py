"""BTAD reader (SPEC 7.3): the MVTec layout with normal folder "ok" and defects in "ko".

BTAD's masks keep the image's stem, not ``<stem>_mask``: ``01/test/ko/0000.bmp`` pairs with
``01/ground_truth/ko/0000.png`` (images are .bmp or .png depending on the product, masks .png or
.bmp). Pairing is by stem with any image extension; ``<stem>_mask`` is accepted as well for
re-packaged copies (both present is an ambiguity error). Masks use the MVTec "eq1" rule.
"""
from __future__ import annotations

from .mvtec import MVTecReader
from .registry import register_reader

BTAD_CATEGORIES: tuple[str, ...] = ("01", "02", "03")


@register_reader("btad")
class BTADReader(MVTecReader):
    layout = "<root>/01|02|03/test/{ok,ko}/*"
    normal_type = "ok"
    mask_suffixes = ("", "_mask")
    known = BTAD_CATEGORIES
