"""The 24 classes as radiographic views of the phantom anatomy.

A view says which body regions to draw, where the detector is centred (in anatomy units), how
much it magnifies (image half-widths per anatomy unit), how the film is oriented, and which
structures become the landmark masks of the class, in two sets: ``landmarks`` (every named
structure of the view, the set "all") and ``discriminative`` (only the structures that tell the class
apart from the classes it resembles, e.g. the thumb of a hand against a foot). Limb views are drawn on
the patient's right; laterality comes from mirroring the finished film.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class View:
    """How one class is filmed."""

    draw: tuple[str, ...]  # regions: names in anatomy.REGIONS, or "arm:-1", "leg:1", "pelvis:-1"
    origin: tuple[float, float]  # anatomy point at the image centre
    zoom: float  # image half-widths per anatomy unit
    landmarks: dict[str, str] = field(default_factory=dict)  # structure key -> landmark name
    angle: float = 0.0  # film orientation in degrees (180: hand and forearm films hang fingers up)
    spin: float = 10.0  # ± random rotation in degrees
    bone: float = 1.0  # > 1: bone technique (soft tissue pushed darker, bone contrast up)
    # structure key -> landmark name of the discriminative set: what tells the class from those it is confused with
    discriminative: dict[str, str] = field(default_factory=dict)


_SPINE = {"cervical-bodies": "spine", "thoracic-bodies": "spine", "lumbar-bodies": "spine"}
_LONG = {k: "long-bones" for k in ("femur-shaft", "tibia", "fibula", "humerus-shaft", "radius", "ulna")}

VIEWS: dict[str, View] = {  # one per class, in the label order of CLASS_NAMES (tested)
    "whole-body": View(
        ("trunk", "leg:-1", "leg:1", "arm:-1", "arm:1", "abdomen", "pelvis", "thorax", "neck_frontal", "head_frontal"),
        (0.0, 9.45), 0.095, spin=4.0,
        landmarks={"vault": "skull", **_SPINE, "posterior-ribs": "rib-cage", "iliac-wings": "pelvis",
                   "sacrum": "pelvis", "pubic-rami": "pelvis", "ischium": "pelvis", **_LONG},
        discriminative={"vault": "skull", "femoral-condyles": "knees", "patella": "knees", "tibial-plateau": "knees"}),
    "facial-cranium": View(
        ("neck_frontal", "head_frontal"), (0.0, 1.35), 1.05,
        landmarks={"orbits": "orbits", "maxillary-sinuses": "maxillary-sinuses", "mandible": "mandible",
                   "teeth": "teeth", "nasal-septum": "nasal-septum"},
        discriminative={"nasal-septum": "nasal-septum", "maxillary-sinuses": "maxillary-sinuses"}),
    "skull": View(
        ("head_lateral",), (0.0, 1.15), 0.82,
        landmarks={"vault": "vault", "sella": "sella", "orbits": "orbits", "skull-base": "skull-base"},
        discriminative={"sella": "sella", "skull-base": "skull-base"}),
    "cervical-spine": View(
        ("head_lateral",), (0.1, 2.4), 1.05, spin=8.0,
        landmarks={"vertebral-bodies": "vertebral-bodies", "spinous-processes": "spinous-processes",
                   "facets": "articular-pillars"},
        discriminative={"odontoid": "odontoid", "spinous-processes": "spinous-processes",
                        "facets": "articular-pillars"}),
    "thoracic-spine": View(
        ("trunk", "abdomen", "thorax", "neck_frontal"), (0.0, 5.15), 0.72, spin=6.0, bone=1.3,
        landmarks={"thoracic-bodies": "vertebral-bodies", "pedicles": "pedicles", "rib-heads": "rib-heads",
                   "transverse-processes": "transverse-processes"},
        discriminative={"rib-heads": "costovertebral-joints"}),
    "lumbar-spine": View(
        ("trunk", "thorax", "abdomen", "pelvis"), (0.0, 8.15), 0.68, spin=6.0, bone=1.3,
        landmarks={"lumbar-bodies": "vertebral-bodies", "pedicles": "pedicles",
                   "transverse-processes": "transverse-processes"},
        discriminative={"lumbar-transverse-processes": "transverse-processes", "lumbar-pedicles": "pedicles"}),
    "sacrum-coccyx": View(
        ("trunk", "abdomen", "pelvis"), (0.0, 9.75), 1.0, spin=6.0, bone=1.2,
        landmarks={"sacrum": "sacrum", "coccyx": "coccyx", "sacroiliac-joints": "sacroiliac-joints",
                   "sacral-foramina": "sacral-foramina"},
        discriminative={"coccyx": "coccyx", "sacral-foramina": "sacral-foramina"}),
    "hand": View(
        ("arm:-1",), (-2.08, 10.4), 0.85, angle=180.0, spin=15.0,
        landmarks={"phalanges": "phalanges", "metacarpals": "metacarpals", "carpal-bones": "carpal-bones"},
        discriminative={"thumb": "thumb", "phalanges": "phalanges"}),
    "wrist": View(
        ("arm:-1",), (-2.05, 9.55), 1.9, angle=180.0, spin=15.0,
        landmarks={"carpal-bones": "carpal-bones", "distal-radius": "distal-radius", "distal-ulna": "distal-ulna",
                   "metacarpals": "metacarpal-bases"},
        discriminative={"carpal-bones": "carpal-bones", "distal-ulna": "distal-ulna"}),
    "forearm": View(
        ("arm:-1",), (-2.0, 8.0), 0.68, angle=180.0, spin=15.0,
        landmarks={"radius": "radius", "ulna": "ulna"},
        discriminative={"radius": "radius", "ulna": "ulna"}),
    "elbow": View(
        ("arm:-1",), (-1.97, 6.62), 1.25, spin=15.0,
        landmarks={"distal-humerus": "distal-humerus", "olecranon": "olecranon", "radial-head": "radial-head"},
        discriminative={"olecranon": "olecranon", "radial-head": "radial-head",
                        "medial-epicondyle": "medial-epicondyle"}),
    "upper-arm": View(
        ("trunk", "thorax", "arm:-1"), (-1.9, 5.2), 0.58, spin=12.0,
        landmarks={"humerus-shaft": "humerus", "humeral-head": "humeral-head", "distal-humerus": "distal-humerus"},
        discriminative={"humeral-head": "humeral-head", "distal-humerus": "distal-humerus"}),
    "shoulder": View(
        ("trunk", "thorax", "neck_frontal", "arm:-1"), (-1.45, 3.85), 0.95,
        landmarks={"humeral-head": "humeral-head", "glenoid": "glenoid", "clavicles": "clavicle",
                   "acromion": "acromion", "scapula": "scapula"},
        discriminative={"glenoid": "glenoid", "acromion": "acromion", "clavicles": "clavicle"}),
    "chest-bones": View(
        ("trunk", "abdomen", "thorax", "neck_frontal", "arm:-1", "arm:1"), (-0.8, 4.9), 0.62, spin=8.0, bone=1.6,
        landmarks={"posterior-ribs": "ribs", "anterior-ribs": "ribs", "clavicles": "clavicle",
                   "rib-heads": "costovertebral-joints"},
        discriminative={"posterior-ribs": "ribs", "anterior-ribs": "ribs"}),
    "chest": View(
        ("trunk", "abdomen", "thorax", "neck_frontal", "arm:-1", "arm:1"), (0.0, 4.85), 0.45, spin=6.0,
        landmarks={"clavicles": "clavicles", "heart-shadow": "heart-shadow", "diaphragm": "diaphragm",
                   "lungs": "lung-fields"},
        discriminative={"heart-shadow": "heart-shadow", "lungs": "lung-fields"}),
    "breast": View(
        ("breast",), (0.0, 0.0), 1.0, spin=8.0,
        landmarks={"pectoral-muscle": "pectoral-muscle", "fibroglandular-tissue": "fibroglandular-tissue",
                   "nipple": "nipple"},
        discriminative={"nipple": "nipple", "pectoral-muscle": "pectoral-muscle"}),
    "abdomen": View(
        ("trunk", "thorax", "abdomen", "pelvis"), (0.0, 8.1), 0.42, spin=6.0,
        landmarks={"liver-shadow": "liver-shadow", "bowel-gas": "bowel-gas", "lumbar-bodies": "lumbar-spine",
                   "psoas": "psoas"},
        discriminative={"bowel-gas": "bowel-gas", "liver-shadow": "liver-shadow"}),
    "pelvis": View(
        ("trunk", "abdomen", "pelvis", "leg:-1", "leg:1"), (0.0, 10.1), 0.52, spin=6.0,
        landmarks={"iliac-wings": "iliac-wings", "obturator-foramina": "obturator-foramina",
                   "femoral-head": "femoral-heads", "acetabulum": "acetabula", "sacrum": "sacrum",
                   "pubic-symphysis": "pubic-symphysis"},
        discriminative={"pubic-symphysis": "pubic-symphysis", "obturator-foramina": "obturator-foramina"}),
    "foot": View(
        ("foot_dp",), (0.0, 0.2), 0.85, spin=15.0,
        landmarks={"phalanges": "phalanges", "metatarsals": "metatarsals", "tarsal-bones": "tarsal-bones"},
        discriminative={"hindfoot": "hindfoot", "sesamoids": "sesamoids"}),
    "ankle": View(
        ("leg:-1",), (-0.9, 18.45), 1.15, spin=12.0,
        landmarks={"tibial-plafond": "tibial-plafond", "malleoli": "malleoli", "talus": "talus"},
        discriminative={"talus": "talus", "malleoli": "malleoli", "calcaneus": "calcaneus"}),
    "lower-leg": View(
        ("leg:-1",), (-1.0, 16.4), 0.48, spin=12.0,
        landmarks={"tibia": "tibia", "fibula": "fibula"},
        discriminative={"fibula": "fibula"}),
    "knee": View(
        ("leg:-1",), (-0.95, 14.45), 1.0, spin=12.0,
        landmarks={"femoral-condyles": "femoral-condyles", "tibial-plateau": "tibial-plateau", "patella": "patella",
                   "joint-space": "joint-space", "fibular-head": "fibular-head"},
        discriminative={"patella": "patella", "fibular-head": "fibular-head"}),
    "upper-leg": View(
        ("pelvis:-1", "leg:-1"), (-1.1, 12.2), 0.42, spin=10.0,
        landmarks={"femur-shaft": "femoral-shaft", "femoral-head": "proximal-femur", "femoral-neck": "proximal-femur",
                   "greater-trochanter": "proximal-femur", "femoral-condyles": "distal-femur"},
        discriminative={"greater-trochanter": "trochanters", "lesser-trochanter": "trochanters",
                        "femoral-neck": "femoral-neck"}),
    "hip": View(
        ("trunk", "abdomen", "pelvis:-1", "leg:-1"), (-0.95, 10.25), 1.0, spin=10.0,
        landmarks={"femoral-head": "femoral-head", "femoral-neck": "femoral-neck",
                   "greater-trochanter": "greater-trochanter", "acetabulum": "acetabulum"},
        discriminative={"femoral-neck": "femoral-neck", "greater-trochanter": "greater-trochanter"}),
}


def landmark_names(view: View, landmark_set: str = "all") -> list[str]:
    """The distinct landmark names of a view's set (``"all"`` or ``"discriminative"``), in the order first declared."""
    return list(dict.fromkeys(set_keys(view, landmark_set).values()))


def set_keys(view: View, landmark_set: str) -> dict[str, str]:
    """Structure key -> landmark name of one landmark set of a view."""
    if landmark_set == "all":
        return view.landmarks
    if landmark_set == "discriminative":
        return view.discriminative
    raise ValueError(f"landmark set {landmark_set!r}: expected 'all' or 'discriminative'")
