"""Analytic X-ray path lengths through simple 3-D shapes, accumulated on a pixel grid.

Anatomy is described in *anatomy units*: the image spans [-1, 1] on both axes at scale 1, x to the
right, y down (image rows). A :class:`Pose` (scale, rotation, translation) maps anatomy units to
pixels; depth half-axes stay in anatomy units because zooming the detector does not make a bone
thicker. Every shape is rasterised only inside its bounding box, so a hand of ~40 bones costs about
as much as one full-grid operation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Linear attenuation per anatomy unit (relative values; the exposure step normalises the scale).
SOFT = 1.0  # muscle / water
FAT = 0.75
GLAND = 1.25  # fibroglandular breast tissue
BONE = 5.0  # cortical bone
MARROW = 1.8  # cancellous bone / marrow
AIR = -1.0  # gas in lung or bowel: it replaces soft tissue, so it removes attenuation

# A structure is drawn under one structure key or several (a thumb is also a metacarpal and phalanges).
Keys = str | tuple[str, ...] | None

_THIN = 0.7  # pixels: thinner structures are widened to this and their μ scaled down


@dataclass(frozen=True)
class Pose:
    """Similarity transform from anatomy units to pixels.

    The anatomy point (ox, oy) lands at image offset (tx, ty) (in half-image units from the centre);
    ``scale`` is image half-widths per anatomy unit, ``angle`` a rotation in degrees.
    """

    size: int
    scale: float = 1.0
    angle: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    ox: float = 0.0
    oy: float = 0.0

    @property
    def px(self) -> float:
        """Pixels per anatomy unit."""
        return self.scale * self.size / 2.0

    def point(self, x: float, y: float) -> tuple[float, float]:
        a = math.radians(self.angle)
        ca, sa = math.cos(a), math.sin(a)
        x, y = x - self.ox, y - self.oy
        xr = (ca * x - sa * y) * self.scale + self.tx
        yr = (sa * x + ca * y) * self.scale + self.ty
        return (xr + 1.0) * self.size / 2.0, (yr + 1.0) * self.size / 2.0


class Canvas:
    """Sum of μ·thickness over all shapes drawn, plus one boolean mask per named landmark."""

    def __init__(self, pose: Pose, keep: dict[str, str] | None = None):
        """``keep`` maps structure keys used by the drawing code to the landmark names recorded; a shape drawn
        under several keys adds its pixels to the mask of each kept one."""
        self.pose = pose
        self.keep = keep or {}
        self.size = pose.size
        self.att = np.zeros((self.size, self.size), np.float32)
        self.masks: dict[str, np.ndarray] = {}
        self._centers = np.arange(self.size, dtype=np.float32) + 0.5

    # -- plumbing -----------------------------------------------------------------------------
    def _window(self, x0: float, x1: float, y0: float, y1: float):
        S = self.size
        c0, c1 = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, S)
        r0, r1 = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, S)
        if c0 >= c1 or r0 >= r1:
            return None
        return (slice(r0, r1), slice(c0, c1)), self._centers[None, c0:c1], self._centers[r0:r1, None]

    def _deposit(self, sl, t: np.ndarray, mu: float, landmark: Keys) -> None:
        if mu:
            self.att[sl] += mu * t
        keys = (landmark,) if isinstance(landmark, str) else landmark or ()
        inside = None
        for key in keys:
            name = self.keep.get(key)
            if not name:
                continue
            mask = self.masks.get(name)
            if mask is None:
                mask = self.masks[name] = np.zeros((self.size, self.size), bool)
            if inside is None:
                inside = t > 0
            mask[sl] |= inside

    def _frame(self, cx: float, cy: float, angle: float):
        px, py = self.pose.point(cx, cy)
        a = math.radians(angle + self.pose.angle)
        return px, py, math.cos(a), math.sin(a)

    # -- shapes -------------------------------------------------------------------------------
    def ellipsoid(self, cx: float, cy: float, a: float, b: float, c: float, angle: float = 0.0,
                  mu: float = BONE, landmark: Keys = None, power: float = 2.0,
                  shell: float = 0.0, inner_mu: float = 0.0) -> None:
        """Ellipsoid with in-plane half-axes ``a`` (along ``angle``, degrees) and ``b``, depth half-axis ``c``.

        ``power`` 4 makes a superellipsoid in the image plane (a box with rounded corners, e.g. a
        vertebral body). The chord is ``2c·sqrt(1 - q)`` with ``q`` the squared in-plane norm.
        ``shell`` > 0 adds a concentric inner body, (1 - shell) times smaller, whose attenuation is
        changed by ``inner_mu`` (e.g. marrow inside a cortical rim), in the same pass.
        """
        if power not in (2.0, 4.0):
            raise ValueError(f"power must be 2 or 4, not {power}")
        k = self.pose.px
        A, B = a * k, b * k
        if min(A, B) < _THIN:  # sub-pixel structure: keep its projected mass on a pixel-wide shape
            if min(A, B) < _THIN / 8:
                return
            w = (A * B) / (max(A, _THIN) * max(B, _THIN))
            mu, inner_mu = mu * w, inner_mu * w
            A, B = max(A, _THIN), max(B, _THIN)
        px, py, ca, sa = self._frame(cx, cy, angle)
        hw = math.sqrt((A * ca) ** 2 + (B * sa) ** 2) + 1.0
        hh = math.sqrt((A * sa) ** 2 + (B * ca) ** 2) + 1.0
        win = self._window(px - hw, px + hw, py - hh, py + hh)
        if win is None:
            return
        sl, X, Y = win
        dx, dy = X - px, Y - py
        u = (dx * (ca / A) + dy * (sa / A))
        v = (dy * (ca / B) - dx * (sa / B))
        if power == 2.0:
            q = u * u + v * v
        else:  # power 4
            u = u * u
            v = v * v
            q = np.sqrt(u * u + v * v)
        t = np.sqrt(np.maximum(0.0, 1.0 - q)) * (2.0 * c)
        self._deposit(sl, t, mu, landmark)
        if shell:
            f = 1.0 - shell
            self.att[sl] += (2.0 * c * f * inner_mu) * np.sqrt(np.maximum(0.0, 1.0 - q / (f * f)))

    def capsule(self, x0: float, y0: float, x1: float, y1: float, r0: float, r1: float | None = None,
                depth: float = 1.0, mu: float = BONE, landmark: Keys = None,
                shell: float = 0.0, inner_mu: float = 0.0) -> None:
        """Cylinder with rounded ends from (x0, y0) to (x1, y1), radius tapering from ``r0`` to ``r1``.

        ``depth`` scales the cross-section out of plane (1 = round, <1 = flattened); ``shell`` and
        ``inner_mu`` as for :meth:`ellipsoid` (a medullary canal inside the cortex).
        """
        r1 = r0 if r1 is None else r1
        k = self.pose.px
        ax, ay = self.pose.point(x0, y0)
        bx, by = self.pose.point(x1, y1)
        R0, R1 = r0 * k, r1 * k
        if max(R0, R1) < _THIN:  # sub-pixel: widen to a pixel, scale μ to keep the projected mass
            if max(R0, R1) < _THIN / 8:
                return
            w = _THIN / max(R0, R1)
            R0, R1 = R0 * w, R1 * w
            mu, inner_mu = mu / (w * w), inner_mu / (w * w)
        rm = max(R0, R1) + 1.0
        win = self._window(min(ax, bx) - rm, max(ax, bx) + rm, min(ay, by) - rm, max(ay, by) + rm)
        if win is None:
            return
        sl, X, Y = win
        ex, ey = bx - ax, by - ay
        L2 = ex * ex + ey * ey + 1e-9
        dx, dy = X - ax, Y - ay
        h = np.clip(dx * (ex / L2) + dy * (ey / L2), 0.0, 1.0)
        qx, qy = dx - h * ex, dy - h * ey
        rad = R0 + (R1 - R0) * h
        q = (qx * qx + qy * qy) / (rad * rad)
        t = (2.0 * depth / k) * rad * np.sqrt(np.maximum(0.0, 1.0 - q))
        self._deposit(sl, t, mu, landmark)
        if shell:
            f = 1.0 - shell
            self.att[sl] += ((2.0 * depth * f * inner_mu / k) * rad) * np.sqrt(np.maximum(0.0, 1.0 - q / (f * f)))

    def arc(self, cx: float, cy: float, rx: float, ry: float, start: float, end: float, r: float,
            angle: float = 0.0, depth: float = 1.0, taper: float = 0.15, mu: float = BONE,
            landmark: Keys = None) -> None:
        """Tube of radius ``r`` bent along an elliptical arc (a section of an elliptic torus): ribs, rims.

        The arc runs from ``start`` to ``end`` degrees (parametric angle on the ellipse with half-axes
        ``rx``, ``ry`` rotated by ``angle``); the tube narrows over the last ``taper`` of its length.
        """
        k = self.pose.px
        RX, RY, RR = rx * k, ry * k, r * k
        if RR < _THIN:  # sub-pixel: widen to a pixel, scale μ to keep the projected mass
            if RR < _THIN / 8:
                return
            mu *= (RR / _THIN) ** 2
            RR = _THIN
        px, py, ca, sa = self._frame(cx, cy, angle)
        th0, span = math.radians(start), abs(math.radians(end - start))
        ts = th0 + np.linspace(0.0, span, 16)
        ux, uy = RX * np.cos(ts), RY * np.sin(ts)
        xs, ys = px + ux * ca - uy * sa, py + ux * sa + uy * ca
        win = self._window(xs.min() - RR - 1, xs.max() + RR + 1, ys.min() - RR - 1, ys.max() + RR + 1)
        if win is None:
            return
        sl, X, Y = win
        dx, dy = X - px, Y - py
        u = dx * ca + dy * sa
        v = dy * ca - dx * sa
        un, vn = u * (1.0 / RX), v * (1.0 / RY)
        rho = np.sqrt(un * un + vn * vn) + 1e-6
        # first-order distance to the ellipse: (rho - 1) / |grad rho|
        grad = np.sqrt((un * (1.0 / RX)) ** 2 + (vn * (1.0 / RY)) ** 2) / rho + 1e-9
        d = (rho - 1.0) / grad
        band = np.nonzero(np.abs(d) < RR)  # only pixels near the centre line need the angle
        t = np.zeros(d.shape, np.float32)
        if band[0].size:
            db = d[band]
            phi = np.mod(np.arctan2(vn[band], un[band]) - th0, 2.0 * math.pi)
            along = np.minimum(phi, span - phi) * (1.0 / max(span * taper, 1e-6))
            rad = RR * np.sqrt(np.clip(along, 0.05, 1.0))
            tb = (2.0 * depth / k) * rad * np.sqrt(np.maximum(0.0, 1.0 - (db * db) / (rad * rad)))
            t[band] = np.where(phi <= span, tb, 0.0)
        self._deposit(sl, t, mu, landmark)

    # -- composite helpers ---------------------------------------------------------------------
    def long_bone(self, x0: float, y0: float, x1: float, y1: float, r: float, r1: float | None = None,
                  cortex: float = 0.35, landmark: Keys = None) -> None:
        """A tubular bone: a bright cortical shell around a darker medullary canal."""
        self.capsule(x0, y0, x1, y1, r, r1, mu=BONE, landmark=landmark, shell=cortex, inner_mu=MARROW - BONE)

    def cancellous(self, cx: float, cy: float, a: float, b: float, angle: float = 0.0, c: float | None = None,
                   landmark: Keys = None, power: float = 2.0, shell: float = 0.18) -> None:
        """An epiphysis, carpal or vertebral body: thin cortical rim, cancellous inside."""
        c = min(a, b) if c is None else c
        self.ellipsoid(cx, cy, a, b, c, angle, mu=BONE, landmark=landmark, power=power, shell=shell,
                       inner_mu=MARROW - BONE)
