"""Landmark agreement of heat maps (pointing game, relevance mass and rank) and its aggregation."""

from xraydeconv.metrics.landmarks import (
    LandmarkScores,
    area_share,
    landmark_union,
    nanmean,
    per_class,
    pointing_game,
    relevance_mass,
    relevance_rank,
    score_landmarks,
)

__all__ = ["pointing_game", "relevance_mass", "relevance_rank", "area_share", "landmark_union", "LandmarkScores",
           "score_landmarks", "per_class", "nanmean"]
