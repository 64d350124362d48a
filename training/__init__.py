"""Training-side utilities: reward functions and the project's prompt set."""
