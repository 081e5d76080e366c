"""Self-contained HTML views: attention patterns, token colouring, heatmaps."""
