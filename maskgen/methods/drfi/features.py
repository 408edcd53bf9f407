"""DRFI's 93-dimensional regional descriptor (Jiang et al., CVPR 2013), vectorised.

Per image, the pixel features are computed once (``PixelFeatures``) and reused by every
segmentation level. Per level, every region statistic is a label-indexed reduction: a sparse
region x pixel matrix product for sums and squares, ``np.bincount`` for histograms, a
lexsort for percentiles, shifted label maps for adjacency and perimeter. There is no Python
loop over pixels or over pairs of regions.

Order of the 93 dimensions (``FEATURE_NAMES``), as in DRFI:

- 0-28   regional contrast: for region i, the weighted mean over j != i of 29 distances,
         weights ``area_j * exp(-|c_i - c_j|^2 / 0.4)`` (centroids normalised by max(H, W)),
         normalised to sum to 1. The 29 distances are the absolute differences of the means
         of R, G, B, L, a, b, H, S, V and of the 15 LM filter responses (24), then the
         chi-square distances of the RGB, Lab, HSV, texton and LBP histograms (5).
- 29-57  regional backgroundness: the same 29 distances between region i and the
         pseudo-background, the image border of width floor(15 * max(H, W) / 400).
- 58-92  regional property: mean x, mean y; 10th-percentile x, 10th y, 90th x, 90th y;
         perimeter / (W + H); aspect ratio; variances of R, G, B, L, a, b, H, S, V (9) and
         of the 15 filter responses (15); LBP variance; area / (H W); area of the
         neighbouring regions / (H W).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from scipy import sparse

from maskgen.methods.drfi import kernels
from maskgen.methods.drfi.kernels import region_squared_deviations, region_sums

HIST_BINS = 8  # per channel: 8 x 8 x 8 colour histograms (DRFI MATLAB)
N_FILTERS = 15
COLOR_NAMES = ("R", "G", "B", "L", "a", "b", "H", "S", "V")
HIST_NAMES = ("rgb_hist", "lab_hist", "hsv_hist", "texton_hist", "lbp_hist")
_DIST_NAMES = (
    [f"mean_{c}" for c in COLOR_NAMES]
    + [f"mean_lm{i}" for i in range(N_FILTERS)]
    + [f"chi2_{h}" for h in HIST_NAMES]
)
PROPERTY_NAMES = (
    ["x_mean", "y_mean", "x_p10", "y_p10", "x_p90", "y_p90", "perimeter", "aspect_ratio"]
    + [f"var_{c}" for c in COLOR_NAMES]
    + [f"var_lm{i}" for i in range(N_FILTERS)]
    + ["var_lbp", "area", "neighbour_area"]
)
FEATURE_NAMES = [f"contrast_{d}" for d in _DIST_NAMES] + [f"bg_{d}" for d in _DIST_NAMES] + PROPERTY_NAMES
# the six background cues a forest fitted with --features drfi+cues reads after the 93 (cues.py)
CUE_NAMES = ("bnd_connectivity", "bg_probability", "bg_weighted_contrast", "rbd", "mr_background", "mr")
N_FEATURES = len(FEATURE_NAMES)
assert N_FEATURES == 93
CONTRAST = slice(0, 29)
BACKGROUND = slice(29, 58)
PROPERTY = slice(58, 93)
CHI2_EPS = 1e-10
POSITION_SIGMA2 = 0.4


def lm_filters(size: int = 19, sigma: float = float(np.sqrt(2.0))) -> np.ndarray:
    """15 Leung-Malik-style filters: 6 orientations x {1st, 2nd} derivative of an elongated
    (3:1) Gaussian, a Gaussian, LoG(sigma) and LoG(3 sigma). Zero-mean (except the
    Gaussian) and unit L1 norm, as in DRFI's ``makeLMfilters``."""
    half = (size - 1) / 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    bank = []
    for k in range(6):
        t = np.pi * k / 6
        u = x * np.cos(t) + y * np.sin(t)  # along the filter's long axis
        v = -x * np.sin(t) + y * np.cos(t)
        su, sv = 3 * sigma, sigma
        g = np.exp(-(u**2) / (2 * su**2) - v**2 / (2 * sv**2))
        bank.append(-v / sv**2 * g)  # first derivative across the long axis
        bank.append((v**2 / sv**4 - 1 / sv**2) * g)  # second derivative
    r2 = x**2 + y**2
    bank.append(np.exp(-r2 / (2 * sigma**2)))
    for s in (sigma, 3 * sigma):
        bank.append((r2 / s**4 - 2 / s**2) * np.exp(-r2 / (2 * s**2)))
    out = []
    for i, f in enumerate(bank):
        f = f - f.mean() if i != 12 else f  # the plain Gaussian keeps its DC
        out.append(f / np.abs(f).sum())
    return np.stack(out).astype(np.float32)


_LM = lm_filters()
_LBP_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))


def lbp_codes(gray: np.ndarray) -> np.ndarray:
    """8-neighbour local binary pattern (neighbour >= centre), edges replicated; 0..255."""
    pad = np.pad(gray, 1, mode="edge")
    h, w = gray.shape
    code = np.zeros((h, w), np.uint16)
    for bit, (dy, dx) in enumerate(_LBP_OFFSETS):
        code |= (pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] >= gray).astype(np.uint16) << bit
    return code.astype(np.uint8)


def _quantize3(a: np.ndarray) -> np.ndarray:
    """H x W x 3 in [0, 1] -> joint bin index of an 8 x 8 x 8 histogram."""
    return kernels.joint_bins(np.ascontiguousarray(a, np.float32), HIST_BINS)


@dataclass
class PixelFeatures:
    """Everything per pixel that the regional descriptor needs, computed once per image."""

    height: int
    width: int
    # N x 25 float32: R G B, L a b, H S V (all in [0, 1]), 15 |LM| in [0, 1], LBP code / 255
    values: np.ndarray
    bins: np.ndarray  # 5 x N int16: rgb, lab, hsv (0..511), texton (0..14), lbp (0..255)
    n_bins: tuple[int, ...]
    border: np.ndarray  # N bool: the pseudo-background

    @property
    def channels(self) -> np.ndarray:
        """The 24 colour and texture channels (N x 24 view), whose means and contrasts DRFI uses."""
        return self.values[:, :24]

    @property
    def lbp_value(self) -> np.ndarray:
        """LBP code / 255 (N view), which DRFI uses only through its variance."""
        return self.values[:, 24]

    # What every segmentation level reads about the pseudo-background, computed once per image.
    @cached_property
    def background(self) -> np.ndarray:
        """N bool: the border band, or the whole image when the band is empty (tiny images)."""
        return self.border if self.border.any() else np.ones(self.border.size, bool)

    @cached_property
    def background_mean(self) -> np.ndarray:
        """The pseudo-background's mean of the 24 channels (float64)."""
        return kernels.masked_mean(self.values, self.background, 24)  # values[bg, :24] mean, bit for bit

    @cached_property
    def background_counts(self) -> tuple[np.ndarray, ...]:
        """The pseudo-background's histogram of each of the five bin indices."""
        bg = self.background
        return tuple(np.bincount(b[bg], minlength=nb) for b, nb in zip(self.bins, self.n_bins, strict=True))


def blurred_rgb(rgb: np.ndarray) -> np.ndarray:
    """DRFI's pre-smoothing (5 x 5 Gaussian), as float32 in [0, 1]."""
    return cv2.GaussianBlur(rgb, (5, 5), 0).astype(np.float32) / 255.0


def normalised_lab(rgb_f: np.ndarray) -> np.ndarray:
    """CIE Lab of float RGB in [0, 1], scaled to about [0, 1]: L / 100, a / 220 + 0.5, b / 220 + 0.5."""
    lab = cv2.cvtColor(rgb_f, cv2.COLOR_RGB2Lab)
    return np.stack([lab[..., 0] / 100.0, lab[..., 1] / 220.0 + 0.5, lab[..., 2] / 220.0 + 0.5], axis=2)


def pixel_features(rgb: np.ndarray, texture_scale: float = 0.5) -> PixelFeatures:
    """Blur (5 x 5 Gaussian, as DRFI), colour spaces, LM responses, textons, LBP, histogram bins.

    LM responses are computed at ``texture_scale`` of the image size and resized back: the
    19 x 19 filters dominate the cost, and region means and variances of a smooth response
    barely change.
    """
    h, w = rgb.shape[:2]
    blur = cv2.GaussianBlur(rgb, (5, 5), 0)
    rgb_f = blur.astype(np.float32) / 255.0  # = blurred_rgb(rgb); blur itself is needed below
    lab = normalised_lab(rgb_f)
    hsv = cv2.cvtColor(rgb_f, cv2.COLOR_RGB2HSV)
    hsv[..., 0] /= 360.0
    gray = cv2.cvtColor(blur, cv2.COLOR_RGB2GRAY)
    responses, texton = lm_responses(gray, texture_scale)
    lbp = lbp_codes(gray)
    # the 25 planes interleaved by one cv2.merge: per-channel strided writes cost 4x as much
    values = cv2.merge([rgb_f, lab, hsv, *responses,
                        lbp.astype(np.float32) / 255.0])  # fmt: skip

    b = int(np.floor(15 * max(h, w) / 400))
    border = np.zeros((h, w), bool)
    if b > 0:
        border[:b], border[-b:], border[:, :b], border[:, -b:] = True, True, True, True
    return PixelFeatures(
        height=h,
        width=w,
        values=values.reshape(h * w, 25),
        bins=np.stack(
            [
                _quantize3(rgb_f).reshape(-1),
                _quantize3(lab).reshape(-1),  # _quantize3 clips: the same bins as clipping lab first
                _quantize3(hsv).reshape(-1),
                texton.reshape(-1),
                lbp.reshape(-1),
            ]
        ).astype(np.int16, copy=False),
        n_bins=(HIST_BINS**3, HIST_BINS**3, HIST_BINS**3, N_FILTERS, 256),
        border=border.reshape(-1),
    )


def lm_responses(gray: np.ndarray, texture_scale: float) -> tuple[list[np.ndarray], np.ndarray]:
    """The 15 |LM| responses of a grey image, each min-max scaled to [0, 1], at full size, and
    the texton map (the index of the strongest response, the first on ties)."""
    h, w = gray.shape
    small = gray.astype(np.float32) / 255.0
    if texture_scale < 1.0 and min(h, w) * texture_scale >= 8:
        small = cv2.resize(small, (max(1, round(w * texture_scale)), max(1, round(h * texture_scale))),
                           interpolation=cv2.INTER_AREA)  # fmt: skip
    responses = []
    for i in range(N_FILTERS):
        r = np.abs(cv2.filter2D(small, cv2.CV_32F, _LM[i], borderType=cv2.BORDER_REFLECT))
        lo, hi = float(r.min()), float(r.max())
        responses.append((r - lo) / (hi - lo) if hi > lo else np.zeros_like(r))
    best, texton = responses[0], np.zeros(small.shape, np.uint8)
    for i in range(1, N_FILTERS):
        stronger = responses[i] > best
        texton[stronger] = i
        best = np.maximum(best, responses[i])
    if small.shape != (h, w):
        responses = [cv2.resize(r, (w, h), interpolation=cv2.INTER_LINEAR) for r in responses]
        texton = cv2.resize(texton, (w, h), interpolation=cv2.INTER_NEAREST)
    return responses, texton


def _histograms(pix: PixelFeatures, lab: np.ndarray, n_regions: int) -> list[np.ndarray]:
    """For each of the five bin indices: the row-normalised histograms of every region and, as
    the last row, of the pseudo-background (R + 1 x used bins; bins no row uses are dropped)."""
    offsets = np.concatenate([[0], np.cumsum(pix.n_bins)]).astype(np.int64)
    counts = kernels.region_histograms(lab, pix.bins, offsets, n_regions)
    out = []
    for k, background in enumerate(pix.background_counts):
        hist = np.vstack([counts[:, offsets[k] : offsets[k + 1]], background[None]])
        hist = hist[:, hist.any(axis=0)].astype(np.float32)
        out.append(hist / hist.sum(axis=1, keepdims=True))
    return out


def chi2_pairwise(h: np.ndarray, g: np.ndarray, chunk: int = 64) -> np.ndarray:
    """chi2(h_i, g_j) = 0.5 * sum_k (h_ik - g_jk)^2 / (h_ik + g_jk + eps), for all i, j."""
    out = np.empty((h.shape[0], g.shape[0]), np.float32)
    for s in range(0, h.shape[0], chunk):
        a = h[s : s + chunk, None, :]
        out[s : s + chunk] = 0.5 * (((a - g[None]) ** 2) / (a + g[None] + CHI2_EPS)).sum(axis=2)
    return out


def chi2_self(h: np.ndarray) -> np.ndarray:
    """``chi2_pairwise(h, h)``, bit for bit, in one compiled pass over the upper triangle."""
    return kernels.chi2_self(
        np.ascontiguousarray(h, np.float32), np.float32(CHI2_EPS), *kernels.pairwise_sum_plan(h.shape[1])
    )


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant vector becomes zeros (no foreground evidence)."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


@dataclass
class RegionStats:
    """Per-level region statistics shared by the descriptor and the scorers."""

    area: np.ndarray  # R
    centroid: np.ndarray  # R x 2 (x, y), normalised by width and height
    border_contact: np.ndarray  # R: share of the region's outline that lies on the image edge
    adjacency: sparse.csr_matrix  # R x R, 1 where two regions touch (4-neighbourhood)
    lab: np.ndarray  # R x 3: mean CIE Lab (L 0-100, a and b about -110..110)
    edge_pixels: np.ndarray  # R: pixels on the image edge
    sides: np.ndarray  # R x 4 bool: touches the top, bottom, left, right edge


def adjacency(lab2d: np.ndarray, n: int) -> sparse.csr_matrix:
    """R x R, 1 where two of the ``n`` regions of ``lab2d`` touch (4-neighbourhood)."""
    return _adjacency_from_keys(kernels.region_boundaries(lab2d, n)[2], n)


def _adjacency_from_keys(keys: np.ndarray, n: int) -> sparse.csr_matrix:
    """The symmetric float32 CSR matrix (sorted indices) of unique pair keys ``i * n + j``, i < j."""
    both = np.sort(np.concatenate([keys, (keys % n) * n + keys // n]))
    rows, cols = np.divmod(both, n)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sparse.csr_matrix((np.ones(both.size, np.float32), cols.astype(np.int32), indptr.astype(np.int32)),
                             shape=(n, n))  # fmt: skip


def _percentiles(counts: np.ndarray, area: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """Per-region lower percentiles of an integer pixel coordinate, from each region's pixel
    counts per coordinate (R x size): the value at index floor(q * (n - 1)) of the region's
    sorted coordinates, read off the cumulative counts instead of sorting the pixels."""
    cdf = np.cumsum(counts, axis=1)
    out = np.empty((area.size, len(qs)))
    for j, q in enumerate(qs):
        rank = np.floor(q * (area - 1))
        out[:, j] = (cdf <= rank[:, None]).sum(axis=1)  # first coordinate whose cdf exceeds the rank
    return out


def region_features(pix: PixelFeatures, labels: np.ndarray) -> tuple[np.ndarray, RegionStats]:
    """The 93-d descriptor of every region of ``labels`` (H x W, values 0..R-1, all present)."""
    h, w = pix.height, pix.width
    lab = labels.reshape(-1).astype(np.int64)
    n = int(lab.max()) + 1
    npx = lab.size
    area = np.bincount(lab, minlength=n).astype(np.float64)
    if (area == 0).any():
        raise ValueError("labels must be consecutive 0..R-1 with every label present")
    feats = pix.values  # N x 25
    mean = region_sums(lab, feats, n).astype(np.float64) / area[:, None]
    # variances from deviations about the region means: exact enough in float32, unlike
    # E[x^2] - E[x]^2, which needs float64 for its cancellation
    var = region_squared_deviations(lab, feats, mean.astype(np.float32)).astype(np.float64) / area[:, None]

    lab2d = lab.reshape(h, w)
    sum_x, sum_y, col_counts, row_counts = kernels.region_coordinates(lab2d, n)
    cx, cy = sum_x / area / w, sum_y / area / h
    px = _percentiles(col_counts, area, (0.1, 0.9)) / w
    py = _percentiles(row_counts, area, (0.1, 0.9)) / h

    # --- pseudo-background: the border band as one extra "region"
    bg_mean = pix.background_mean
    hist_dist_c, hist_dist_b = [], []
    for hist in _histograms(pix, lab, n):
        hist_dist_c.append(chi2_self(hist[:n]))
        hist_dist_b.append(chi2_pairwise(hist[:n], hist[n:])[:, 0])

    # --- regional contrast
    scale = max(h, w)
    cpix = np.stack([cx * w / scale, cy * h / scale], axis=1)
    d2 = ((cpix[:, None, :] - cpix[None, :, :]) ** 2).sum(axis=2)
    weight = area[None, :] * np.exp(-d2 / POSITION_SIGMA2)
    np.fill_diagonal(weight, 0.0)
    wsum = weight.sum(axis=1, keepdims=True)
    weight = np.divide(weight, wsum, out=np.zeros_like(weight), where=wsum > 0)
    mean24 = mean[:, :24]
    contrast = np.empty((n, 29))
    contrast[:, :24] = kernels.weighted_contrast(weight, mean24)
    for k, dmat in enumerate(hist_dist_c):
        contrast[:, 24 + k] = (weight * dmat).sum(axis=1)

    background = np.empty((n, 29))
    background[:, :24] = np.abs(mean24 - bg_mean[None, :])
    for k, dvec in enumerate(hist_dist_b):
        background[:, 24 + k] = dvec

    # --- properties
    inner, edge, pair_keys = kernels.region_boundaries(lab2d, n)
    adjacency_matrix = _adjacency_from_keys(pair_keys, n)
    props = np.empty((n, 35))
    props[:, 0], props[:, 1] = cx, cy
    props[:, 2], props[:, 3], props[:, 4], props[:, 5] = px[:, 0], py[:, 0], px[:, 1], py[:, 1]
    props[:, 6] = inner / (w + h)
    props[:, 7] = (px[:, 1] - px[:, 0]) / (py[:, 1] - py[:, 0] + 1e-6)
    props[:, 8:32] = var[:, :24]
    props[:, 32] = var[:, 24]
    props[:, 33] = area / npx
    props[:, 34] = np.asarray(adjacency_matrix @ area).ravel() / npx

    outline = inner + edge
    sides = np.zeros((n, 4), bool)
    for s, line in enumerate((lab2d[0], lab2d[-1], lab2d[:, 0], lab2d[:, -1])):
        sides[line, s] = True
    lab_mean = mean[:, 3:6] * (100.0, 220.0, 220.0) - (0.0, 110.0, 110.0)  # undo normalised_lab
    stats = RegionStats(
        area=area,
        centroid=np.stack([cx, cy], axis=1),
        border_contact=np.divide(edge, outline, out=np.zeros(n), where=outline > 0),
        adjacency=adjacency_matrix,
        lab=lab_mean,
        edge_pixels=edge.astype(np.float64),
        sides=sides,
    )
    return np.concatenate([contrast, background, props], axis=1).astype(np.float32), stats
