"""What a person reads: the projection pipeline (per-image folders, manifest, gallery), evaluate, demo, bench."""
