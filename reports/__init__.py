"""Report builder: markdown and PNG plots from eval and bench results (`python -m reports build`).

`reports.formats` is the one place that says which fields of the eval and bench
results files are read; `reports.build` draws and writes; `reports.paper` holds the
CosyVoice2 paper's Seed-TTS-eval figures.
"""
