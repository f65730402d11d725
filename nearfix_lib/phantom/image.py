"""The phantom's CT intensities: blood pools, myocardium, fat and noise painted from the clean labels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nearfix_lib.core.classes import ClassTable
from nearfix_lib.core.config import PhantomImageParams
from nearfix_lib.phantom.anatomy import _Anatomy, _Grid

# -- the CT image ---------------------------------------------------------------------------

# Hounsfield units of each structure in an arterial-phase cardiac CT: opacified left heart,
# right heart less dense (contrast mixing with unopacified caval return), then myocardium.
_BLOOD_HU = {"LV": 360.0, "LA": 350.0, "LAA": 340.0, "Ao": 370.0, "Cor": 360.0, "PV": 350.0,
             "RV": 250.0, "RA": 220.0, "PA": 260.0}
_FAT_HU = -90.0


def _ct_image(truth: np.ndarray, grid: _Grid, anatomy: _Anatomy, spacing: np.ndarray,
              table: ClassTable, rng: np.random.Generator,
              quality: PhantomImageParams | None = None) -> np.ndarray:
    """A CT-like volume for the labels: lungs, mediastinal fat, spine, contrast blood pool.

    Partial volume comes from a Gaussian blur (``quality.blur_vox``, 0.7 voxel), quantum noise from
    additive Gaussian noise (``noise_hu``, 25 HU), so intensity-based tools see realistic but not
    trivially separable values; ``cor_enhancement`` dims the coronary lumen towards the fat around it
    (distal vessels, a late bolus).
    """
    quality = quality or PhantomImageParams()
    hu = np.full(truth.shape, -820.0, dtype=np.float32)  # aerated lung
    hu += rng.normal(0.0, 30.0, truth.shape).astype(np.float32)
    x, y = grid.pts[0], grid.pts[1]
    (sx, sy), spine_r = anatomy.spine
    r_spine = np.hypot(x - sx, y - sy)
    hu[(r_spine <= spine_r + 28.0) | (y >= 62.0)] = 40.0  # paraspinal muscle, chest wall
    hu[r_spine <= spine_r] = 300.0  # cancellous bone
    hu[(r_spine <= spine_r) & (r_spine > spine_r - 3.0)] = 650.0  # cortical shell
    near_heart = ndimage.distance_transform_edt(truth == 0, sampling=spacing) <= 9.0
    hu[near_heart & (hu < 0.0)] = _FAT_HU  # epicardial and mediastinal fat
    contrast = float(rng.uniform(0.85, 1.15))
    for cls in table:
        if cls.key in _BLOOD_HU:
            blood = _BLOOD_HU[cls.key] * contrast
            if cls.key == "Cor" and quality.cor_enhancement != 1.0:
                blood = _FAT_HU + (blood - _FAT_HU) * quality.cor_enhancement
            hu[truth == cls.index] = blood
    hu[truth == table["Myo"].index] = float(rng.uniform(80.0, 120.0))
    hu = ndimage.gaussian_filter(hu, quality.blur_vox)
    hu += rng.normal(0.0, quality.noise_hu, truth.shape).astype(np.float32)
    return hu.astype(np.float32)
