"""The models FineMask can download: where each file is and the checksums it must have."""
from __future__ import annotations

import os
from dataclasses import dataclass

#: Test-only: replaces the folder part of every registry URL (e.g. ``http://127.0.0.1:8000``).
URL_OVERRIDE_ENV = "FINEMASK_MODELS_URL_OVERRIDE"


@dataclass(frozen=True)
class RemoteModel:
    """A file FineMask can download and install under ``name``.

    ``kind``: "refinement" or "encoder". ``architecture``: "cascadepsp" or "resnet18/34/50".
    ``md5``: the full MD5 hex digest, or None. ``sha256``: the full SHA-256 hex digest, or the
    prefix a publisher puts in the file name (torchvision: 8 hex digits), or None when unknown.
    At least one of the two is always given.
    """

    name: str
    kind: str
    architecture: str
    url: str
    md5: str | None = None
    sha256: str | None = None
    description: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def download_url(self) -> str:
        """The URL to fetch (``$FINEMASK_MODELS_URL_OVERRIDE`` replaces its folder; tests only)."""
        base = os.environ.get(URL_OVERRIDE_ENV)
        return f"{base.rstrip('/')}/{self.filename}" if base else self.url


# Where each entry comes from:
# - cascadepsp: the file the reference's own pip package (segmentation-refinement, in
#   hkchengrex/CascadePSP, segmentation_refinement/download.py) downloads, and the MD5 it checks.
#   No SHA-256 is published and this project's machines cannot download the file, so the SHA-256
#   is trust-on-first-use: computed on install and recorded in the installed model's card
#   (training.sha256). Once a SHA-256 is known, put it in `sha256` below and it is checked.
# - resnet*-imagenet: torchvision's ImageNet1K_V1 weights (torchvision/models/resnet.py,
#   ResNet{18,34,50}_Weights.IMAGENET1K_V1). The hex in the file name is the start of the file's
#   SHA-256 (torch.hub's check_hash convention); it is checked.
REGISTRY: dict[str, RemoteModel] = {
    m.name: m
    for m in (
        RemoteModel("cascadepsp", "refinement", "cascadepsp",
                    "https://github.com/hkchengrex/CascadePSP/releases/download/v1.0/model",
                    md5="7478d4a9c42ab52beb6d7e9683402fe0",
                    description="official CascadePSP refiner (ResNet-50), the paper's weights"),
        RemoteModel("resnet18-imagenet", "encoder", "resnet18",
                    "https://download.pytorch.org/models/resnet18-f37072fd.pth", sha256="f37072fd",
                    description="torchvision ResNet-18 ImageNet1K_V1 encoder weights"),
        RemoteModel("resnet34-imagenet", "encoder", "resnet34",
                    "https://download.pytorch.org/models/resnet34-b627a593.pth", sha256="b627a593",
                    description="torchvision ResNet-34 ImageNet1K_V1 encoder weights"),
        RemoteModel("resnet50-imagenet", "encoder", "resnet50",
                    "https://download.pytorch.org/models/resnet50-0676ba61.pth", sha256="0676ba61",
                    description="torchvision ResNet-50 ImageNet1K_V1 encoder weights"),
    )
}
