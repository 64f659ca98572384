"""What a run writes for people and other tools: report.md / report.html, model cards, exports (merged model,
GGUF), hub push and experiment trackers. Renderers read stored numbers; they compute none."""
