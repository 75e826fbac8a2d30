"""mkd: multi-task, multi-scale contrastive knowledge distillation on MONAI."""

from __future__ import annotations

import logging
import warnings

__version__ = "0.1.0"

__all__ = ["__version__"]


class _OncePerProcess(logging.Filter):
    """Let each distinct message of a logger through once per process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


# MONAI's LoadImage builds every reader it knows each time it is constructed; with pydicom
# installed but not nvImageCodec, its DICOM reader logs "nvImageCodec is not available ..."
# and warns again for every volume mkd reads. mkd reads NIfTI with nibabel and DICOM with
# ITK, so the note is shown once per process, and the duplicate warning not at all.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(_OncePerProcess())
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
