"""Models the user installed: official weights downloaded on request, or files added by hand.

They live in ``<user data dir>/finemask/models/<name>/`` (platformdirs; ``$XDG_DATA_HOME`` moves
it on Linux). Each folder is one of:

- a FineMask model folder (``model.safetensors`` + ``card.json``): refinement or segmentation,
  found by name like the shipped ones (``engine.checkpoints.resolve``);
- encoder weights (``weights.pth`` + ``encoder.json``): a torchvision ResNet-18/34/50 state
  dict, the verified file unchanged (read it with ``torch.load(weights_only=True)``; see
  ``training.pretrained``), whose encoder tensors were checked against
  ``engine.models.encoders.ResNetEncoder`` on install.

Downloads are checksum-verified and nothing half-done is ever left in the folder: the file goes
to a hidden temporary folder inside it, is checked, converted, and only then renamed into place.

``FINEMASK_MODELS_URL_OVERRIDE`` (tests only) replaces the folder part of every download URL,
so tests serve generated files from a local HTTP server.
"""
from __future__ import annotations

from ..hashing import file_hashes
from .download import CONNECT_TIMEOUT, READ_TIMEOUT, CancelFn, ProgressFn, get
from .folders import (
    ENCODER_INFO,
    ENCODER_WEIGHTS,
    OFFICIAL_REFINER,
    SHIPPED_REFINER,
    InstalledModel,
    default_refiner,
    installed_folder,
    list_installed,
    models_dir,
    shipped_models,
    weights_path,
)
from .install import add, remove
from .registry import REGISTRY, URL_OVERRIDE_ENV, RemoteModel

__all__ = ["CONNECT_TIMEOUT", "ENCODER_INFO", "ENCODER_WEIGHTS", "OFFICIAL_REFINER", "READ_TIMEOUT", "REGISTRY",
           "SHIPPED_REFINER", "URL_OVERRIDE_ENV", "CancelFn", "InstalledModel", "ProgressFn", "RemoteModel", "add",
           "default_refiner", "file_hashes", "get", "installed_folder", "list_installed", "models_dir", "remove",
           "shipped_models", "weights_path"]
