"""The phantom skeleton: body regions drawn from ellipsoids, capsules and bent tubes.

One frontal body model (head, neck, thorax, abdomen and pelvis, both arms and legs in the
anatomical position) serves most classes: a class is a *view* of it (see ``views``), so
neighbouring classes share real anatomy (a wrist film shows the carpals a hand film shows, only
closer) and differ the way real films differ. Lateral head/neck, dorsoplantar foot and breast are
drawn by their own models. Units are anatomy units (1 ≈ 10 cm); x is image right (the patient's
left in a frontal view), y points down, the top of the head is at y = 0.

Each structure is drawn under a *structure key* (or several: the thumb's bones are also metacarpals
and phalanges); a view turns the keys it cares about into the landmark masks of its class.
"""

from __future__ import annotations

import math

import numpy as np

from xraydeconv.data.phantoms.shapes import AIR, BONE, FAT, GLAND, SOFT, Canvas, Keys


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


# ---------------------------------------------------------------------------------------------
# head, frontal and lateral
# ---------------------------------------------------------------------------------------------
def head_frontal(cv: Canvas, rng: np.random.Generator) -> None:
    """Skull and face seen from the front: vault, orbits, sinuses, septum, mandible, teeth."""
    w = _u(rng, 0.95, 1.05)
    cv.ellipsoid(0, 1.2, 0.82 * w, 1.18, 0.85, mu=SOFT)  # scalp, brain and face soft tissue
    cv.ellipsoid(0, 0.95, 0.76 * w, 0.9, 0.8, mu=BONE, landmark="vault")
    cv.ellipsoid(0, 0.95, 0.71 * w, 0.85, 0.75, mu=-BONE)
    cv.ellipsoid(0, 0.7, 0.2, 0.09, 0.2, mu=AIR * 0.8, landmark="frontal-sinus")
    for s in (-1, 1):
        cv.arc(s * 0.3 * w, 1.05, 0.19, 0.17, 0, 360, 0.035, mu=BONE, taper=0.0, landmark="orbits")
        cv.ellipsoid(s * 0.3 * w, 1.05, 0.2, 0.18, 0.3, mu=AIR * 0.5, landmark="orbits")
        cv.ellipsoid(s * 0.28 * w, 1.48, 0.15, 0.17, 0.25, mu=AIR, landmark="maxillary-sinuses")
        cv.capsule(s * 0.14, 1.27, s * 0.66 * w, 1.16, 0.045, mu=BONE, landmark="petrous-ridges")
        cv.capsule(s * 0.45 * w, 1.33, s * 0.75 * w, 1.3, 0.04, mu=BONE, landmark="zygoma")
        cv.capsule(s * 0.56 * w, 1.45, s * 0.5 * w, 1.95, 0.06, mu=BONE, landmark="mandible")  # rami
    cv.ellipsoid(0, 1.45, 0.09, 0.2, 0.35, mu=AIR * 0.8)  # nasal cavity
    cv.capsule(0, 1.22, 0, 1.62, 0.018, mu=BONE, landmark="nasal-septum")
    cv.arc(0, 1.55, 0.5 * w, 0.5, 20, 160, 0.065, mu=BONE, taper=0.05, landmark="mandible")
    for row, y in enumerate((1.76, 1.86)):
        for k in range(8):
            x = (k - 3.5) * 0.085 * w
            cv.ellipsoid(x, y + 0.02 * (abs(k - 3.5) / 3.5) ** 2 * (1 - 2 * row), 0.036, 0.075, 0.12,
                         mu=BONE * 1.2, landmark="teeth")


def head_lateral(cv: Canvas, rng: np.random.Generator) -> None:
    """Skull and neck from the side (face to the left): vault, sella, skull base, orbit, jaw, C1–C7."""
    L = _u(rng, 0.95, 1.05)
    cv.ellipsoid(0.05, 1.0, 1.03 * L, 0.9, 0.72, mu=SOFT)
    cv.ellipsoid(-0.55, 1.62, 0.42, 0.42, 0.55, mu=SOFT)
    cv.ellipsoid(0.05, 0.95, 0.98 * L, 0.82, 0.7, mu=BONE, landmark="vault")
    cv.ellipsoid(0.05, 0.95, 0.92 * L, 0.76, 0.65, mu=-BONE)
    # sella turcica: a cup of dense bone with the sphenoid sinus below and in front
    cv.arc(0.0, 1.1, 0.075, 0.065, 0, 180, 0.022, mu=BONE * 1.5, taper=0.1, landmark="sella")
    cv.ellipsoid(0.085, 1.06, 0.03, 0.05, 0.2, mu=BONE, landmark="sella")
    cv.ellipsoid(-0.13, 1.22, 0.12, 0.08, 0.2, mu=AIR)
    cv.ellipsoid(0.27, 1.28, 0.26, 0.075, 0.14, angle=-18, mu=BONE, landmark="skull-base")
    cv.ellipsoid(0.38, 1.36, 0.07, 0.07, 0.1, mu=AIR, landmark="skull-base")  # external auditory canal
    cv.capsule(-0.78 * L, 1.04, -0.08, 1.1, 0.022, mu=BONE, landmark="skull-base")
    cv.arc(-0.7 * L, 1.05, 0.15, 0.17, 90, 290, 0.032, mu=BONE, landmark="orbits")
    cv.ellipsoid(-0.88 * L, 0.82, 0.07, 0.12, 0.2, mu=AIR)  # frontal sinus
    cv.cancellous(-0.58, 1.45, 0.27, 0.13, landmark="maxilla")
    cv.ellipsoid(-0.55, 1.42, 0.15, 0.09, 0.2, mu=AIR)
    for k in range(7):
        x = -0.86 + k * 0.085
        cv.ellipsoid(x, 1.62, 0.035, 0.07, 0.1, mu=BONE * 1.2, landmark="teeth")
        cv.ellipsoid(x, 1.74, 0.035, 0.07, 0.1, mu=BONE * 1.2, landmark="teeth")
    cv.capsule(-0.86, 1.88, -0.02, 1.83, 0.07, mu=BONE, landmark="mandible")
    cv.capsule(-0.02, 1.83, 0.04, 1.38, 0.065, mu=BONE, landmark="mandible")
    # neck: soft tissue, airway, lordotic cervical column, shoulders at the bottom
    cv.capsule(0.02, 1.6, 0.1, 3.3, 0.5, 0.58, depth=1.0, mu=SOFT)
    cv.capsule(-0.33, 1.75, -0.25, 3.4, 0.07, mu=AIR, landmark="airway")
    cv.ellipsoid(0.1, 3.45, 1.0, 0.35, 1.0, mu=SOFT)
    cv.cancellous(-0.02, 1.64, 0.05, 0.04, landmark=("vertebral-bodies", "odontoid"))  # anterior arch of C1
    cv.capsule(0.06, 1.52, 0.07, 1.7, 0.045, mu=BONE, landmark=("vertebral-bodies", "odontoid"))  # dens
    for k in range(6):
        y = 1.8 + 0.19 * k
        x = 0.06 - 0.09 * math.sin(math.pi * (k + 0.5) / 7.0)
        tilt = -8 + 3 * k
        cv.cancellous(x, y, 0.11, 0.065 + 0.005 * (k == 0), angle=tilt, c=0.09, power=4.0,
                      landmark="vertebral-bodies")
        cv.ellipsoid(x + 0.17, y - 0.01, 0.06, 0.075, 0.12, mu=BONE * 0.8, landmark="facets")
        cv.capsule(x + 0.2, y, x + 0.36 + 0.025 * k, y + 0.07, 0.028, 0.035, mu=BONE,
                   landmark="spinous-processes")
    cv.capsule(0.08 - 0.3, 3.35, 0.9, 3.2, 0.05, mu=BONE)  # clavicle seen end-on-ish


# ---------------------------------------------------------------------------------------------
# trunk: neck, thorax, abdomen, pelvis (frontal)
# ---------------------------------------------------------------------------------------------
def trunk(cv: Canvas, rng: np.random.Generator) -> None:
    """Soft tissue of the whole trunk in one piece, so that regions drawn together do not overlap."""
    hab = _u(rng, 0.8, 1.25)
    cv.capsule(0, 3.7, 0, 10.0, 1.5 * hab, 1.68 * hab, depth=0.64, mu=SOFT)
    cv.capsule(-1.65, 3.62, 1.65, 3.62, 0.42, depth=1.2, mu=SOFT)  # shoulders


def _vertebra(cv: Canvas, y: float, half_w: float, half_h: float, depth: float, key: str,
              transverse: float = 0.0, pedicles: Keys = None,
              transverse_key: Keys = "transverse-processes") -> None:
    cv.cancellous(0, y, half_w, half_h, c=depth, power=4.0, landmark=key)
    for s in (-1, 1):
        cv.arc(s * half_w * 0.62, y - half_h * 0.25, half_w * 0.18, half_h * 0.42, 0, 360, half_w * 0.07,
               mu=BONE, taper=0.0, landmark=pedicles)
        if transverse:
            cv.capsule(s * half_w * 0.7, y - half_h * 0.2, s * (half_w + transverse), y - half_h * 0.1,
                       half_h * 0.2, half_h * 0.16, mu=BONE, landmark=transverse_key)
    cv.ellipsoid(0, y + half_h * 0.3, half_w * 0.14, half_h * 0.55, depth * 0.6, mu=BONE * 0.7,
                 landmark="spinous-processes")


def neck_frontal(cv: Canvas, rng: np.random.Generator) -> None:
    cv.capsule(0, 2.0, 0, 3.4, 0.5, 0.55, depth=1.0, mu=SOFT)
    cv.capsule(0, 2.1, 0, 3.4, 0.08, mu=AIR * 0.7, landmark="airway")
    for k in range(6):
        _vertebra(cv, 2.15 + 0.19 * k, 0.16, 0.07, 0.1, "cervical-bodies")


def thorax(cv: Canvas, rng: np.random.Generator) -> None:
    """Chest wall, lungs, heart, domes of the diaphragm, ribs, clavicles, scapulae, thoracic spine."""
    dome = _u(rng, -0.08, 0.08)
    for s in (-1, 1):
        yb = 4.6 + (0.08 if s > 0 else -0.04) + dome
        cv.ellipsoid(s * 0.72, yb, 0.6, 1.3, 0.8, angle=s * -4, mu=AIR, landmark="lungs")
        cv.arc(s * 0.72, yb, 0.6, 1.3, 25, 155, 0.1, angle=s * -4, mu=0.0, taper=0.0, landmark="diaphragm")
    cv.ellipsoid(0.32, 5.1, 0.72 * _u(rng, 0.9, 1.15), 0.58, 0.6, angle=-28, mu=SOFT * 1.1,
                 landmark="heart-shadow")
    cv.capsule(0, 3.5, 0, 5.0, 0.28, depth=1.4, mu=SOFT * 0.6, landmark="mediastinum")
    cv.capsule(0, 3.4, 0, 5.3, 0.1, 0.13, depth=1.5, mu=BONE * 0.35, landmark="sternum")
    # thoracic spine T1–T12 with the rib heads at each level
    for j in range(12):
        y = 3.3 + 0.31 * j
        _vertebra(cv, y, 0.16 + 0.01 * j, 0.11, 0.3, "thoracic-bodies", transverse=0.08, pedicles="pedicles")
        rx = min(1.05 + 0.06 * j, 1.42)
        ry = 0.42 + 0.02 * j
        for s in (-1, 1):
            cv.ellipsoid(s * 0.26, y, 0.07, 0.06, 0.2, mu=BONE, landmark="rib-heads")
            cx = s * 0.28 + s * rx * -0.34
            start, end = (-208, -72) if s < 0 else (-108, 28)
            if j >= 10:  # floating ribs: short
                start, end = (-150, -72) if s < 0 else (-108, -30)
            cv.arc(cx, y + ry, rx, ry, start, end, 0.05, depth=0.7, mu=BONE, taper=0.12,
                   landmark="posterior-ribs")
            if j < 10:
                cxa = s * 0.1 + s * rx * -0.05
                a0, a1 = (118, 182) if s < 0 else (-2, 62)
                cv.arc(cxa, y + 0.35, rx * 0.98, 0.55 + 0.03 * j, a0, a1, 0.042, depth=0.6, mu=BONE * 0.6,
                       taper=0.25, landmark="anterior-ribs")
    for s in (-1, 1):
        cv.capsule(s * 0.12, 3.42, s * 0.8, 3.3, 0.065, 0.055, mu=BONE, landmark="clavicles")
        cv.capsule(s * 0.8, 3.3, s * 1.5, 3.1, 0.055, 0.06, mu=BONE, landmark="clavicles")
        cv.ellipsoid(s * 1.3, 4.15, 0.34, 0.72, 0.035, angle=s * 12, mu=BONE, landmark="scapula")
        cv.capsule(s * 1.25, 3.22, s * 1.72, 3.3, 0.07, mu=BONE, landmark="acromion")
        cv.arc(s * 1.58, 3.74, 0.07, 0.21, 0, 360, 0.03, mu=BONE, taper=0.0, landmark="glenoid")


def abdomen(cv: Canvas, rng: np.random.Generator) -> None:
    """Abdominal soft tissue, liver, kidneys, psoas, bowel gas and the lumbar spine."""
    cv.ellipsoid(-0.72, 6.55, 0.9, 0.55, 0.9, angle=12, mu=SOFT * 0.35, landmark="liver-shadow")
    cv.ellipsoid(0.75, 6.2, 0.22, 0.14, 0.3, mu=AIR, landmark="bowel-gas")  # gastric bubble
    for s in (-1, 1):
        cv.ellipsoid(s * 0.55, 7.55 + (0.1 if s < 0 else 0), 0.24, 0.44, 0.3, angle=s * 12, mu=SOFT * 0.3,
                     landmark="kidneys")
        cv.capsule(s * 0.24, 7.1, s * 0.66, 9.2, 0.12, 0.24, mu=SOFT * 0.3, landmark="psoas")
    for _ in range(int(rng.integers(7, 15))):
        x, y = _u(rng, -1.05, 1.05), _u(rng, 6.9, 9.6)
        cv.ellipsoid(x, y, _u(rng, 0.07, 0.22), _u(rng, 0.05, 0.16), _u(rng, 0.1, 0.3), angle=_u(rng, 0, 180),
                     mu=AIR, landmark="bowel-gas")
    for i in range(5):
        y = 7.12 + 0.43 * i
        _vertebra(cv, y, 0.27 + 0.012 * i, 0.165, 0.35, "lumbar-bodies",
                  transverse=(0.16, 0.22, 0.28, 0.24, 0.2)[i], pedicles=("pedicles", "lumbar-pedicles"),
                  transverse_key=("transverse-processes", "lumbar-transverse-processes"))


def pelvis_bones(cv: Canvas, rng: np.random.Generator, sides: tuple[int, ...] = (-1, 1)) -> None:
    """Sacrum, coccyx, ilia, acetabula, pubic and ischial rami, obturator foramina, SI joints."""
    cv.capsule(0, 9.15, 0, 9.95, 0.4, 0.1, depth=0.6, mu=BONE * 0.45, landmark="sacrum")
    for k in range(4):
        y = 9.3 + 0.17 * k
        for s in (-1, 1):
            cv.ellipsoid(s * (0.17 - 0.025 * k), y, 0.04, 0.035, 0.2, mu=-BONE * 0.5, landmark="sacral-foramina")
        cv.capsule(-0.3 + 0.06 * k, y + 0.085, 0.3 - 0.06 * k, y + 0.085, 0.012, mu=BONE * 0.6, landmark="sacrum")
    for k in range(3):
        cv.cancellous(0, 10.05 + 0.12 * k, 0.07 - 0.015 * k, 0.05, c=0.08, landmark="coccyx")
    for s in sides:
        cv.ellipsoid(s * 1.05, 9.0, 0.62, 0.72, 0.07, angle=s * -22, mu=BONE, landmark="iliac-wings")
        cv.arc(s * 1.05, 9.0, 0.62, 0.72, 185 if s < 0 else -85, 265 if s < 0 else -5, 0.05, angle=s * -22,
               mu=BONE, taper=0.1, landmark="iliac-wings")
        cv.capsule(s * 0.3, 9.1, s * 0.38, 9.72, 0.06, mu=0.0, landmark="sacroiliac-joints")
        cv.capsule(s * 0.36, 9.1, s * 0.42, 9.75, 0.04, mu=BONE, landmark="sacroiliac-joints")
        cv.arc(0, 9.55, 0.8, 0.6, 20 if s > 0 else 110, 70 if s > 0 else 160, 0.04, mu=BONE, taper=0.05,
               landmark="pelvic-brim")
        cv.arc(s * 0.95, 10.0, 0.28, 0.28, 195 if s < 0 else 235, 305 if s < 0 else 345, 0.05, mu=BONE * 1.2,
               taper=0.1, landmark="acetabulum")
        cv.ellipsoid(s * 0.95, 10.0, 0.33, 0.33, 0.15, mu=BONE * 0.4, landmark="acetabulum")
        cv.capsule(s * 0.78, 10.08, s * 0.1, 10.28, 0.08, 0.07, mu=BONE, landmark="pubic-rami")
        cv.capsule(s * 0.1, 10.58, s * 0.68, 10.82, 0.06, mu=BONE, landmark="pubic-rami")
        cv.cancellous(s * 0.78, 10.55, 0.14, 0.3, angle=s * 12, landmark="ischium")
        cv.ellipsoid(s * 0.45, 10.5, 0.22, 0.16, 0.1, angle=s * -15, mu=0.0, landmark="obturator-foramina")
    cv.ellipsoid(0, 10.42, 0.07, 0.2, 0.3, mu=0.0, landmark="pubic-symphysis")


# ---------------------------------------------------------------------------------------------
# limbs (frontal, anatomical position); side -1 is the patient's right (image left)
# ---------------------------------------------------------------------------------------------
def _ray(cv: Canvas, x: float, y: float, direction: float, bones: list[tuple[float, float, Keys]],
         gap: float = 0.03) -> None:
    """Bones one after another along ``direction`` (degrees, 90 = down) with joint gaps between them."""
    dx, dy = math.cos(math.radians(direction)), math.sin(math.radians(direction))
    for length, r, key in bones:
        x1, y1 = x + dx * length, y + dy * length
        cv.long_bone(x, y, x1, y1, r * 1.15, r * 1.05, cortex=0.4, landmark=key)
        cv.ellipsoid(x1 - dx * r * 0.9, y1 - dy * r * 0.9, r * 0.8, r * 1.3, r, angle=direction, mu=BONE * 0.35,
                     landmark=key)
        x, y = x1 + dx * gap, y1 + dy * gap


def arm(cv: Canvas, rng: np.random.Generator, s: int) -> None:
    """Humerus, elbow, radius and ulna, carpals, metacarpals, phalanges and their soft tissue."""
    b = _u(rng, 0.9, 1.1)
    cv.capsule(s * 1.82, 3.5, s * 2.0, 9.45, 0.5, 0.27, depth=0.9, mu=SOFT)
    cv.ellipsoid(s * 2.08, 10.05, 0.5, 0.6, 0.16, mu=SOFT)
    cv.cancellous(s * 1.76, 3.76, 0.27, 0.28, c=0.26, landmark="humeral-head")
    cv.cancellous(s * 1.98, 3.72, 0.12, 0.16, c=0.2, landmark="humeral-head")  # greater tuberosity
    ye = 6.65  # joints stay put (views are centred on them); size varies through the pose's scale
    cv.long_bone(s * 1.86, 3.9, s * 1.95, ye - 0.3, 0.12, 0.15, landmark="humerus-shaft")
    cv.cancellous(s * 1.96, ye - 0.12, 0.3, 0.13, c=0.09, power=4.0, landmark="distal-humerus")
    cv.cancellous(s * 2.1, ye, 0.12, 0.11, c=0.1, landmark="distal-humerus")  # capitellum
    cv.cancellous(s * 1.86, ye, 0.13, 0.1, c=0.1, landmark="distal-humerus")  # trochlea
    cv.cancellous(s * 1.64, ye - 0.12, 0.07, 0.06, c=0.06,
                  landmark=("distal-humerus", "medial-epicondyle"))
    cv.ellipsoid(s * 1.96, ye - 0.12, 0.09, 0.07, 0.06, mu=-BONE * 0.5)  # olecranon fossa
    cv.cancellous(s * 1.83, ye - 0.04, 0.1, 0.16, c=0.08, landmark="olecranon")
    cv.cancellous(s * 2.13, ye + 0.2, 0.1, 0.06, c=0.09, landmark="radial-head")
    yw = 9.3
    cv.long_bone(s * 2.15, ye + 0.28, s * 2.2, yw - 0.1, 0.055, 0.1, landmark="radius")
    cv.long_bone(s * 1.8, ye + 0.1, s * 1.82, yw - 0.08, 0.08, 0.05, landmark="ulna")
    cv.cancellous(s * 2.18, yw - 0.06, 0.17, 0.1, landmark="distal-radius")
    cv.cancellous(s * 1.84, yw - 0.04, 0.07, 0.07, landmark="distal-ulna")
    cv.ellipsoid(s * 2.36, yw, 0.05, 0.07, 0.05, mu=BONE, landmark="distal-radius")  # radial styloid
    # carpals: proximal row (scaphoid, lunate, triquetrum, pisiform) and distal row
    for k, (x, y, a, c2) in enumerate(((2.28, 0.14, 0.12, 0.08), (2.1, 0.13, 0.09, 0.085),
                                        (1.94, 0.15, 0.085, 0.075), (1.84, 0.22, 0.055, 0.055),
                                        (2.34, 0.33, 0.085, 0.08), (2.21, 0.33, 0.065, 0.075),
                                        (2.07, 0.33, 0.085, 0.11), (1.92, 0.31, 0.085, 0.1))):
        cv.cancellous(s * x, yw + y, a, c2, angle=s * (35 if k == 0 else 0), c=0.07,
                      landmark="carpal-bones")
    # metacarpals and fingers fan out downwards; the thumb leaves from the trapezium
    bases = (2.38, 2.24, 2.08, 1.93, 1.8)
    lengths = (0.42, 0.66, 0.64, 0.58, 0.54)
    phal = ((0.3, 0.0, 0.22), (0.4, 0.24, 0.17), (0.45, 0.28, 0.18), (0.42, 0.26, 0.17), (0.33, 0.18, 0.15))
    for f in range(5):
        direction = 90 - s * 32 if f == 0 else 90 + s * (f - 2.3) * 8
        x0, y0 = s * bases[f] + (s * 0.04 if f == 0 else 0), yw + (0.42 if f == 0 else 0.5)
        dx, dy = math.cos(math.radians(direction)), math.sin(math.radians(direction))
        L = lengths[f] * b
        reach = L + sum(phal[f]) * b + 0.12
        cv.capsule(x0, y0, x0 + dx * reach, y0 + dy * reach, 0.1, 0.075, depth=0.8, mu=SOFT)
        thumb = ("thumb",) if f == 0 else ()
        _ray(cv, x0, y0, direction, [(L, 0.045 if f else 0.05, ("metacarpals", *thumb))])
        x1, y1 = x0 + dx * (L + 0.04), y0 + dy * (L + 0.04)
        segs = [(p * b, 0.038 - 0.006 * i, ("phalanges", *thumb)) for i, p in enumerate(phal[f]) if p > 0]
        _ray(cv, x1, y1, direction + s * (f - 2) * 2, segs, gap=0.035)


def leg(cv: Canvas, rng: np.random.Generator, s: int) -> None:
    """Femur, knee with patella, tibia and fibula, ankle mortise and the foot seen end-on."""
    w = _u(rng, 0.88, 1.12)  # robust or gracile bones
    cv.capsule(s * 1.1, 10.2, s * 0.92, 19.1, 0.78, 0.38, depth=0.85, mu=SOFT)  # runs on past the heel
    cv.ellipsoid(s * 0.95, 19.05, 0.48, 0.3, 0.25, mu=SOFT)  # the foot, seen end-on
    cv.cancellous(s * 0.95, 10.0, 0.23, 0.23, landmark="femoral-head")
    cv.long_bone(s * 0.98, 10.05, s * 1.36, 10.36, 0.14, landmark="femoral-neck")
    cv.cancellous(s * 1.47, 10.3, 0.17, 0.24, landmark="greater-trochanter")
    cv.cancellous(s * 1.18, 10.68, 0.07, 0.1, landmark="lesser-trochanter")
    yk = 14.3  # joints stay put (views are centred on them); size varies through the pose's scale
    cv.long_bone(s * 1.36, 10.42, s * 0.94, yk - 0.25, 0.15 * w, 0.14 * w, landmark="femur-shaft")
    cv.cancellous(s * 0.92, yk - 0.18, 0.33, 0.2, c=0.12, power=4.0, landmark="femoral-condyles")
    for c in (-1, 1):
        cv.cancellous(s * (0.92 + 0.2 * c), yk, 0.18, 0.19, c=0.14, landmark="femoral-condyles")
    cv.ellipsoid(s * 0.92, yk + 0.05, 0.07, 0.1, 0.2, mu=-BONE * 0.4)  # intercondylar notch
    cv.cancellous(s * 0.93, yk - 0.22, 0.18, 0.23, c=0.12, landmark="patella")
    cv.ellipsoid(s * 0.92, yk + 0.23, 0.45, 0.05, 0.3, mu=0.0, landmark="joint-space")
    cv.cancellous(s * 0.92, yk + 0.38, 0.42, 0.14, c=0.13, power=4.0, landmark="tibial-plateau")
    cv.cancellous(s * 1.27, yk + 0.55, 0.09, 0.1, landmark="fibular-head")
    ya = 18.3
    cv.long_bone(s * 0.93, yk + 0.45, s * 0.86, ya - 0.15, 0.14 * w, 0.12 * w, landmark="tibia")
    cv.long_bone(s * 1.27, yk + 0.6, s * 1.2, ya, 0.05 * w, 0.05 * w, landmark="fibula")
    cv.cancellous(s * 0.86, ya - 0.1, 0.26, 0.13, c=0.1, power=4.0, landmark="tibial-plafond")
    cv.cancellous(s * 0.62, ya + 0.03, 0.08, 0.15, landmark="malleoli")
    cv.cancellous(s * 1.2, ya + 0.12, 0.08, 0.18, landmark="malleoli")
    cv.cancellous(s * 0.9, ya + 0.2, 0.25, 0.14, c=0.13, landmark="talus")
    cv.cancellous(s * 0.95, ya + 0.5, 0.26, 0.14, c=0.15, landmark="calcaneus")


def foot_dp(cv: Canvas, rng: np.random.Generator) -> None:
    """Right foot from above, toes up: tarsals, metatarsals, phalanges, sesamoids."""
    b = _u(rng, 0.9, 1.1)
    cv.ellipsoid(0.0, 0.3, 0.38, 0.75, 0.28, mu=SOFT)
    cv.ellipsoid(0.02, -0.55, 0.4, 0.32, 0.12, mu=SOFT)
    cv.cancellous(0.04, 0.98, 0.17, 0.26, c=0.14, landmark=("tarsal-bones", "hindfoot"))  # calcaneus
    cv.cancellous(-0.07, 0.68, 0.14, 0.19, angle=-10, c=0.12, landmark=("tarsal-bones", "hindfoot"))  # talus
    cv.cancellous(-0.14, 0.42, 0.14, 0.09, angle=-15, landmark="tarsal-bones")  # navicular
    cv.cancellous(0.14, 0.43, 0.12, 0.14, landmark="tarsal-bones")  # cuboid
    for k, x in enumerate((-0.22, -0.1, 0.01)):
        cv.cancellous(x, 0.25, 0.055 + 0.01 * (k == 0), 0.09, landmark="tarsal-bones")  # cuneiforms
    bases = (-0.22, -0.1, 0.0, 0.1, 0.19)
    lengths = (0.5, 0.58, 0.55, 0.52, 0.5)
    phal = ((0.24, 0.0, 0.17), (0.2, 0.1, 0.07), (0.18, 0.09, 0.06), (0.16, 0.08, 0.06), (0.14, 0.07, 0.06))
    for f in range(5):
        direction = -90 + (f - 1.5) * 4.5
        x0, y0 = bases[f], 0.15
        dx, dy = math.cos(math.radians(direction)), math.sin(math.radians(direction))
        r = 0.065 if f == 0 else 0.04
        L = lengths[f] * b
        _ray(cv, x0, y0, direction, [(L, r, "metatarsals")])
        x1, y1 = x0 + dx * (L + 0.04), y0 + dy * (L + 0.04)
        segs = [(p * b, (0.058 if f == 0 else 0.034) - 0.004 * i, "phalanges") for i, p in enumerate(phal[f]) if p]
        cv.capsule(x1, y1, x1 + dx * 0.4, y1 + dy * 0.4, r * 1.6, r * 1.4, depth=0.8, mu=SOFT)
        _ray(cv, x1, y1, direction, segs, gap=0.03)
    for x in (-0.26, -0.18):
        cv.ellipsoid(x, -0.4 * b, 0.035, 0.04, 0.04, mu=BONE, landmark="sesamoids")


# ---------------------------------------------------------------------------------------------
# breast (mammogram, mediolateral oblique)
# ---------------------------------------------------------------------------------------------
def breast(cv: Canvas, rng: np.random.Generator) -> None:
    """Compressed breast against the detector edge (x = 1): fat, fibroglandular tissue, pectoralis, nipple."""
    depth = _u(rng, 0.25, 0.4)
    reach = _u(rng, 1.25, 1.6)
    cv.ellipsoid(1.05, 0.15, reach, 0.95, depth, mu=FAT)
    cv.ellipsoid(1.15, -0.95, 0.42, 1.2, 0.4, angle=-35, mu=SOFT * 0.9, landmark="pectoral-muscle")
    density = _u(rng, 0.4, 1.2)
    for _ in range(int(rng.integers(10, 22))):
        r, a = _u(rng, 0.15, 0.85) * reach, _u(rng, -0.9, 0.9)
        x, y = 1.05 - r * math.cos(a), 0.15 + 0.8 * r * math.sin(a) / reach
        cv.ellipsoid(x, y, _u(rng, 0.06, 0.28), _u(rng, 0.04, 0.14), _u(rng, 0.03, 0.09) * density,
                     angle=math.degrees(a) + _u(rng, -20, 20), mu=GLAND, landmark="fibroglandular-tissue")
    for _ in range(int(rng.integers(6, 12))):  # Cooper's ligaments
        a = _u(rng, -0.9, 0.9)
        r = _u(rng, 0.5, 0.95) * reach
        cv.capsule(1.05 - r * math.cos(a), 0.15 + 0.8 * r * math.sin(a) / reach,
                   1.05 - (r + 0.12) * math.cos(a), 0.15 + 0.8 * (r + 0.12) * math.sin(a) / reach, 0.006,
                   depth=8.0, mu=GLAND)
    tip = 1.05 - reach
    cv.ellipsoid(tip + 0.03, 0.15, 0.05, 0.07, 0.08, mu=SOFT * 1.5, landmark="nipple")
    for _ in range(int(rng.integers(0, 5))):
        cv.ellipsoid(_u(rng, tip + 0.3, 0.8), _u(rng, -0.4, 0.6), 0.008, 0.008, 0.02, mu=BONE * 3)


REGIONS = {
    "head_frontal": head_frontal,
    "head_lateral": head_lateral,
    "neck_frontal": neck_frontal,
    "trunk": trunk,
    "thorax": thorax,
    "abdomen": abdomen,
    "pelvis": pelvis_bones,
    "foot_dp": foot_dp,
    "breast": breast,
}

__all__ = ["REGIONS", "arm", "leg", "pelvis_bones"]
