"""Self-contained HTML views: attention patterns, token colouring, heatmaps, values over images.

Every view is one HTML document with inline CSS and JavaScript (nothing is fetched when it is
opened) and every token string in it is escaped.

Example:
    >>> from mechscope.viz import attention_heads_html, colored_tokens_html, save_html
    >>> doc = colored_tokens_html(["a", "b"], torch.tensor([1.0, -1.0]))
"""

from mechscope.viz.attention import attention_heads_html
from mechscope.viz.heatmap import (
    figures_html,
    heatmap_figure,
    layer_head_heatmap,
    layer_pos_heatmap,
    save_heatmaps,
    save_png,
)
from mechscope.viz.html import page, save_html, script_json
from mechscope.viz.tokens import colored_tokens_html
from mechscope.viz.vision import Overlay, lens_figure, overlays_page, save_overlays_html, save_overlays_png

__all__ = [
    "Overlay",
    "attention_heads_html",
    "colored_tokens_html",
    "figures_html",
    "heatmap_figure",
    "layer_head_heatmap",
    "layer_pos_heatmap",
    "lens_figure",
    "overlays_page",
    "page",
    "save_heatmaps",
    "save_html",
    "save_overlays_html",
    "save_overlays_png",
    "save_png",
    "script_json",
]
