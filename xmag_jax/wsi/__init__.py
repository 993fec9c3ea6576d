"""Whole-slide access: open a slide and its µm/px (`slide_reader`), the slide list (`inputs`), the tissue
mask and tile grid (`tissue`), and synthetic slides for tests and the demo (`synthetic`)."""
