"""Whole-slide access: open a slide and its µm/px (`slide_reader`), the slide list (`inputs`), the tissue
mask and tile grid (`tissue`), synthetic slides for tests and the demo (`synthetic`), and what every slide
pipeline shares: the failed-slide record (`failures`) and reading in a crash-isolated child (`isolation`)."""
