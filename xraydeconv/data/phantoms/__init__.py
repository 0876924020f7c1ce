"""Synthetic phantoms: analytic 3-D anatomy per class, projected into films with landmark masks.

``generate`` writes a data set, ``ensure_phantoms`` reuses a cached one, ``render_phantom`` draws one film
(``render_landmark_sets`` the same film with the masks of every landmark set).
The anatomy, film, marker, shapes, views and clutter modules are the parts ``generate`` composes.
"""

from xraydeconv.data.phantoms.generate import (
    BIASES,
    CLASS_LANDMARKS,
    GENERATOR,
    LANDMARK_SETS,
    SET_LANDMARKS,
    SPLITS,
    default_cache_dir,
    ensure_phantoms,
    generate,
    render_landmark_sets,
    render_phantom,
    split_counts,
)

__all__ = ["BIASES", "CLASS_LANDMARKS", "GENERATOR", "LANDMARK_SETS", "SET_LANDMARKS", "SPLITS", "default_cache_dir",
           "ensure_phantoms", "generate", "render_landmark_sets", "render_phantom", "split_counts"]
