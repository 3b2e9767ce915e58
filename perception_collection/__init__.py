"""perception_collection package."""
