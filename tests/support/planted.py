"""Planted documents and the queries that must retrieve them (shared by the recall tests)."""

PLANTED: dict[str, tuple[str, str]] = {
    "volcano": (
        "The Kilauea lava lake overflowed its crater rim on Tuesday night.",
        "did the lava in the hawaiian volcano spill over?",
    ),
    "cheese": (
        "Aged gouda develops crunchy tyrosine crystals after two years.",
        "why does old dutch cheese have crunchy bits?",
    ),
    "chess": (
        "Magnus Carlsen sacrificed his queen on move 23 to force checkmate.",
        "which chess champion gave up the queen to win?",
    ),
    "bees": (
        "Honeybee colonies collapse when varroa mites spread viruses.",
        "what parasite kills hives of bees?",
    ),
}

__all__ = ["PLANTED"]
