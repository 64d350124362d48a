"""What the objectives are, shared by training and evaluation: the prompt set (`prompts`),
the reward functions r_j (`rewards`) and the fixed scale r~_j every metric and every trained
model uses (`scale`). Both sides import this package and neither imports the other for it."""
