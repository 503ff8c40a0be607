"""Reports: display helpers for attribution maps, the HTML demo and leaderboard pages, curve plots.

Nothing here touches matplotlib's global state: figures are `Figure` objects on their own Agg canvas.
`report.demo.run_demo` (the demo itself) is imported on use: it loads the model and photos.
"""

from .html import DemoCell, DemoMethod, DemoRow, MetricsTable, write_demo_page
from .render import denormalize, display_values, overlay, save_png, to_display

__all__ = ["to_display", "display_values", "overlay", "save_png", "denormalize",
           "write_demo_page", "DemoRow", "DemoCell", "DemoMethod", "MetricsTable"]
