"""A synthetic abdominal CT dataset in the Medical Segmentation Decathlon layout.

:func:`write_phantom` writes a ``Task09_Spleen``-shaped folder (``dataset.json``,
``imagesTr/``, ``labelsTr/``, ``imagesTs/``) of int16 HU volumes and uint8 spleen
masks, so every ``mkd`` command runs without the real archive. The anatomy is
drawn in patient millimetres (body outline, subcutaneous and visceral fat,
abdominal wall, liver, spleen, kidneys, stomach with gas, bowel and colon,
pancreatic tail, aorta, IVC, splenic vein, spine, ribs, lung bases, CT table),
then blurred (partial volume) and given noise. Each case varies the body habitus,
the spleen's size (small / normal / enlarged), shape, position and its contrast
against the liver and stomach wall, the noise level and the voxel orientation
(LPS, RAS or LAS, as in the real Task09 files), so that orientation handling is
exercised. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mkd.errors import MkdError

__all__ = [
    "PHANTOM_CASES",
    "PHANTOM_SHAPE",
    "PHANTOM_TASK",
    "PHANTOM_TEST_CASES",
    "phantom_case",
    "write_phantom",
]

logger = logging.getLogger(__name__)

#: Default number of labelled cases (``imagesTr``): enough for a 14 / 5 / 5 patient split.
PHANTOM_CASES = 24
#: Default voxel grid (x, y, z) of every phantom volume.
PHANTOM_SHAPE = (128, 128, 40)
#: Folder name written under ``root``.
PHANTOM_TASK = "Task09_SpleenPhantom"
#: Unlabelled volumes written to ``imagesTs`` (never used for metrics).
PHANTOM_TEST_CASES = 4
#: Bumped whenever the generator's output changes.
PHANTOM_VERSION = 1

# tissue ids of the internal label map
(AIR, FAT, MUSCLE, VFAT, LUNG, LIVER, SPLEEN, KIDNEY, PELVIS, STOMACH_WALL, STOMACH_FLUID, GAS, BOWEL, BOWEL_FLUID,
 PANCREAS, AORTA, IVC, VEIN, BONE, MARROW, CANAL, DISC, RIB, TABLE) = range(24)  # fmt: skip


class _Grid:
    """Voxel centres of one volume in patient millimetres (x to the patient's right, y anterior, z superior)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        self.x, self.y, self.z = x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)
        self.shape = (len(x), len(y), len(z))

    def box(self, center, half) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
        """Index box covering ``center +- half`` and the broadcastable coordinates inside it (None if empty)."""
        slices, coords = [], []
        for axis, (c, h) in enumerate(zip(center, half)):
            v = (self.x, self.y, self.z)[axis]
            lo, hi = np.searchsorted(v, c - h), np.searchsorted(v, c + h, side="right")
            if hi <= lo:
                return None
            slices.append(slice(int(lo), int(hi)))
            shape = [1, 1, 1]
            shape[axis] = hi - lo
            coords.append(v[lo:hi].reshape(shape))
        return tuple(slices), tuple(coords)


def _rotation(yaw: float, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    cz, sz, cy, sy, cx, sx = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


def _ellipsoid(grid: _Grid, center, radii, rot: np.ndarray | None = None, wobble=None):
    """Mask of an (optionally rotated, optionally lobulated) ellipsoid, on its bounding box."""
    r = float(max(radii)) * (1.3 if wobble else 1.0)
    found = grid.box(center, (r, r, r))
    if found is None:
        return None
    slc, (x, y, z) = found
    d = (x - center[0], y - center[1], z - center[2])
    if rot is not None:  # local = R^T d
        d = tuple(rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3))
    q = (d[0] / radii[0]) ** 2 + (d[1] / radii[1]) ** 2 + (d[2] / radii[2]) ** 2
    if wobble:
        for amp, k, phase in wobble:
            q = q + amp * np.sin(k[0] * d[0] + k[1] * d[1] + k[2] * d[2] + phase)
    return slc, q <= 1.0


def _capsule(grid: _Grid, a, b, radius: float):
    """Mask of all points within ``radius`` of the segment a-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    center, half = (a + b) / 2, np.abs(b - a) / 2 + radius
    found = grid.box(center, half)
    if found is None:
        return None
    slc, (x, y, z) = found
    ab = b - a
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / max(float(ab @ ab), 1e-6)
    t = np.clip(t, 0, 1)
    dist2 = (x - a[0] - t * ab[0]) ** 2 + (y - a[1] - t * ab[1]) ** 2 + (z - a[2] - t * ab[2]) ** 2
    return slc, dist2 <= radius**2


def _paint(ids: np.ndarray, shape_mask, tissue: int, within: np.ndarray | None = None) -> None:
    if shape_mask is None:
        return
    slc, mask = shape_mask
    mask = np.broadcast_to(mask, ids[slc].shape)
    if within is not None:
        mask = mask & within[slc]
    ids[slc][mask] = tissue


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Low-frequency texture of unit standard deviation: random separable sinusoids (wavelength ~ 4 sigma voxels)."""
    field = np.zeros(shape, np.float32)
    for _ in range(8):
        parts = []
        for axis, n in enumerate(shape):
            k = rng.uniform(0.5, 1.5) * 2 * np.pi / (4 * sigma)
            vec = np.sin(k * np.arange(n) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
            shp = [1, 1, 1]
            shp[axis] = n
            parts.append(vec.reshape(shp))
        field += parts[0] * parts[1] * parts[2]
    return (field - field.mean()) / (field.std() + 1e-6)


def phantom_case(
    shape: tuple[int, int, int] = PHANTOM_SHAPE, seed: int = 0, size_class: str = "normal"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one synthetic abdominal CT volume.

    Args:
        shape: voxel grid (x, y, z); the field of view is fixed in millimetres, so the spacing follows.
        seed: random seed of this case.
        size_class: spleen size, one of ``"small"``, ``"normal"``, ``"enlarged"``.

    Returns:
        ``(image, label, affine)``: int16 HU volume, uint8 spleen mask (1 = spleen) and the 4x4 voxel-to-world
        (RAS mm) affine, with the voxel axes in the orientation drawn for this case (LPS, RAS or LAS).

    Raises:
        ValueError: a dimension of ``shape`` is below 8 or ``size_class`` is unknown.
    """
    from scipy import ndimage

    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be three sizes >= 8, got {tuple(shape)}")
    if size_class not in ("small", "normal", "enlarged"):
        raise ValueError(f"size_class must be 'small', 'normal' or 'enlarged', got {size_class!r}")
    rng = np.random.default_rng(seed)
    u = rng.uniform
    nx, ny, nz = (int(s) for s in shape)

    # --- geometry: fixed field of view in mm, spacing follows the grid
    fov_xy = u(340, 400)
    extent_z = u(190, 215)
    sxy, sz = fov_xy / nx, extent_z / nz
    z_top = u(15, 40)  # the diaphragm dome is at z = 0
    x = (np.arange(nx) - (nx - 1) / 2) * sxy
    y = (np.arange(ny) - (ny - 1) / 2) * sxy + u(-8, 8)
    z = z_top - extent_z + (np.arange(nz) + 0.5) * sz
    grid = _Grid(x, y, z)
    X, Y = x[:, None, None].astype(np.float32), y[None, :, None].astype(np.float32)

    # --- body habitus
    half_fov = fov_xy / 2
    A = min(u(130, 165), half_fov - 10)
    B = min(A * u(0.68, 0.8), half_fov - 25)
    fat = u(8, 30)
    wall = u(7, 12)
    rho_body = (X / A) ** 2 + (Y / B) ** 2
    ids = np.full(grid.shape, AIR, np.uint8)
    body = np.broadcast_to(rho_body <= 1, grid.shape)
    inner = np.broadcast_to((X / (A - fat)) ** 2 + (Y / (B - fat * 0.8)) ** 2 <= 1, grid.shape)
    cavity = np.broadcast_to((X / (A - fat - wall)) ** 2 + (Y / (B - fat * 0.8 - wall)) ** 2 <= 1, grid.shape)
    ids[body] = FAT
    ids[inner] = MUSCLE
    ids[cavity] = VFAT
    t0 = -B - u(12, 25)
    table = np.broadcast_to((Y < t0) & (Y > t0 - 8) & (np.abs(X) < half_fov * 0.9), grid.shape)
    ids[table & ~body] = TABLE

    spine_y = -B + fat * 0.8 + 32  # centre of the vertebral body
    # --- posterior muscles (paraspinal), psoas lower down
    for side in (-1, 1):
        _paint(ids, _ellipsoid(grid, (side * 33, spine_y - 26, 0), (24, 16, 400)), MUSCLE)
        _paint(ids, _ellipsoid(grid, (side * 42, spine_y + 8, -230), (18, 20, 150)), MUSCLE, cavity)

    # --- bowel loops (lower, anterior) and the splenic flexure of the colon
    for _ in range(int(rng.integers(8, 14))):
        c = (u(-A * 0.6, A * 0.6), u(-B * 0.1, B * 0.6), u(-200, -95))
        r = u(10, 22)
        content = rng.choice([BOWEL_FLUID, BOWEL_FLUID, GAS, BOWEL])
        _paint(ids, _ellipsoid(grid, c, (r, r * u(0.7, 1.2), r * u(1, 2.5))), BOWEL, cavity)
        _paint(ids, _ellipsoid(grid, c, (r - 3, r * u(0.7, 1.2) - 3, r * 1.5 - 3)), int(content), cavity)
    flex = (-A * u(0.45, 0.6), u(-5, 30), u(-150, -105))
    _paint(ids, _ellipsoid(grid, flex, (18, 18, 30)), BOWEL, cavity)
    _paint(ids, _ellipsoid(grid, flex, (14, 14, 26)), GAS if u() < 0.6 else BOWEL_FLUID, cavity)

    # --- liver (right lobe + a left lobe of varying reach)
    liver_rot = _rotation(u(-0.2, 0.2), u(-0.15, 0.15))
    _paint(ids, _ellipsoid(grid, (A * 0.45, u(-10, 10), -80), (A * 0.5, B * 0.72, 90), liver_rot), LIVER, cavity)
    reach = u(0.2, 0.75)  # how far the left lobe reaches to the patient's left
    _paint(
        ids,
        _ellipsoid(grid, (-A * reach * 0.45, B * 0.45, -40), (A * (0.3 + reach * 0.45), B * 0.3, 42)),
        LIVER,
        cavity,
    )

    # --- kidneys with renal sinus fat
    for side, zc in ((-1, u(-135, -115)), (1, u(-155, -130))):
        c = (side * A * 0.45, spine_y + u(-8, 6), zc)
        rot = _rotation(side * 0.4, side * 0.15)
        _paint(ids, _ellipsoid(grid, c, (24, 30, 52), rot), KIDNEY, cavity)
        _paint(ids, _ellipsoid(grid, (c[0] - side * 8, c[1] + 6, c[2]), (9, 11, 25), rot), PELVIS, cavity)

    # --- stomach: enhancing wall, fluid, a gas cap anteriorly (patient supine)
    st_c = (-A * u(0.18, 0.32), B * u(0.1, 0.35), u(-70, -35))
    st_r = (u(30, 48), u(28, 40), u(40, 60))
    st_rot = _rotation(u(-0.5, 0.3))
    _paint(ids, _ellipsoid(grid, st_c, st_r, st_rot), STOMACH_WALL, cavity)
    st_inner = _ellipsoid(grid, st_c, tuple(r - 5 for r in st_r), st_rot)
    _paint(ids, st_inner, STOMACH_FLUID, cavity)
    if st_inner is not None:
        slc, m = st_inner
        level = st_c[1] + st_r[1] * u(-0.1, 0.6)
        gas = m & (grid.y[slc[1]].reshape(1, -1, 1) > level)
        _paint(ids, (slc, gas), GAS, cavity)

    # --- spleen: a lobulated crescent on the posterolateral left, size by class
    scale = {"small": u(0.42, 0.6), "normal": u(0.8, 1.1), "enlarged": u(1.3, 1.6)}[size_class]
    radii = np.array([u(18, 26), u(42, 58), u(42, 58)]) * np.array([scale**0.6, scale, scale])
    angle = u(0.25, 0.6) * np.pi  # position along the left posterolateral body wall
    ra, rb = A - fat - wall - radii[0] * 1.1 - 4, B - fat * 0.8 - wall - radii[0] * 1.1 - 4
    sp_c = np.array([-ra * abs(np.sin(angle)), -rb * np.cos(angle) * 0.9 + u(-10, 10), -radii[2] - u(3, 25)])
    if size_class == "enlarged":  # splenomegaly reaches anteriorly and downwards
        sp_c[1] += u(5, 25)
        sp_c[2] -= u(0, 20)
    yaw = np.pi / 2 - angle + u(-0.25, 0.25)  # long axis along the wall
    sp_rot = _rotation(yaw, u(-0.3, 0.3), u(-0.25, 0.25))
    wobble = [(u(0.05, 0.18), rng.normal(0, 0.12, 3), u(0, 2 * np.pi)) for _ in range(3)]
    spleen = _ellipsoid(grid, tuple(sp_c), tuple(radii), sp_rot, wobble)
    if spleen is not None:
        slc, m = spleen
        # hilum: carve a concavity on the medial (patient-right, anterior) side
        hil = sp_c + sp_rot @ np.array([radii[0] * u(1.0, 1.4), 0, 0]) * np.array([1, 1, 1])
        hil_mask = _ellipsoid(grid, tuple(hil), (radii[0] * 0.9, radii[1] * 0.55, radii[2] * 0.6), sp_rot)
        if hil_mask is not None:
            hs, hm = hil_mask
            carve = np.zeros(grid.shape, bool)
            carve[hs] = np.broadcast_to(hm, carve[hs].shape)
            m = m & ~carve[slc]
        _paint(ids, (slc, m), SPLEEN, cavity)
    if u() < 0.15:  # accessory spleen (splenule) near the lower pole, labelled spleen as in the MSD masks
        c = sp_c + np.array([u(10, 25), u(10, 25), -radii[2] * u(0.6, 1.0)])
        _paint(ids, _ellipsoid(grid, tuple(c), (u(4, 8),) * 3), SPLEEN, cavity)

    # --- pancreatic tail running to the hilum, splenic vein behind it
    tail_end = sp_c + np.array([radii[0] * 1.2 + 8, 5, -10])
    head = np.array([5, spine_y + 45, u(-110, -90)])
    _paint(ids, _capsule(grid, head, tail_end, u(8, 12)), PANCREAS, cavity)
    _paint(ids, _capsule(grid, head + [0, -10, 5], tail_end + [0, -8, 5], 4.5), VEIN, cavity)

    # --- great vessels
    _paint(ids, _capsule(grid, (-15, spine_y + 32, -400), (-15, spine_y + 32, 200), u(9, 13)), AORTA)
    _paint(ids, _capsule(grid, (24, spine_y + 30, -400), (26, spine_y + 26, 200), u(9, 13)), IVC)

    # --- lung bases above the diaphragm domes
    for side in (-1, 1):
        c = (side * A * 0.45, spine_y + 30, u(95, 120) + (8 if side > 0 else 0))
        _paint(ids, _ellipsoid(grid, c, (A * 0.38, B * 0.6, 120)), LUNG, cavity)

    # --- spine: vertebral bodies with discs, canal, posterior elements
    _paint(ids, _capsule(grid, (0, spine_y, -400), (0, spine_y, 200), u(16, 20)), BONE)
    _paint(ids, _capsule(grid, (0, spine_y, -400), (0, spine_y, 200), 13), MARROW)
    disc_phase = u(0, 32)
    disc = np.broadcast_to(((grid.z[None, None, :] - disc_phase) % 32) < 7, grid.shape)
    vb = _capsule(grid, (0, spine_y, -400), (0, spine_y, 200), 20)
    if vb is not None:
        slc, m = vb
        _paint(ids, (slc, m & disc[slc]), DISC)
    _paint(ids, _capsule(grid, (0, spine_y - 28, -400), (0, spine_y - 28, 200), 11), BONE)
    _paint(ids, _capsule(grid, (0, spine_y - 28, -400), (0, spine_y - 28, 200), 7.5), CANAL)
    for zz in np.arange(disc_phase - 400, 200, 32):
        _paint(ids, _capsule(grid, (0, spine_y - 38, zz), (0, -B + fat * 0.8 + 5, zz - 10), 5), BONE)

    # --- ribs: short arcs in the body wall of the upper abdomen, alternating along z
    rho = np.sqrt(rho_body)
    phi = np.arctan2(Y / B, X / A)
    Z = grid.z[None, None, :]
    shell = (rho > 1 - (fat + wall + 2) / A) & (rho < 1 - (fat + wall - 7) / A)
    rib_z = ((Z - u(0, 24) + 14 * np.abs(phi)) % 24) < 7
    upper = Z > -150 + 60 * np.sin(phi)  # ribs cover the posterior and lateral upper abdomen
    not_front = np.sin(phi) < 0.55
    ribs = shell & rib_z & upper & not_front
    ids[ribs] = RIB

    # --- intensities (portal venous phase), then texture, blur, noise
    liver_hu = u(95, 130)
    hard = u() < 0.3
    spleen_hu = liver_hu + (u(-8, 8) if hard else u(8, 32))
    lut = np.zeros(24, np.float32)
    lut[[AIR, FAT, MUSCLE, VFAT, LUNG]] = [-1000, u(-115, -90), u(40, 60), u(-105, -80), u(-880, -820)]
    lut[[LIVER, SPLEEN, KIDNEY, PELVIS]] = [liver_hu, spleen_hu, u(150, 200), u(-20, 25)]
    wall_hu = spleen_hu + u(-15, 5) if hard else u(60, 95)
    lut[[STOMACH_WALL, STOMACH_FLUID, GAS, BOWEL, BOWEL_FLUID]] = [wall_hu, u(5, 25), -1000, u(40, 80), u(0, 30)]
    lut[[PANCREAS, AORTA, IVC, VEIN]] = [u(70, 105), u(140, 220), u(110, 160), u(130, 190)]
    lut[[BONE, MARROW, CANAL, DISC, RIB, TABLE]] = [u(600, 900), u(180, 300), u(10, 30), u(70, 100), u(450, 800), 250]
    hu = lut[ids]
    soft = (ids >= LIVER) & (ids <= PANCREAS)
    hu += soft * _smooth_noise(rng, grid.shape, 6) * u(3, 8)
    if u() < 0.15:  # arterial-phase "mottled" spleen
        hu += (ids == SPLEEN) * _smooth_noise(rng, grid.shape, 3) * u(15, 30)
    blur_mm = u(1.0, 2.2)
    hu = ndimage.gaussian_filter(hu, (blur_mm / sxy, blur_mm / sxy, max(0.3, 1.2 / sz)))
    sigma = u(8, 30)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * sigma
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    label = (ids == SPLEEN).astype(np.uint8)

    # --- voxel orientation and affine (RAS world millimetres, scanner-like origin)
    affine = np.diag([sxy, sxy, sz, 1.0])
    origin = np.array([x[0], y[0], z[0]]) + np.array([u(-30, 30), u(-200, -100), u(-700, -300)])
    affine[:3, 3] = origin
    axcodes = ("L", "P", "S") if u() < 0.6 else (("R", "A", "S") if u() < 0.6 else ("L", "A", "S"))
    image, label, affine = _reorient(image, label, affine, axcodes)
    return image, label, affine


def _reorient(image, label, affine, axcodes):
    """Flip RAS-ordered arrays to ``axcodes`` voxel order, adjusting the affine (nibabel's orientation tools)."""
    import nibabel as nib

    transform = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(axcodes)
    )
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, image.shape)
    image = np.ascontiguousarray(nib.orientations.apply_orientation(image, transform))
    label = np.ascontiguousarray(nib.orientations.apply_orientation(label, transform))
    return image, label, new_affine


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _size_classes(cases: int, rng: np.random.Generator) -> list[str]:
    n_small = max(1, round(0.2 * cases)) if cases >= 3 else 0
    n_big = max(1, round(0.2 * cases)) if cases >= 3 else 0
    classes = ["small"] * n_small + ["enlarged"] * n_big + ["normal"] * (cases - n_small - n_big)
    rng.shuffle(classes)
    return classes


def write_phantom(
    root: str | os.PathLike,
    cases: int = PHANTOM_CASES,
    shape: tuple[int, int, int] = PHANTOM_SHAPE,
    seed: int = 0,
    test_cases: int | None = None,
    name: str = PHANTOM_TASK,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a Task09_Spleen-shaped synthetic dataset to ``root/name``.

    An existing phantom folder written with the same settings is reused as is;
    one written with other settings is replaced. A folder of the same name that
    was not written by this function is never touched.

    Args:
        root: parent folder.
        cases: labelled volumes (``imagesTr`` / ``labelsTr``), at least 3.
        shape: voxel grid (x, y, z) of every volume.
        seed: random seed; the same seed writes identical files.
        test_cases: unlabelled volumes in ``imagesTs``; default ``max(2, cases // 6)``.
        name: task folder name.
        overwrite: rewrite even when an identical phantom exists.
        progress: called as ``progress(done, total)`` after each volume.

    Returns:
        The task folder.

    Raises:
        MkdError: ``root/name`` exists and is not an mkd phantom.
        ValueError: ``cases`` < 3 or a bad ``shape``.

    Example:
        >>> task = write_phantom("/tmp/src", cases=8, shape=(64, 64, 16))  # doctest: +SKIP
    """
    from mkd import __version__
    from mkd.utils import atomic_dir

    if cases < 3:
        raise ValueError(f"a phantom needs at least 3 cases (training, validation, test), got cases={cases}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be three sizes >= 8, got {shape}")
    test_cases = max(2, cases // 6) if test_cases is None else int(test_cases)
    settings = {"cases": int(cases), "test_cases": test_cases, "shape": list(shape), "seed": int(seed),
                "version": PHANTOM_VERSION}  # fmt: skip
    task = Path(root) / name
    meta_file = task / "dataset.json"
    if task.exists():
        try:
            existing = json.loads(meta_file.read_text()).get("mkd_phantom")
        except (OSError, ValueError):
            existing = None
        if existing is None:
            raise MkdError(f"{task}: exists and is not an mkd phantom; choose another `root` or remove it")
        if existing == settings and not overwrite:
            logger.info("reusing phantom %s", task)
            return task

    rng = np.random.default_rng([int(seed), 9])
    classes = _size_classes(cases, rng) + list(rng.choice(["small", "normal", "enlarged"], test_cases))
    case_seeds = rng.integers(0, 2**31 - 1, cases + test_cases)
    training, test = [], []
    with atomic_dir(task, overwrite=True) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        total = cases + test_cases
        for n in range(total):
            image, label, affine = phantom_case(shape, int(case_seeds[n]), classes[n])
            fname = f"spleen_{n + 1}.nii.gz"
            if n < cases:
                _save_nifti(image, affine, tmp / "imagesTr" / fname)
                _save_nifti(label, affine, tmp / "labelsTr" / fname)
                training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
            else:
                _save_nifti(image, affine, tmp / "imagesTs" / fname)
                test.append(f"./imagesTs/{fname}")
            if progress is not None:
                progress(n + 1, total)
        meta = {
            "name": "Spleen",
            "description": "Synthetic abdominal CT with spleen masks (mkd phantom, shaped like MSD Task09_Spleen)",
            "reference": "mkd phantom generator",
            "licence": "CC-BY-SA 4.0",
            "release": f"mkd {__version__}",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "spleen"},
            "numTraining": cases,
            "numTest": test_cases,
            "training": training,
            "test": test,
            "mkd_phantom": settings,
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=4) + "\n")
    logger.info("wrote phantom %s (%d labelled, %d unlabelled volumes of %s)", task, cases, test_cases, shape)
    return task
