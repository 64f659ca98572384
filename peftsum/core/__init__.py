"""The pipeline every job shares: data -> prompts -> model -> loss and greedy generation, and a session that holds
one loaded model for a run."""
