"""text_judge package."""
