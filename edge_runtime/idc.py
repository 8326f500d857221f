"""IDC patch file names: `<patient>_idx5_x<X>_y<Y>_class<C>.png` (Janowczyk & Madabhushi's release).

Lives in the edge runtime because the slide map (no TensorFlow) and the training-side dataset
loader must read the names the same way.
"""

from __future__ import annotations

import re

# class 0 = no invasive ductal carcinoma in the patch, class 1 = IDC.
IDC_LABELS = ("non_idc", "idc")
IDC_POSITIVE = IDC_LABELS[1]

_IDC_NAME = re.compile(r"^(?P<patient>[A-Za-z0-9-]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<cls>[01])\.png$", re.IGNORECASE)


def parse_idc_name(name: str) -> tuple[str, int, int, int] | None:
    """`10253_idx5_x1001_y1051_class0.png` -> ("10253", 1001, 1051, 0); None if it is not an IDC name.

    `name` may be a path: only its last component is read.
    """
    match = _IDC_NAME.match(name.replace("\\", "/").rsplit("/", 1)[-1])
    if match is None:
        return None
    return match["patient"], int(match["x"]), int(match["y"]), int(match["cls"])
