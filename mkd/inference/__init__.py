"""Segment a whole CT volume with a trained network: the ``mkd infer`` library.

A volume (NIfTI file, or a DICOM series folder read with ITK) goes through exactly
the pipeline ``mkd prepare`` used for the training slices
(:func:`mkd.data.volume_transforms`: RAS orientation, optional spacing, HU window,
in-plane ``area`` resize; then :func:`mkd.data.volume_to_slices` for the 3 channels),
plus the training bundles' second ``area`` resize to the network's input size when it
differs from the prepared size. The network runs on batches of slices; the
foreground probability ``sigmoid(logits)`` is mapped back to the input's voxel grid
(trilinear resize back, then MONAI's inverse of ``Spacingd`` and ``Orientationd``)
and thresholded at 0.5, so the mask has exactly the input's shape, affine and voxel
order. Optionally only the largest 3D connected component is kept (MONAI
``KeepLargestConnectedComponent``). The mask is written atomically as uint8 NIfTI.
:meth:`Segmenter.segment_folder` does the same for every NIfTI file of a folder
(nnU-Net's folder-in, folder-out convention, masks under the input file names).

The modules, each depending only on those above it:

- :mod:`mkd.inference.settings`: :class:`InferenceSettings`, :func:`resolve_settings` (options, then the
  checkpoint's record, then ``DATA/prepare.json``, then the defaults);
- :mod:`mkd.inference.io`: :func:`load_volume` (NIfTI, DICOM series, ITK formats), :func:`save_mask`,
  folder jobs;
- :mod:`mkd.inference.geometry`: :func:`preprocess`, its inverse :func:`invert` and the thresholded
  inverse :func:`invert_mask`;
- :mod:`mkd.inference.backends`: PyTorch or ONNX Runtime (the graph from :mod:`mkd.export`), threads,
  int8 calibration slices;
- :mod:`mkd.inference.predictor`: :func:`predict_slices` (also the prediction of ``mkd evaluate`` and of the
  report's panels), :class:`Segmenter`.

Example:
    >>> from mkd.inference import Segmenter  # doctest: +SKIP
    >>> seg = Segmenter("runs/distill-s1-bn/models/model.pt", data_dir="mkd_data", lcc=True)  # doctest: +SKIP
    >>> result = seg.segment_to_file("ct.nii.gz", "ct_mask.nii.gz")  # doctest: +SKIP
    >>> result.shape, result.seconds  # doctest: +SKIP
    ((512, 512, 94), 3.1)
"""

from __future__ import annotations

from mkd.inference.backends import (
    BACKENDS,
    OnnxRuntimeBackend,
    TorchBackend,
    bf16_supported,
    calibration_slices,
    default_threads,
    onnxruntime_available,
    resolve_backend,
)
from mkd.inference.geometry import Preprocessed, invert, invert_mask, preprocess
from mkd.inference.io import (
    NIFTI_SUFFIXES,
    Volume,
    check_folder_job,
    check_mask_output,
    check_mask_replaceable,
    check_preview_path,
    find_volumes,
    is_volume_folder,
    load_volume,
    mask_bytes,
    save_mask,
)
from mkd.inference.predictor import (
    FolderResult,
    InferenceResult,
    Segmenter,
    SlicePrediction,
    check_logits,
    predict_slices,
)
from mkd.inference.settings import InferenceSettings, resolve_settings
from mkd.metrics.segmentation import keep_largest_component

__all__ = [
    "InferenceSettings",
    "InferenceResult",
    "Volume",
    "Preprocessed",
    "Segmenter",
    "FolderResult",
    "find_volumes",
    "check_folder_job",
    "check_mask_output",
    "check_mask_replaceable",
    "check_preview_path",
    "is_volume_folder",
    "resolve_settings",
    "load_volume",
    "preprocess",
    "invert",
    "invert_mask",
    "predict_slices",
    "SlicePrediction",
    "check_logits",
    "keep_largest_component",
    "save_mask",
    "mask_bytes",
    "NIFTI_SUFFIXES",
    "BACKENDS",
    "calibration_slices",
    "bf16_supported",
    "default_threads",
    "onnxruntime_available",
    "resolve_backend",
    "TorchBackend",
    "OnnxRuntimeBackend",
]
