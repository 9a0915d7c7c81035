"""Dataset converters: public dataset distributions (and nnU-Net v2) → the tskd dataset format.

    >>> from tskd.convert import convert                                      # doctest: +SKIP
    >>> summary = convert("drive", "~/downloads/DRIVE", "data/drive")          # doctest: +SKIP
    >>> print(summary)                                                         # doctest: +SKIP

or ``tskd convert FORMAT SRC DST [--size N] [--sequence ...] [--reviewer R] [--resize MODE]``.
Each converter reads the dataset's
official distribution layout (documented in its module), writes ``DST`` atomically (nothing
appears in ``DST`` unless the whole conversion succeeded and the result passes
:func:`tskd.data.format.validate_dataset`) and returns a :class:`ConversionSummary`. Bad input
raises :class:`tskd.data.format.DatasetError` naming the file.

Core layer: numpy, PIL and pydicom only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tskd.convert.autooral import convert_autooral
from tskd.convert.chaos import convert_chaos
from tskd.convert.common import ConversionSummary, DatasetWriter
from tskd.convert.drive import convert_drive
from tskd.convert.kidneyus import convert_kidneyus
from tskd.convert.nnunet import convert_nnunet, export_nnunet
from tskd.convert.ph2 import convert_ph2
from tskd.data.format import DatasetError

__all__ = ["CONVERTERS", "Converter", "ConversionSummary", "DatasetWriter", "convert"]


@dataclass(frozen=True)
class Converter:
    """A registered format: ``run(src, dst, **options)`` → :class:`ConversionSummary`."""

    name: str
    run: Callable[..., ConversionSummary]
    description: str
    options: tuple[str, ...] = ("size",)
    default_size: int | None = None


CONVERTERS: dict[str, Converter] = {c.name: c for c in (
    Converter("ph2", convert_ph2, "PH2 dermoscopy ('PH2 Dataset images/IMDxxx/...')"),
    Converter("drive", convert_drive,
              "DRIVE retinal vessels (training/, test/ with 1st_manual and mask)"),
    Converter("chaos", convert_chaos, "CHAOS MR (Train_Sets/MR/<patient>/T1DUAL|T2SPIR) as "
              "2D slices", options=("size", "sequence"), default_size=256),
    Converter("kidneyus", convert_kidneyus, "Open Kidney Ultrasound (images + labels/"
              "reviewed_masks_r or reviewed_labels_r.csv)",
              options=("size", "reviewer", "resize", "transducer"),
              default_size=512),
    Converter("autooral", convert_autooral, "Autooral oral ulcers ([Autooral_dataset/]"
              "{train,val,test}/{images,masks}; ids <split>_<name>)", default_size=256),
    Converter("nnunet", convert_nnunet, "nnU-Net v2 raw 2D dataset (DatasetXXX_Name) → tskd"),
    Converter("nnunet-export", export_nnunet, "tskd dataset → nnU-Net v2 raw (DST named "
              "DatasetXXX_Name)", options=()),
)}


def convert(format: str, src: str | os.PathLike[str], dst: str | os.PathLike[str],
            **opts: Any) -> ConversionSummary:
    """Run the converter registered as ``format``; options set to ``None`` mean "default"."""
    conv = CONVERTERS.get(format)
    if conv is None:
        raise DatasetError(f"format: invalid value {format!r}; allowed: "
                           f"{', '.join(CONVERTERS)}")
    given = {k: v for k, v in opts.items() if v is not None}
    unknown = sorted(set(given) - set(conv.options))
    if unknown:
        raise DatasetError(f"format {format!r} does not take option(s) {unknown}; it takes "
                           f"{list(conv.options) or 'none'}")
    return conv.run(src, dst, **given)
