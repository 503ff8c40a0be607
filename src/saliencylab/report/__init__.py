"""Reports: display helpers for attribution maps and the HTML demo page."""

from .html import DemoCell, DemoMethod, DemoRow, MetricsTable, write_demo_page
from .render import denormalize, display_values, overlay, save_png, to_display

__all__ = ["to_display", "display_values", "overlay", "save_png", "denormalize",
           "write_demo_page", "DemoRow", "DemoCell", "DemoMethod", "MetricsTable"]
